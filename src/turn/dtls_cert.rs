//! The certificate of a `dtls` TURN listener ([`DtlsCert`]): `cert` (PEM chain) and `key`
//! (PEM, ECDSA P-256 in PKCS#8 or SEC1, or Ed25519 in PKCS#8: webrtc-rs's `dtls` crate
//! signs with these only), polled like the TLS certificate and swapped for new handshakes;
//! established sessions and their allocations are untouched. Apart from the DTLS
//! transport (`dtls`) because it is all file and key handling.

use ::dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use ::dtls::crypto::{Certificate, CryptoPrivateKey, CryptoPrivateKeyKind};
use arc_swap::ArcSwap;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use rustls_pki_types::PrivateKeyDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::metrics::TurnMetrics;

/// The DER of a PKCS#8 document wrapping a SEC1 P-256 private key.
fn sec1_p256_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    fn der_len(n: usize, out: &mut Vec<u8>) {
        if n < 0x80 {
            out.push(n as u8);
        } else if n <= 0xff {
            out.extend([0x81, n as u8]);
        } else {
            out.extend([0x82, (n >> 8) as u8, n as u8]);
        }
    }
    // version 0, AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const HEAD: [u8; 24] = [
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
        0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut octets = vec![0x04];
    der_len(sec1.len(), &mut octets);
    octets.extend_from_slice(sec1);
    let mut out = vec![0x30];
    der_len(HEAD.len() + octets.len(), &mut out);
    out.extend_from_slice(&HEAD);
    out.extend_from_slice(&octets);
    out
}

/// A private key the `dtls` crate can sign with, from PKCS#8 DER.
fn private_key(pkcs8: Vec<u8>) -> Result<CryptoPrivateKey, String> {
    if let Ok(k) = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    ) {
        return Ok(CryptoPrivateKey {
            kind: CryptoPrivateKeyKind::Ecdsa256(k),
            serialized_der: pkcs8,
        });
    }
    if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8) {
        return Ok(CryptoPrivateKey {
            kind: CryptoPrivateKeyKind::Ed25519(k),
            serialized_der: pkcs8,
        });
    }
    Err("a dtls listener needs an ECDSA P-256 or Ed25519 private key, not RSA".to_string())
}

/// Reads a certificate chain and its key for DTLS.
fn load(cert: &Path, key: &Path) -> Result<Certificate, String> {
    let (chain, der) = crate::tlsclient::read_chain_and_key(cert, key)?;
    let pkcs8 = match der {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => sec1_p256_to_pkcs8(k.secret_sec1_der()),
        _ => {
            return Err(format!(
                "{}: a dtls listener needs an ECDSA P-256 or Ed25519 private key (PKCS#8 or SEC1), not RSA",
                key.display()
            ));
        }
    };
    let private_key = private_key(pkcs8).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Certificate {
        certificate: chain,
        private_key,
    })
}

/// The certificate of one `dtls` listener, swappable while sessions run.
pub(crate) struct DtlsCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Certificate>,
}

impl DtlsCert {
    /// Loads the files; fails (with the file named) when they do not hold a certificate
    /// chain and a key the `dtls` crate can use.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<DtlsCert>, String> {
        let c = load(cert, key)?;
        Ok(Arc::new(DtlsCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(c),
        }))
    }

    /// The configuration of one new server handshake, with the current certificate.
    pub(crate) fn config(&self) -> DtlsConfig {
        DtlsConfig {
            certificates: vec![(**self.current.load()).clone()],
            extended_master_secret: ExtendedMasterSecretType::Request,
            ..Default::default()
        }
    }

    /// Polls the files until `stop` and loads them again when they change.
    pub(crate) async fn watch(self: Arc<Self>, metrics: TurnMetrics, stop: CancellationToken) {
        let (cert, key, current) = (&self.cert, &self.key, &self.current);
        super::tls::watch_files(cert, key, current, load, "DTLS", metrics, stop).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_sec1_and_pkcs8_p256_keys_and_refuses_rsa() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok, "openssl {args:?}");
        };
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.key",
        ]);
        run(&[
            "pkcs8", "-topk8", "-nocrypt", "-in", "sec1.key", "-out", "p8.key",
        ]);
        run(&["genrsa", "-out", "rsa.key", "2048"]);
        for key in ["sec1.key", "p8.key"] {
            run(&[
                "req", "-x509", "-key", key, "-days", "1", "-subj", "/CN=t", "-out", "c.crt",
            ]);
            let c = load(&dir.path().join("c.crt"), &dir.path().join(key)).expect(key);
            assert!(matches!(
                c.private_key.kind,
                CryptoPrivateKeyKind::Ecdsa256(_)
            ));
        }
        run(&[
            "req", "-x509", "-key", "rsa.key", "-days", "1", "-subj", "/CN=t", "-out", "r.crt",
        ]);
        let e = load(&dir.path().join("r.crt"), &dir.path().join("rsa.key")).unwrap_err();
        assert!(e.contains("not RSA"), "{e}");
    }
}
