//! `*_file` keys: secrets read from files instead of written into the configuration, so a
//! Kubernetes Secret mounted as files (rather than passed as environment variables) can be
//! rotated in place. `admin.token_file`, `admin.events_token_file`, `turn.auth.secret_file`,
//! `turn.ice.token_file` and `cluster.secret_file` are read while the configuration loads
//! and fill the key they stand for; the files read are remembered with a fingerprint of
//! their content ([`Config::secret_files`]) so that the running process can notice a change
//! and reload (`crate::app`), exactly as an edit of the configuration file would.
//!
//! Reads are bounded ([`MAX_SECRET_FILE`]); a file that cannot be read, is too large or
//! empty is a configuration error at the `*_file` key, like any other bad value.

use super::types::Config;
use super::validate::Issue;
use std::io::Read;

/// Longest secret file read (bytes); a longer one is an error, never read whole.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

pub use super::values::SecretFile;

/// Reads at most [`MAX_SECRET_FILE`] bytes of `path` as UTF-8.
fn read_bounded(path: &str) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!("{path} is larger than {MAX_SECRET_FILE} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8 text"))
}

/// FNV-1a of a file's content, never 0 for a readable file; 0 when it cannot be read (or is
/// over [`MAX_SECRET_FILE`]). What the reload watcher compares.
pub fn fingerprint(path: &str) -> u64 {
    read_bounded(path).map(|t| hash(&t)).unwrap_or(0)
}

fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) | 1
}

/// The non-empty lines of a secret file, trimmed (a trailing newline is no part of a secret).
fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

struct Resolver<'a> {
    read: &'a mut Vec<SecretFile>,
    issues: Vec<Issue>,
}

impl Resolver<'_> {
    fn issue(&mut self, path: &str, message: String) {
        self.issues.push(Issue {
            path: path.to_string(),
            message,
        });
    }

    /// The lines of the file at `key` (its path in `file`), remembered for the watcher;
    /// `None` after an issue.
    fn lines(&mut self, key: &str, file: &str) -> Option<Vec<String>> {
        match read_bounded(file) {
            Ok(text) => {
                self.read.push(SecretFile {
                    path: file.to_string(),
                    hash: hash(&text),
                });
                let lines = lines(&text);
                if lines.is_empty() {
                    self.issue(key, format!("{file} is empty"));
                    return None;
                }
                Some(lines)
            }
            Err(e) => {
                self.issue(key, e);
                None
            }
        }
    }

    /// A single-value secret (a token): `file`'s one line goes into `value`.
    fn single(
        &mut self,
        key: &str,
        target: &str,
        file: &Option<String>,
        value: &mut Option<String>,
    ) {
        let Some(file) = file else { return };
        if value.is_some() {
            self.issue(key, format!("set either {target} or {key}, not both"));
            return;
        }
        if let Some(mut lines) = self.lines(key, file) {
            if lines.len() > 1 {
                self.issue(
                    key,
                    format!("{file} has {} lines; the token is one line", lines.len()),
                );
                return;
            }
            *value = lines.pop();
        }
    }
}

