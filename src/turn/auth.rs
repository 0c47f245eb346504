//! TURN credentials: `static` long-term users and `ephemeral` TURN REST API credentials,
//! plus the stateless nonces of the long-term credential mechanism.
//!
//! Ephemeral credentials follow coturn's `use-auth-secret`: the username is
//! `EXPIRY:USER` (a Unix timestamp, a colon, any user id; a bare timestamp and coturn's
//! reversed `USER:EXPIRY` form are accepted too) and the password is
//! `base64(HMAC-SHA1(secret, username))`. The long-term key is
//! `MD5(username ":" realm ":" password)` (RFC 8489 §9.2.2).
//!
//! Nonces are `<16 hex digits issue time><16 hex digits MAC>` where the MAC is an
//! HMAC-SHA1 over the issue time and the client IP under a per-process random key, so
//! the server keeps no nonce table (a flood of unauthenticated requests costs no memory).

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{TurnAuthConfig, TurnAuthType};

/// How long a nonce stays valid before the client gets 438 Stale Nonce.
pub(crate) const NONCE_LIFETIME: Duration = Duration::from_secs(600);

/// Why a request failed authentication; the label of `mediagate_turn_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Static: no such user.
    UnknownUser,
    /// Ephemeral: the username carries no usable expiry timestamp.
    BadUsername,
    /// Ephemeral: the expiry timestamp is in the past.
    Expired,
    /// MESSAGE-INTEGRITY did not match (wrong password).
    WrongPassword,
    /// The REALM differs from the configured realm.
    RealmMismatch,
    /// USERNAME, REALM or NONCE missing or unreadable next to MESSAGE-INTEGRITY.
    Malformed,
    /// The credentials differ from those that created the allocation (441).
    WrongCredentials,
}

impl AuthFailure {
    /// Every reason, for pre-resolving metric label sets.
    pub const ALL: [AuthFailure; 7] = [
        AuthFailure::UnknownUser,
        AuthFailure::BadUsername,
        AuthFailure::Expired,
        AuthFailure::WrongPassword,
        AuthFailure::RealmMismatch,
        AuthFailure::Malformed,
        AuthFailure::WrongCredentials,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::BadUsername => "bad_username",
            AuthFailure::Expired => "expired",
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::RealmMismatch => "realm_mismatch",
            AuthFailure::Malformed => "malformed",
            AuthFailure::WrongCredentials => "wrong_credentials",
        }
    }
}

/// `base64(HMAC-SHA1(secret, username))`: the password of a TURN REST API username.
pub fn ephemeral_password(secret: &str, username: &str) -> String {
    // ring's HMAC-SHA1, the one the `turn` and `stun` crates use for MESSAGE-INTEGRITY.
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    BASE64.encode(hmac::sign(&key, username.as_bytes()).as_ref())
}

/// `EXPIRY:USER`, or the bare timestamp when `user` is empty (both accepted by coturn).
pub fn ephemeral_username(expiry_unix: u64, user: &str) -> String {
    if user.is_empty() {
        expiry_unix.to_string()
    } else {
        format!("{expiry_unix}:{user}")
    }
}

/// The expiry timestamp of a TURN REST API username, read the way coturn reads it:
/// the part before the first `:` when it is all digits, else the part after it.
pub fn ephemeral_expiry(username: &str) -> Option<u64> {
    let digits = |s: &str| -> Option<u64> {
        if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    match username.split_once(':') {
        None => digits(username),
        Some((first, rest)) => digits(first).or_else(|| {
            // coturn's `USER:EXPIRY`: the timestamp follows the first separator.
            digits(rest)
        }),
    }
}

/// `MD5(username:realm:password)`, the long-term credential key.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> Vec<u8> {
    turn::auth::generate_auth_key(username, realm, password)
}

/// Looks up the long-term key of a username, per `turn.auth`. Clones share the
/// credentials, which [`Authenticator::update`] replaces for all of them (reload).
#[derive(Clone)]
pub struct Authenticator {
    realm: String,
    kind: Arc<ArcSwap<Kind>>,
}

#[derive(Clone)]
enum Kind {
    Static(HashMap<String, Vec<u8>>),
    /// Every secret that verifies; the first signs.
    Ephemeral(Vec<String>),
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets or keys.
        let kind = match &**self.kind.load() {
            Kind::Static(users) => format!("static ({} users)", users.len()),
            Kind::Ephemeral(s) => format!("ephemeral ({} secrets)", s.len()),
        };
        f.debug_struct("Authenticator")
            .field("realm", &self.realm)
            .field("kind", &kind)
            .finish()
    }
}

