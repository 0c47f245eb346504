//! The small value types every part of the configuration shares: durations as written
//! (`250ms`), the transport of a listener, the fast-path switch, serde defaults, and the
//! record of a secret file read at load time. They live apart from the file's shape
//! (`types`) so the sections (`health`, `turn`, ...) and the whole file (`types`) import
//! them one way.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// Transport of a listener.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Each accepted connection is a session.
    Tcp,
    /// Each client `ip:port` is a session.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// `listeners[].offload`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// Every datagram goes through user space.
    #[default]
    None,
    /// The kernel fast path (eBPF) forwards established UDP sessions.
    Ebpf,
}

/// A duration written as `250ms`, `5s`, `2m` (humantime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration itself.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("invalid duration {s:?}"));
        // humantime accepts "10 ms"; the documented syntax writes a number and its unit together and
        // calls "10 ms" invalid. Spaces between whole terms ("2m 30s") stay allowed.
        let t = s.trim();
        if t.as_bytes()
            .windows(2)
            .any(|w| w[0].is_ascii_digit() && w[1].is_ascii_whitespace())
        {
            return Err(bad());
        }
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|_| bad())
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

pub(crate) fn default_true() -> bool {
    true
}

/// A secret file the configuration was built from (`*_file` keys, see `super::secret_files`),
/// and a fingerprint of what was read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecretFile {
    pub path: String,
    /// `super::secret_files::fingerprint` of the content read at load time.
    pub hash: u64,
}