/// Reads every `*_file` key of `config` into the key it stands for and records the files in
/// `config.secret_files`. Returns the problems (at the `*_file` key); a key whose file failed
/// stays unset, and the paths it would have filled are in the second list (their "missing"
/// complaints would only repeat the problem).
pub(super) fn resolve(config: &mut Config) -> (Vec<Issue>, Vec<&'static str>) {
    let mut read = Vec::new();
    let mut r = Resolver {
        read: &mut read,
        issues: Vec::new(),
    };
    let admin = &mut config.admin;
    r.single(
        "admin.token_file",
        "admin.token",
        &admin.token_file,
        &mut admin.token,
    );
    r.single(
        "admin.events_token_file",
        "admin.events_token",
        &admin.events_token_file,
        &mut admin.events_token,
    );
    if let Some(turn) = config.turn.as_mut() {
        r.single(
            "turn.ice.token_file",
            "turn.ice.token",
            &turn.ice.token_file,
            &mut turn.ice.token,
        );
        let auth = &mut turn.auth;
        if let Some(file) = auth.secret_file.clone() {
            let key = "turn.auth.secret_file";
            if auth.kind != super::TurnAuthType::Ephemeral {
                r.issue(
                    key,
                    "a secret file is only used with auth type ephemeral".to_string(),
                );
            } else if auth.secret.is_some() || !auth.secrets.is_empty() {
                r.issue(
                    key,
                    "set one of secret, secrets and secret_file".to_string(),
                );
            } else if let Some(mut lines) = r.lines(key, &file) {
                // One line: the secret. Several: `secrets` (the first signs, all verify).
                if lines.len() == 1 {
                    auth.secret = lines.pop();
                } else {
                    auth.secrets = lines;
                }
            }
        }
    }
    if let Some(c) = config.cluster.as_mut()
        && let Some(file) = c.secret_file.clone()
    {
        let key = "cluster.secret_file";
        if !c.secret.is_empty() {
            r.issue(
                key,
                "set either cluster.secret or cluster.secret_file, not both".to_string(),
            );
        } else if let Some(mut lines) = r.lines(key, &file) {
            if lines.len() > 1 {
                r.issue(
                    key,
                    format!("{file} has {} lines; the secret is one line", lines.len()),
                );
            } else {
                c.secret = lines.pop().unwrap_or_default();
            }
        }
    }
    let issues = r.issues;
    let mut shadowed = Vec::new();
    for i in &issues {
        shadowed.extend(match i.path.as_str() {
            "admin.token_file" => &["admin.token"][..],
            "admin.events_token_file" => &["admin.events_token"][..],
            "turn.ice.token_file" => &["turn.ice.token"][..],
            "turn.auth.secret_file" => &["turn.auth.secret", "turn.auth.secrets"][..],
            "cluster.secret_file" => &["cluster.secret"][..],
            _ => &[][..],
        });
    }
    config.secret_files = read;
    (issues, shadowed)
}

#[cfg(test)]
mod tests {
    use crate::config::load_str_with_env;

    fn load(yaml: &str) -> Result<crate::config::Config, String> {
        load_str_with_env(yaml, "t.yaml", &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn files_fill_their_keys_and_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, sec) = (dir.path().join("tok"), dir.path().join("sec"));
        std::fs::write(&tok, "t0ken\n").unwrap();
        std::fs::write(&sec, "new-secret\n\nold-secret\n").unwrap();
        let c = load(&format!(
            "admin: {{ token_file: {} }}\nturn:\n  public_address: 127.0.0.1\n  listeners: [{{ protocol: udp, listen: 127.0.0.1:3478 }}]\n  auth: {{ type: ephemeral, secret_file: {} }}\n",
            tok.display(),
            sec.display()
        ))
        .unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("t0ken"));
        let auth = &c.turn.as_ref().unwrap().auth;
        assert_eq!(auth.secret, None);
        assert_eq!(auth.secrets, ["new-secret", "old-secret"]);
        assert_eq!(c.secret_files.len(), 2);
        assert_eq!(
            c.secret_files[0].hash,
            super::fingerprint(&tok.display().to_string())
        );
    }

    #[test]
    fn bad_files_are_errors_at_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let two = dir.path().join("two");
        std::fs::write(&two, "a\nb\n").unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; super::MAX_SECRET_FILE as usize + 1]).unwrap();
        let e = load(&format!(
            "admin:\n  token: x\n  token_file: {two}\n  events_token_file: {two}\ncluster:\n  listen: 127.0.0.1:7946\n  secret_file: {big}\n",
            two = two.display(),
            big = big.display()
        ))
        .unwrap_err();
        assert!(
            e.contains("t.yaml:3:15: admin.token_file: set either admin.token or admin.token_file"),
            "{e}"
        );
        assert!(
            e.contains("admin.events_token_file: ") && e.contains("has 2 lines"),
            "{e}"
        );
        assert!(
            e.contains("cluster.secret_file: ") && e.contains("larger than 65536 bytes"),
            "{e}"
        );
        // The shadowed key does not complain again.
        assert!(!e.contains("cluster.secret: "), "{e}");
        let e = load("turn:\n  public_address: 127.0.0.1\n  listeners: [{ protocol: udp, listen: 127.0.0.1:3478 }]\n  auth: { type: ephemeral, secret_file: /nonexistent/s }\n").unwrap_err();
        assert!(
            e.contains("turn.auth.secret_file: cannot read /nonexistent/s"),
            "{e}"
        );
        assert!(!e.contains("needs a secret"), "{e}");
    }
}
