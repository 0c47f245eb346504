//! TURN over TLS (`turns:`, RFC 8656 §3.1): the certificate of a `tls` listener and its
//! renewal in place.
//!
//! [`CertStore`] loads `cert` (a PEM chain) and `key` (a PEM private key: PKCS#8, PKCS#1
//! or SEC1) and is the rustls certificate resolver, so the certificate can be swapped
//! under running connections. [`CertStore::watch`] polls both files every
//! [`CERT_POLL`] (modification time and size; cert-manager rewrites the Secret's files in
//! place through a symlink swap) and loads them again when they change: new handshakes get
//! the new certificate, established connections and their allocations are untouched. A
//! file that fails to load keeps the previous certificate in use (logged, counted in
//! `mediagate_turn_tls_cert_reloads_total{result="error"}`) and is retried at the next
//! change.

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::metrics::TurnMetrics;

/// How often certificate files are checked for changes.
pub(crate) const CERT_POLL: Duration = Duration::from_secs(2);
/// A TLS handshake must complete within this time.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What identifies a version of the files: modification time and length of each.
pub(crate) type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

pub(crate) fn stamp(cert: &Path, key: &Path) -> Stamp {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key.
fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let (chain, key_der) = crate::tlsclient::read_chain_and_key(cert, key)?;
    CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))
}

/// The certificate of one `tls` listener, swappable while connections run.
#[derive(Debug)]
pub(crate) struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Loads the files; fails (with the file named) when they do not hold a certificate
    /// chain and its matching key.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, String> {
        let ck = load(cert, key)?;
        Ok(Arc::new(CertStore {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
        }))
    }

    /// A TLS acceptor serving this store's current certificate (TLS 1.2 and 1.3).
    pub(crate) fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Polls the files until `stop` and loads them again when they change.
    pub(crate) async fn watch(self: Arc<Self>, metrics: TurnMetrics, stop: CancellationToken) {
        watch_files(
            &self.cert,
            &self.key,
            &self.current,
            load,
            "TLS",
            metrics,
            stop,
        )
        .await
    }
}

/// Polls `cert` and `key` every [`CERT_POLL`] until `stop`; when they change, loads them
/// with `load` (off the runtime) into `current`. A pair that does not load is counted and
/// logged, and the previous certificate stays in use. `what` names the listener kind in logs.
pub(crate) async fn watch_files<T: Send + Sync + 'static>(
    cert: &Path,
    key: &Path,
    current: &ArcSwap<T>,
    load: fn(&Path, &Path) -> Result<T, String>,
    what: &'static str,
    metrics: TurnMetrics,
    stop: CancellationToken,
) {
    let mut seen = stamp(cert, key);
    let mut tick = tokio::time::interval(CERT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(cert, key);
        if now == seen || now.is_none() {
            continue;
        }
        seen = now;
        let (c, k) = (cert.to_path_buf(), key.to_path_buf());
        match tokio::task::spawn_blocking(move || load(&c, &k)).await {
            Ok(Ok(loaded)) => {
                current.store(Arc::new(loaded));
                metrics.cert_reloads_ok.inc();
                tracing::info!(cert = %cert.display(), "TURN {what} certificate reloaded");
            }
            Ok(Err(e)) => {
                metrics.cert_reloads_failed.inc();
                tracing::warn!(error = %e, "TURN {what} certificate changed but does not load; the previous one stays in use");
            }
            Err(_) => {}
        }
    }
}
