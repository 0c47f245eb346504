//! TLS for the HTTP clients: the `type: http` health probe with `health.tls: true`, the
//! CLI talking to an `https://` admin endpoint, and `https://` webhooks.
//!
//! rustls with the ring provider (what the `kube` client and the `turn`/`stun` crates
//! already use, so nothing new is compiled) and the system's CA certificates
//! (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`). Without verification
//! (`health.tls_verify: false`, for self-signed Janus admin certificates) the server's
//! certificate is accepted whatever it is, but the handshake signatures are still checked.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration: `verify` checks the server's certificate against the system's
/// CA certificates and the server name. Built once per kind and shared.
pub fn client_config(verify: bool) -> Arc<ClientConfig> {
    static VERIFYING: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    static ACCEPTING: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    let cell = if verify { &VERIFYING } else { &ACCEPTING };
    cell.get_or_init(|| Arc::new(build(verify))).clone()
}

/// A verifying client configuration that trusts the CA certificates of a PEM file (and
/// nothing else), e.g. `events.webhooks[].ca`; `pem` is the file's content, `path` names
/// it in errors.
pub fn client_config_with_ca(path: &str, pem: &[u8]) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("{path}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{path}: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{path}: no PEM certificate in the file"));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn build(verify: bool) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3");
    if verify {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "reading the system's CA certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "CA certificates for TLS clients");
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth()
    }
}

/// The name the server's certificate is checked against (and sent as SNI when it is a
/// host name): an IP address or a DNS name.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(bare.to_string()).map_err(|_| format!("invalid TLS server name {name:?}"))
}

/// Runs the TLS handshake over `stream`.
pub async fn connect<S>(
    stream: S,
    name: ServerName<'static>,
    verify: bool,
) -> std::io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    TlsConnector::from(client_config(verify))
        .connect(name, stream)
        .await
}

/// Accepts any certificate; still verifies that the handshake was signed by its key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A self-signed certificate and a one-response HTTPS server, for the tests of the https
/// probe and the CLI. The certificate is made by the `openssl` command at test time.
/// The largest certificate, key or CA file read: far above any real chain (a few KiB),
/// far below what would hurt.
pub const MAX_PEM_FILE: u64 = 512 * 1024;

/// A PEM certificate chain (at least one certificate) and its private key, each read
/// with [`read_pem_file`]; errors name the file. For the TLS and DTLS servers.
pub fn read_chain_and_key(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    let pem = read_pem_file(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let key_pem = read_pem_file(key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok((chain, key_der))
}

/// Reads a PEM file (a certificate chain, a key, CA certificates) with bounds: a regular
/// file only (a device such as `/dev/zero` or `/dev/urandom`, a pipe or a socket behind a
/// symlink is refused before a byte is read, so nothing can feed the reader forever or
/// block it) of at most [`MAX_PEM_FILE`] bytes. The error names the file.
pub fn read_pem_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let named = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    // O_NONBLOCK: opening a FIFO for reading does not wait for a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| named(&e))?;
    let meta = f.metadata().map_err(|e| named(&e))?;
    if !meta.is_file() {
        return Err(named(
            &"not a regular file (a device, pipe or socket is refused)",
        ));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(named(&format!(
            "{} bytes: larger than {MAX_PEM_FILE} (not a certificate or key file)",
            meta.len()
        )));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| named(&e))?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(named(&format!("larger than {MAX_PEM_FILE} bytes")));
    }
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod testserver {
    use rustls::ServerConfig;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::net::SocketAddr;
    use std::process::Command;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A certificate for `localhost` and 127.0.0.1 (not a CA), and its PKCS#8 key.
    pub fn self_signed() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("the openssl command (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-outform",
            "DER",
            "-out",
            "cert.der",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "2",
        ]);
        run(&[
            "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der",
        ]);
        let cert = std::fs::read(dir.path().join("cert.der")).unwrap();
        let key = std::fs::read(dir.path().join("key.der")).unwrap();
        (
            CertificateDer::from(cert),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
    }

    /// Serves HTTPS on loopback: each connection gets `response` after its request head,
    /// then is closed. Runs until the test's runtime ends.
    pub async fn serve(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        response: &'static [u8],
    ) -> SocketAddr {
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tls.write_all(response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }
}
