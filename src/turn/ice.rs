//! Browser-ready ICE configurations (`GET /ice` and `mediagate ice`), in the
//! shape STUNner's auth service returns:
//! `{"iceServers":[{"urls":[...],"username":"...","credential":"..."}],"iceTransportPolicy":"relay"}`.
//!
//! [`IceRequest::from_query`] reads the query parameters of STUNner's auth service
//! (`/ice?service=turn&username=U&ttl=S&iceTransportPolicy=relay&listener=L`); a parameter
//! mediagate cannot honour (`namespace`, `gateway`, `key`, anything unknown, a repeated
//! one) is an error (HTTP 400), never silently ignored.

use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::auth::{ephemeral_password, ephemeral_username};
use crate::config::{TurnAuthType, TurnConfig, TurnTransport};

/// Longest user id accepted in an ICE request (the STUN USERNAME limit is 509 bytes).
const MAX_USER_LEN: usize = 256;

/// A parsed `/ice` request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IceRequest {
    /// `username`: the user id (ephemeral) or the static user's name. Default empty.
    pub user: String,
    /// `ttl` in seconds. Default `turn.auth.ttl`.
    pub ttl: Option<Duration>,
    /// `iceTransportPolicy` (also `icetransportpolicy`): `all` or `relay`. Default `relay`.
    pub policy: Option<String>,
    /// `listener`: only the TURN listeners of this transport (`udp`, `tcp`, `tls`, `dtls`)
    /// or at this index in `turn.listeners`. Default every listener but `dtls` ones.
    pub listener: Option<String>,
}

impl IceRequest {
    /// Reads STUNner's auth-service query parameters; errors are one line for a 400 body.
    pub fn from_query(pairs: &[(String, String)]) -> Result<IceRequest, String> {
        let mut r = IceRequest::default();
        let mut seen: Vec<&str> = Vec::new();
        for (k, v) in pairs {
            let key = if k == "icetransportpolicy" {
                "iceTransportPolicy"
            } else {
                k.as_str()
            };
            if seen.contains(&key) {
                return Err(format!("parameter {key} is given more than once"));
            }
            seen.push(key);
            match key {
                "service" if v == "turn" => {}
                "service" => return Err(format!("service must be turn, not {v:?}")),
                "username" => r.user = v.clone(),
                "ttl" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| format!("ttl must be a number of seconds, not {v:?}"))?;
                    r.ttl = Some(Duration::from_secs(secs));
                }
                "iceTransportPolicy" if v == "all" || v == "relay" => r.policy = Some(v.clone()),
                "iceTransportPolicy" => {
                    return Err(format!(
                        "iceTransportPolicy must be all or relay, not {v:?}"
                    ));
                }
                "listener" => r.listener = Some(v.clone()),
                "namespace" | "gateway" => {
                    return Err(format!(
                        "{key} is not supported: mediagate is one gateway (select listeners with listener=udp|tcp|tls or an index)"
                    ));
                }
                "key" => {
                    return Err(
                        "key is not supported: send the /ice token as Authorization: Bearer <token>"
                            .to_string(),
                    );
                }
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(format!(
                        "unknown parameter {shown:?} (accepted: service, username, ttl, iceTransportPolicy, listener)"
                    ));
                }
            }
        }
        Ok(r)
    }
}

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
    let req = IceRequest {
        user: user.to_string(),
        ttl,
        ..IceRequest::default()
    };
    ice_config_for(cfg, &req, now)
}

