//! Browser-ready ICE configurations (SPEC §7, `GET /ice` and `mediagate ice`), in the
//! shape STUNner's auth service returns:
//! `{"iceServers":[{"urls":[...],"username":"...","credential":"..."}],"iceTransportPolicy":"relay"}`.

use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::auth::{ephemeral_password, ephemeral_username};
use crate::config::{Protocol, TurnAuthType, TurnConfig};

/// Longest user id accepted in an ICE request (the STUN USERNAME limit is 509 bytes).
const MAX_USER_LEN: usize = 256;

/// The ICE configuration for `user`.
///
/// - `ephemeral`: username `EXPIRY:USER` (bare `EXPIRY` when `user` is empty), credential
///   `base64(HMAC-SHA1(secret, username))`, valid for `ttl` (default `turn.auth.ttl`; a
///   longer `ttl` than the configured one is refused).
/// - `static`: the configured user named `user` (the first one when `user` is empty);
///   `ttl` is ignored because static credentials do not expire.
///
/// Errors are one readable line, suitable for an HTTP 400 body.
pub fn ice_config(
    cfg: &TurnConfig,
    user: &str,
    ttl: Option<Duration>,
    now: SystemTime,
) -> Result<serde_json::Value, String> {
    if user.len() > MAX_USER_LEN || user.chars().any(|c| c.is_control()) {
        return Err(format!(
            "invalid username: at most {MAX_USER_LEN} bytes, no control characters"
        ));
    }
    let (username, credential) = match cfg.auth.kind {
        TurnAuthType::Ephemeral => {
            let secret = cfg
                .auth
                .secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or("turn.auth.secret is not set")?;
            let max = cfg.auth.ttl.get();
            let ttl = ttl.unwrap_or(max);
            if ttl < Duration::from_secs(1) || ttl > max {
                return Err(format!(
                    "ttl must be between 1 and {} seconds (turn.auth.ttl)",
                    max.as_secs()
                ));
            }
            let now = now
                .duration_since(UNIX_EPOCH)
                .map_err(|_| "system clock is before 1970")?;
            let expiry = now.as_secs().saturating_add(ttl.as_secs());
            let username = ephemeral_username(expiry, user);
            let credential = ephemeral_password(secret, &username);
            (username, credential)
        }
        TurnAuthType::Static => {
            let found = if user.is_empty() {
                cfg.auth.users.first()
            } else {
                cfg.auth.users.iter().find(|u| u.username == user)
            };
            let u = found.ok_or_else(|| format!("unknown TURN user {user:?}"))?;
            (u.username.clone(), u.password.clone())
        }
    };
    let host = match cfg.public_address.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]"),
        Err(_) => cfg.public_address.clone(),
    };
    let mut urls: Vec<String> = Vec::new();
    for l in &cfg.listeners {
        let transport = match l.protocol {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        };
        let url = format!("turn:{host}:{}?transport={transport}", l.listen.port());
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    Ok(json!({
        "iceServers": [{
            "urls": urls,
            "username": username,
            "credential": credential,
        }],
        "iceTransportPolicy": "relay",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, TurnAuthConfig, TurnListenerConfig, TurnUser};

    fn cfg(kind: TurnAuthType) -> TurnConfig {
        TurnConfig {
            realm: "mediagate".into(),
            public_address: "203.0.113.7".into(),
            listeners: vec![
                TurnListenerConfig {
                    protocol: Protocol::Udp,
                    listen: "0.0.0.0:3478".parse().unwrap(),
                },
                TurnListenerConfig {
                    protocol: Protocol::Tcp,
                    listen: "0.0.0.0:3478".parse().unwrap(),
                },
            ],
            auth: TurnAuthConfig {
                kind,
                secret: Some("north".into()),
                ttl: Dur(Duration::from_secs(86400)),
                users: vec![TurnUser {
                    username: "alice".into(),
                    password: "wonderland".into(),
                }],
            },
            relay: Default::default(),
            quota: Default::default(),
        }
    }

    #[test]
    fn ephemeral_matches_the_stunner_shape() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = ice_config(
            &cfg(TurnAuthType::Ephemeral),
            "alice",
            Some(Duration::from_secs(60)),
            now,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"iceServers":[{"urls":["turn:203.0.113.7:3478?transport=udp","turn:203.0.113.7:3478?transport=tcp"],
                "username":"1700000060:alice","credential": ephemeral_password("north", "1700000060:alice")}],
                "iceTransportPolicy":"relay"})
        );
        let default_ttl = ice_config(&cfg(TurnAuthType::Ephemeral), "", None, now).unwrap();
        assert_eq!(default_ttl["iceServers"][0]["username"], "1700086400");
    }

    #[test]
    fn ttl_and_user_are_checked() {
        let c = cfg(TurnAuthType::Ephemeral);
        let now = SystemTime::now();
        assert!(ice_config(&c, "a", Some(Duration::from_secs(86401)), now).is_err());
        assert!(ice_config(&c, "a", Some(Duration::ZERO), now).is_err());
        assert!(ice_config(&c, "a\nb", None, now).is_err());
        assert!(ice_config(&c, &"x".repeat(300), None, now).is_err());
    }

    #[test]
    fn static_returns_the_configured_user() {
        let mut c = cfg(TurnAuthType::Static);
        c.public_address = "2001:db8::1".into();
        let v = ice_config(&c, "", None, SystemTime::now()).unwrap();
        assert_eq!(v["iceServers"][0]["username"], "alice");
        assert_eq!(v["iceServers"][0]["credential"], "wonderland");
        assert_eq!(
            v["iceServers"][0]["urls"][0],
            "turn:[2001:db8::1]:3478?transport=udp"
        );
        assert!(ice_config(&c, "bob", None, SystemTime::now()).is_err());
    }
}