impl Authenticator {
    /// Builds the authenticator; fails when the auth type lacks its secret or users.
    pub fn new(realm: &str, auth: &TurnAuthConfig) -> Result<Self, String> {
        let kind = Self::kind(realm, auth)?;
        Ok(Authenticator {
            realm: realm.to_string(),
            kind: Arc::new(ArcSwap::from_pointee(kind)),
        })
    }

    /// Replaces the credentials (users or secrets; the realm stays) for every clone;
    /// requests authenticated from then on use the new ones. Fails, changing nothing, as
    /// [`Authenticator::new`] does.
    pub fn update(&self, auth: &TurnAuthConfig) -> Result<(), String> {
        let kind = Self::kind(&self.realm, auth)?;
        self.kind.store(Arc::new(kind));
        Ok(())
    }

    fn kind(realm: &str, auth: &TurnAuthConfig) -> Result<Kind, String> {
        Ok(match auth.kind {
            TurnAuthType::Static => {
                if auth.users.is_empty() {
                    return Err("turn.auth: type static needs at least one user".into());
                }
                let users = auth
                    .users
                    .iter()
                    .map(|u| {
                        (
                            u.username.clone(),
                            long_term_key(&u.username, realm, &u.password),
                        )
                    })
                    .collect();
                Kind::Static(users)
            }
            TurnAuthType::Ephemeral => {
                let secrets = auth.all_secrets();
                if secrets.is_empty() || secrets.iter().any(|s| s.is_empty()) {
                    return Err("turn.auth: type ephemeral needs a non-empty secret".into());
                }
                Kind::Ephemeral(secrets.into_iter().map(String::from).collect())
            }
        })
    }

    /// The configured realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The key for `username` in `realm` at time `now` (with several ephemeral secrets,
    /// the one of the signing secret), or why there is none.
    pub fn key(
        &self,
        username: &str,
        realm: &str,
        now: SystemTime,
    ) -> Result<Vec<u8>, AuthFailure> {
        self.keys(username, realm, now)
            .map(|mut k| k.swap_remove(0))
    }

    /// Every key `username` may be using in `realm` at time `now`: one per configured
    /// ephemeral secret (rotation: the first signs, all verify), or the static user's
    /// key. Never empty on success.
    pub fn keys(
        &self,
        username: &str,
        realm: &str,
        now: SystemTime,
    ) -> Result<Vec<Vec<u8>>, AuthFailure> {
        if realm != self.realm {
            return Err(AuthFailure::RealmMismatch);
        }
        match &**self.kind.load() {
            Kind::Static(users) => users
                .get(username)
                .cloned()
                .map(|k| vec![k])
                .ok_or(AuthFailure::UnknownUser),
            Kind::Ephemeral(secrets) => {
                let expiry = ephemeral_expiry(username).ok_or(AuthFailure::BadUsername)?;
                let now_secs = now
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if expiry < now_secs {
                    return Err(AuthFailure::Expired);
                }
                Ok(secrets
                    .iter()
                    .map(|secret| {
                        let password = ephemeral_password(secret, username);
                        long_term_key(username, realm, &password)
                    })
                    .collect())
            }
        }
    }
}

/// The `turn` crate's hook; only used if the crate ever authenticates by itself (the
/// service authenticates every request before the crate sees it).
impl turn::auth::AuthHandler for Authenticator {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        _src_addr: std::net::SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        self.key(username, realm, SystemTime::now())
            .map_err(|e| turn::Error::Other(e.as_str().to_string()))
    }
}

/// Issues and checks stateless nonces bound to the client IP.
pub(crate) struct Nonces {
    key: [u8; 32],
}

impl Nonces {
    pub(crate) fn new() -> Self {
        Nonces {
            key: rand::random(),
        }
    }