/// The ICE configuration for a parsed `/ice` request (see [`ice_config`] for the
/// credentials). URLs: `turn:HOST:PORT?transport=udp|tcp` per udp/tcp listener and
/// `turns:HOST:PORT?transport=tcp` per tls listener, filtered by `listener`;
/// `turns:HOST:PORT?transport=udp` per dtls listener only when `listener` selects it
/// (`dtls` or its index), because browsers do not speak TURN over DTLS.
pub fn ice_config_for(
    cfg: &TurnConfig,
    req: &IceRequest,
    now: SystemTime,
) -> Result<serde_json::Value, String> {
    let (user, ttl) = (req.user.as_str(), req.ttl);
    if user.len() > MAX_USER_LEN || user.chars().any(|c| c.is_control()) {
        return Err(format!(
            "invalid username: at most {MAX_USER_LEN} bytes, no control characters"
        ));
    }
    let (username, credential) = match cfg.auth.kind {
        TurnAuthType::Ephemeral => {
            let secrets = cfg.auth.all_secrets();
            let secret = secrets
                .first()
                .copied()
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
    // Every advertised address (one per family on a dual-stack gateway) with every
    // listener: a client uses the URLs of the family it has.
    let hosts: Vec<String> = cfg
        .public_address
        .iter()
        .map(|a| match a.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]"),
            Err(_) => a.to_string(),
        })
        .collect();
    let mut urls: Vec<String> = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        if let Some(want) = &req.listener
            && *want != l.protocol.to_string()
            && *want != i.to_string()
        {
            continue;
        }
        // Browsers do not speak TURN over DTLS (and some reject the URL): a dtls listener
        // is listed only when asked for by name or index.
        if l.protocol == TurnTransport::Dtls && req.listener.is_none() {
            continue;
        }
        let port = l.listen.port();
        for host in &hosts {
            let mut these = vec![match l.protocol {
                TurnTransport::Dtls => format!("turns:{host}:{port}?transport=udp"),
                TurnTransport::Udp => format!("turn:{host}:{port}?transport=udp"),
                TurnTransport::Tcp => format!("turn:{host}:{port}?transport=tcp"),
                TurnTransport::Tls => format!("turns:{host}:{port}?transport=tcp"),
            }];
            // A tcp listener with a certificate serves TLS on the same port.
            if l.protocol == TurnTransport::Tcp && l.cert.is_some() {
                these.push(format!("turns:{host}:{port}?transport=tcp"));
            }
            for url in these {
                if !urls.contains(&url) {
                    urls.push(url);
                }
            }
        }
    }
    if urls.is_empty() {
        let shown: String = req
            .listener
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(64)
            .collect();
        return Err(format!(
            "no TURN listener matches listener={shown:?} (udp, tcp, tls, dtls or an index into turn.listeners)"
        ));
    }
    Ok(json!({
        "iceServers": [{
            "urls": urls,
            "username": username,
            "credential": credential,
        }],
        "iceTransportPolicy": req.policy.as_deref().unwrap_or("relay"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, PublicAddresses, TurnAuthConfig, TurnListenerConfig, TurnUser};

    fn cfg(kind: TurnAuthType) -> TurnConfig {
        TurnConfig {
            realm: "mediagate".into(),
            public_address: "203.0.113.7".into(),
            listeners: vec![
                TurnListenerConfig {
                    protocol: TurnTransport::Udp,
                    listen: "0.0.0.0:3478".parse().unwrap(),
                    cert: None,
                    key: None,
                    accept_proxy_protocol: false,
                    trusted_proxies: Vec::new(),
                },
                TurnListenerConfig {
                    protocol: TurnTransport::Tcp,
                    listen: "0.0.0.0:3478".parse().unwrap(),
                    cert: None,
                    key: None,
                    accept_proxy_protocol: false,
                    trusted_proxies: Vec::new(),
                },
            ],
            auth: TurnAuthConfig {
                secret_file: None,
                kind,
                secret: Some("north".into()),
                secrets: vec![],
                ttl: Dur(Duration::from_secs(86400)),
                users: vec![TurnUser {
                    username: "alice".into(),
                    password: "wonderland".into(),
                }],
            },
            relay: Default::default(),
            quota: Default::default(),
            ice: Default::default(),
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

    #[test]
    fn a_dual_stack_gateway_advertises_both_families() {
        let mut c = cfg(TurnAuthType::Static);
        c.public_address = PublicAddresses(vec!["203.0.113.7".into(), "2001:db8::7".into()]);
        let v = ice_config(&c, "", None, SystemTime::now()).unwrap();
        let urls: Vec<&str> = v["iceServers"][0]["urls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        assert!(
            urls.contains(&"turn:203.0.113.7:3478?transport=udp"),
            "{urls:?}"
        );
        assert!(
            urls.contains(&"turn:[2001:db8::7]:3478?transport=udp"),
            "{urls:?}"
        );
        // Every listener once per address.
        assert_eq!(urls.len() % 2, 0, "{urls:?}");
    }

    fn q(pairs: &[(&str, &str)]) -> Result<IceRequest, String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        IceRequest::from_query(&owned)
    }

    #[test]
    fn stunner_query_parameters_are_honoured_or_refused() {
        let r = q(&[
            ("service", "turn"),
            ("username", "bob"),
            ("ttl", "60"),
            ("icetransportpolicy", "all"),
            ("listener", "tls"),
        ])
        .unwrap();
        assert_eq!(r.user, "bob");
        assert_eq!(r.ttl, Some(Duration::from_secs(60)));
        assert_eq!(r.policy.as_deref(), Some("all"));
        assert_eq!(r.listener.as_deref(), Some("tls"));
        for bad in [
            vec![("service", "stun")],
            vec![("namespace", "stunner")],
            vec![("gateway", "g")],
            vec![("key", "k")],
            vec![("iceTransportPolicy", "none")],
            vec![("ttl", "soon")],
            vec![("usr", "typo")],
            vec![("username", "a"), ("username", "b")],
            vec![
                ("iceTransportPolicy", "all"),
                ("icetransportpolicy", "relay"),
            ],
        ] {
            assert!(q(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tls_listeners_give_turns_urls_and_listener_filters() {
        let mut c = cfg(TurnAuthType::Ephemeral);
        c.listeners.push(TurnListenerConfig {
            protocol: TurnTransport::Tls,
            listen: "0.0.0.0:443".parse().unwrap(),
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            accept_proxy_protocol: false,
            trusted_proxies: Vec::new(),
        });
        let now = SystemTime::now();
        let all = ice_config(&c, "", None, now).unwrap();
        assert_eq!(
            all["iceServers"][0]["urls"][2],
            "turns:203.0.113.7:443?transport=tcp"
        );
        let req = IceRequest {
            listener: Some("tls".into()),
            policy: Some("all".into()),
            ..Default::default()
        };
        let tls = ice_config_for(&c, &req, now).unwrap();
        assert_eq!(
            tls["iceServers"][0]["urls"],
            json!(["turns:203.0.113.7:443?transport=tcp"])
        );
        assert_eq!(tls["iceTransportPolicy"], "all");
        let by_index = IceRequest {
            listener: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(
            ice_config_for(&c, &by_index, now).unwrap()["iceServers"][0]["urls"],
            json!(["turn:203.0.113.7:3478?transport=udp"])
        );
        let none = IceRequest {
            listener: Some("dtls".into()),
            ..Default::default()
        };
        assert!(ice_config_for(&c, &none, now).is_err());
    }

    #[test]
    fn dtls_only_when_asked_and_tls_on_a_tcp_port() {
        let mut c = cfg(TurnAuthType::Ephemeral);
        // The tcp listener (index 1) also serves TLS.
        c.listeners[1].cert = Some("c.pem".into());
        c.listeners[1].key = Some("k.pem".into());
        c.listeners.push(TurnListenerConfig {
            protocol: TurnTransport::Dtls,
            listen: "0.0.0.0:5349".parse().unwrap(),
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            accept_proxy_protocol: false,
            trusted_proxies: Vec::new(),
        });
        let now = SystemTime::now();
        let all = ice_config(&c, "", None, now).unwrap();
        assert_eq!(
            all["iceServers"][0]["urls"],
            json!([
                "turn:203.0.113.7:3478?transport=udp",
                "turn:203.0.113.7:3478?transport=tcp",
                "turns:203.0.113.7:3478?transport=tcp"
            ])
        );
        let req = IceRequest {
            listener: Some("dtls".into()),
            ..Default::default()
        };
        assert_eq!(
            ice_config_for(&c, &req, now).unwrap()["iceServers"][0]["urls"],
            json!(["turns:203.0.113.7:5349?transport=udp"])
        );
    }

    #[test]
    fn the_first_of_several_secrets_signs() {
        let mut c = cfg(TurnAuthType::Ephemeral);
        c.auth.secret = None;
        c.auth.secrets = vec!["new".into(), "old".into()];
        let v = ice_config(&c, "a", None, SystemTime::now()).unwrap();
        let user = v["iceServers"][0]["username"].as_str().unwrap().to_string();
        assert_eq!(
            v["iceServers"][0]["credential"],
            ephemeral_password("new", &user)
        );
    }
}
