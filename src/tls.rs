//! TLS with rustls (ring provider): server certificates from PEM files, reloadable without
//! dropping connections (the resolver hands out the current certificate per handshake), and
//! the client configuration for `https://` upstreams (system-independent webpki roots, or a
//! configured CA bundle; verification cannot be turned off).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its private key, with errors naming the file.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM in certificate file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate file {} holds no CERTIFICATE block",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("unsupported private key in {}: {e}", key.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "the key in {} does not match the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(ck)
}

/// The current certificate of a listener; `reload` swaps it in place.
#[derive(Debug)]
pub struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        let ck = load_certified_key(cert_path, key_path)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(ck)),
        })
    }

    /// Reads the files again; on error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let ck = load_certified_key(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        Ok(())
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

/// Server configuration offering HTTP/2 and HTTP/1.1 by ALPN, sending `tickets` TLS 1.3
/// session tickets after each handshake.
///
/// One ticket is enough for a client whose connections follow one another: each resumed
/// connection brings the ticket of the next (OpenSSL servers also send one after a
/// resumption). rustls' default of two makes every new connection cost the client a second
/// ticket to decrypt and store, which it measurably pays for when it opens many (see
/// BENCHMARKS.md); a client that opens connections in parallel and uses each ticket once
/// (rustls' client) needs as many tickets as parallel connections to resume them all.
pub fn server_config(cert: Arc<ReloadableCert>, tickets: usize) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.send_tls13_tickets = tickets;
    // Stateless resumption: session tickets sealed with keys that rotate every 6 hours. The
    // in-memory session cache alone (256 sessions) forgets sessions as soon as more clients
    // than it holds reconnect, and each of them then pays a full handshake. None at all with
    // `tickets` 0: no TLS 1.2 ticket either (a TLS 1.2 session then resumes by its id, from the
    // cache).
    if tickets > 0 {
        match rustls::crypto::ring::Ticketer::new() {
            Ok(ticketer) => config.ticketer = ticketer,
            Err(e) => {
                tracing::warn!(error = %e, "TLS session tickets unavailable; sessions resume from the in-memory cache only")
            }
        }
    }
    Arc::new(config)
}

/// Client configuration for upstreams: the CA bundle at `ca` when given, else the webpki roots.
pub fn client_config(ca: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA bundle {}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("invalid PEM in CA bundle {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "CA bundle {} holds no usable certificate",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}