    fn mac(&self, issued: u64, ip: IpAddr) -> u64 {
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &self.key);
        let mut mac = hmac::Context::with_key(&key);
        mac.update(&issued.to_be_bytes());
        match ip {
            IpAddr::V4(v4) => mac.update(&v4.octets()),
            IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        let out = mac.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out.as_ref()[..8]);
        u64::from_be_bytes(first)
    }

    /// A fresh nonce for a client.
    pub(crate) fn issue(&self, ip: IpAddr, now: SystemTime) -> String {
        let issued = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("{issued:016x}{:016x}", self.mac(issued, ip))
    }

    /// Whether a nonce was issued by this process to `ip` and has not gone stale.
    pub(crate) fn is_valid(&self, nonce: &str, ip: IpAddr, now: SystemTime) -> bool {
        if nonce.len() != 32 || !nonce.is_ascii() {
            return false;
        }
        let (Ok(issued), Ok(mac)) = (
            u64::from_str_radix(&nonce[..16], 16),
            u64::from_str_radix(&nonce[16..], 16),
        ) else {
            return false;
        };
        if mac != self.mac(issued, ip) {
            return false;
        }
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        issued <= now.saturating_add(1) && now - issued.min(now) < NONCE_LIFETIME.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TurnUser;

    fn ephemeral(secret: &str) -> Authenticator {
        Authenticator::new(
            "mediagate",
            &TurnAuthConfig {
                secret_file: None,
                kind: TurnAuthType::Ephemeral,
                secret: Some(secret.into()),
                secrets: vec![],
                ttl: crate::config::Dur(Duration::from_secs(3600)),
                users: vec![],
            },
        )
        .unwrap()
    }

    #[test]
    fn rest_api_password_matches_coturn_reference_vector() {
        // `echo -n "1700000000:alice" | openssl dgst -sha1 -hmac "north" -binary | base64`
        assert_eq!(
            ephemeral_password("north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
    }

    #[test]
    fn expiry_is_read_like_coturn() {
        assert_eq!(ephemeral_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(ephemeral_expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(ephemeral_expiry("alice:1700000000"), Some(1_700_000_000));
        assert_eq!(ephemeral_expiry("1700000000:a:b"), Some(1_700_000_000));
        assert_eq!(ephemeral_expiry("alice"), None);
        assert_eq!(ephemeral_expiry(""), None);
        assert_eq!(ephemeral_expiry("99999999999999999999999:x"), None);
    }

    #[test]
    fn ephemeral_keys_expire() {
        let a = ephemeral("s3cret");
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let user = ephemeral_username(1_700_000_100, "bob");
        let key = a.key(&user, "mediagate", now).unwrap();
        let password = ephemeral_password("s3cret", &user);
        assert_eq!(key, long_term_key(&user, "mediagate", &password));
        let later = now + Duration::from_secs(101);
        assert_eq!(a.key(&user, "mediagate", later), Err(AuthFailure::Expired));
        assert_eq!(
            a.key("bob", "mediagate", now),
            Err(AuthFailure::BadUsername)
        );
        assert_eq!(a.key(&user, "other", now), Err(AuthFailure::RealmMismatch));
    }

    #[test]
    fn every_secret_verifies_during_rotation() {
        let a = Authenticator::new(
            "mediagate",
            &TurnAuthConfig {
                secret_file: None,
                kind: TurnAuthType::Ephemeral,
                secret: None,
                secrets: vec!["new".into(), "old".into()],
                ttl: crate::config::Dur(Duration::from_secs(3600)),
                users: vec![],
            },
        )
        .unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let user = ephemeral_username(1_700_000_100, "bob");
        let key_of =
            |secret: &str| long_term_key(&user, "mediagate", &ephemeral_password(secret, &user));
        let keys = a.keys(&user, "mediagate", now).unwrap();
        assert_eq!(keys, vec![key_of("new"), key_of("old")]);
        assert_eq!(a.key(&user, "mediagate", now).unwrap(), key_of("new"));
        assert!(!keys.contains(&key_of("other")));
    }

    #[test]
    fn static_users() {
        let a = Authenticator::new(
            "r",
            &TurnAuthConfig {
                secret_file: None,
                kind: TurnAuthType::Static,
                secret: None,
                secrets: vec![],
                ttl: crate::config::Dur(Duration::from_secs(3600)),
                users: vec![TurnUser {
                    username: "u".into(),
                    password: "p".into(),
                }],
            },
        )
        .unwrap();
        let now = SystemTime::now();
        assert_eq!(a.key("u", "r", now).unwrap(), long_term_key("u", "r", "p"));
        assert_eq!(a.key("x", "r", now), Err(AuthFailure::UnknownUser));
        let shown = format!("{a:?}");
        assert!(
            shown.contains("static (1 users)") && !shown.contains("\"p\""),
            "{shown}"
        );
    }

    #[test]
    fn nonces_are_bound_to_ip_and_time() {
        let n = Nonces::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = SystemTime::now();
        let nonce = n.issue(ip, now);
        assert!(n.is_valid(&nonce, ip, now));
        assert!(!n.is_valid(&nonce, "192.0.2.2".parse().unwrap(), now));
        assert!(!n.is_valid(&nonce, ip, now + NONCE_LIFETIME + Duration::from_secs(1)));
        assert!(!n.is_valid("garbage", ip, now));
        assert!(!n.is_valid(&"é".repeat(16), ip, now));
        assert!(
            !Nonces::new().is_valid(&nonce, ip, now),
            "another process key"
        );
    }
}
