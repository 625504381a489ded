//! TLS on the listeners (HTTP/2 by ALPN), https upstreams (HTTP/2 where offered, verified
//! against a CA), certificate reload on SIGHUP, and WebSocket through the gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::observability::spawn;
use crate::support::{ADMIN_KEY, Gateway, Upstream, config_text};

/// A CA and a certificate for localhost/127.0.0.1 signed by it, as PEM files in `dir`.
pub(crate) struct Pki {
    pub ca_pem: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_der: Vec<u8>,
}

pub(crate) fn pki(dir: &Path, name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("cert.pem"), cert.pem()).unwrap();
    std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
    Pki {
        ca_pem: p("ca.pem"),
        cert: p("cert.pem"),
        key: p("key.pem"),
        ca_der: ca.der().to_vec(),
    }
}

/// `check-config` reads the listeners' certificates and keys and the CA bundles as `serve`
/// does: a file that is there but not PEM, a key of another certificate or a bundle without a
/// certificate is refused naming the field, where it passed before (and `serve` then failed).
#[test]
fn check_config_refuses_tls_files_serve_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (pki(dir.path(), "a"), pki(dir.path(), "b"));
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a PEM file\n").unwrap();
    let path = dir.path().join("keygate.toml");
    // `proxy` lines go into the test configuration's `[proxy]` table.
    let check =
        |proxy: String| {
            // Anything from a table header on goes at the end.
            let (proxy, extra) = match proxy.find('[') {
                Some(i) => (proxy[..i].to_owned(), proxy[i..].to_owned()),
                None => (proxy, String::new()),
            };
            let text = config_text("http://127.0.0.1:9", &dir.path().join("k.db"), &extra)
                .replacen("[proxy]\n", &format!("[proxy]\n{proxy}"), 1);
            std::fs::write(&path, text).unwrap();
            let out = crate::support::binary::Binary::command(["check-config", "--config"])
                .arg(&path)
                .output();
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!text.contains("PRIVATE KEY"), "a key shown: {text}");
            (out.status.success(), text)
        };
    let listener = |cert: &Path, key: &Path| {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    for fields in [String::new(), listener(&a.cert, &a.key)] {
        let (ok, text) = check(fields);
        assert!(ok, "{text}");
    }
    for (what, fields, field) in [
        (
            "a key of another certificate",
            listener(&a.cert, &b.key),
            "proxy:",
        ),
        (
            "a certificate that is not PEM",
            listener(&not_pem, &a.key),
            "proxy:",
        ),
        (
            "a CA bundle that is not PEM",
            format!("upstream_ca = \"{}\"\n", not_pem.display()),
            "proxy.upstream_ca:",
        ),
        (
            "a webhook CA bundle without a certificate",
            format!("[events]\nca_file = \"{}\"\n", a.key.display()),
            "events.ca_file:",
        ),
    ] {
        let (ok, text) = check(fields);
        assert!(!ok && text.contains(field), "{what}: {text}");
    }
}

fn client_tls(ca_der: &[u8]) -> rustls::ClientConfig {
    client_tls_versions(ca_der, rustls::DEFAULT_VERSIONS)
}

/// [`client_tls`] offering only the protocol `versions`.
fn client_tls_versions(
    ca_der: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn https_client(
    ca_der: &[u8],
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(ca_der))
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

fn with_proxy_tls(text: String, pki: &Pki) -> String {
    text.replace(
        "[admin]",
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n[admin]",
            pki.cert.display(),
            pki.key.display()
        ),
    )
}

/// A gateway serving its proxy over TLS, with `proxy_lines` added to `[proxy]`; its PKI and
/// the key of a client "acme".
async fn tls_gateway(proxy_lines: &str) -> (Gateway, Pki, String) {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "proxy");
    let text = with_proxy_tls(
        config_text(&upstream.url(), &dir.path().join("k.db"), ""),
        &pki,
    )
    .replace("[admin]", &format!("{proxy_lines}[admin]"));
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    (gw, pki, key)
}

#[tokio::test]
async fn https_and_http2_through_the_proxy_with_a_key() {
    let (gw, pki, key) = tls_gateway("").await;

    let client = https_client(&pki.ca_der);
    let port = gw.proxy.port();
    let req = http::Request::get(format!("https://localhost:{port}/secure"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2, "ALPN should pick h2");
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/secure");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(!seen.headers.contains_key("authorization"));

    // No key over TLS: 401, nothing upstream.
    let before = gw.upstream.count();
    let req = http::Request::get(format!("https://localhost:{port}/secure"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 401);
    assert_eq!(gw.upstream.count(), before);
}

pub(crate) fn upstream_tls(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let cert = keygate::tls::ReloadableCert::load(&pki.cert, &pki.key).unwrap();
    keygate::tls::server_config(Arc::new(cert), keygate::config::DEFAULT_TLS_SESSION_TICKETS)
}

/// A gateway in front of an `https://` upstream (HTTP/2 and HTTP/1.1 by ALPN) signed by a CA
/// it is given (`upstream_ca`); the key of a client "acme".
async fn https_upstream_gateway() -> (Gateway, String) {
    let dir = tempfile::tempdir().unwrap();
    let up_pki = pki(dir.path(), "upstream");
    let upstream = Upstream::start_with_tls(Some(upstream_tls(&up_pki))).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let text = config_text(&url, &dir.path().join("k.db"), "").replace(
        "[admin]",
        &format!("upstream_ca = \"{}\"\n[admin]", up_pki.ca_pem.display()),
    );
    let gw = Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    (gw, key)
}

#[tokio::test]
async fn https_upstreams_are_verified_and_spoken_to_in_http2() {
    let (gw, key) = https_upstream_gateway().await;
    let r = gw.get_with_key("/over-tls", &key).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = gw.upstream.last();
    // HTTP/2 carries the target as :scheme/:authority/:path.
    assert_eq!(seen.uri.parse::<http::Uri>().unwrap().path(), "/over-tls");
    assert_eq!(
        seen.version,
        http::Version::HTTP_2,
        "h2 to an upstream that offers it"
    );
}

#[tokio::test]
async fn an_upstream_signed_by_another_ca_is_a_502_with_a_clear_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let up_pki = pki(dir.path(), "upstream");
    let other = pki(dir.path(), "other");
    let upstream = Upstream::start_with_tls(Some(upstream_tls(&up_pki))).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let text = config_text(&url, &dir.path().join("k.db"), "").replace(
        "[admin]",
        &format!("upstream_ca = \"{}\"\n[admin]", other.ca_pem.display()),
    );
    let mut p = spawn(&text, dir.path());
    let key = admin_client_key(&p.admin).await;
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{}/x", p.proxy))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = c.request(req).await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(upstream.count(), 0, "the untrusted upstream got a request");
    assert!(p.terminate().success());
    let lines = p.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("upstream request failed") && l.contains("certificate")),
        "no log line naming the certificate problem: {lines:#?}"
    );
}

/// One HTTP/1.1 request over an open TLS stream; returns the status line.
async fn tls_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    key: &str,
) -> String {
    s.write_all(
        format!("GET /again HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(s).await;
    // Drain the JSON body by its length.
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    head.lines().next().unwrap().to_owned()
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n == 1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A client configuration offering HTTP/1.1 only; connections made with the same one share
/// its session cache (a reconnection may resume).
fn h1_client_tls(ca_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut cfg = client_tls(ca_der);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn tls_connect(
    addr: &std::net::SocketAddr,
    ca_der: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_with(addr, h1_client_tls(ca_der)).await
}

/// A TLS connection with `cfg` (its session cache: a second connection may resume).
async fn tls_connect_with(
    addr: &std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

fn peer_cert(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A client that reconnects resumes its TLS session however many other clients connected in
/// between: the session cache alone (256 sessions, one per connection) would have forgotten
/// the first client's after 300 others, and every reconnection past that many clients would
/// cost a full handshake.
#[tokio::test]
async fn tls_sessions_resume_past_the_session_cache() {
    let (gw, pki, key) = tls_gateway("").await;
    let first = h1_client_tls(&pki.ca_der);
    let mut s = tls_connect_with(&gw.proxy, Arc::clone(&first)).await;
    assert!(tls_get(&mut s, &key).await.contains("200"));
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    drop(s);
    // 300 other clients, one connection and one request each (their tickets read).
    for _ in 0..300 {
        let mut other = tls_connect_with(&gw.proxy, h1_client_tls(&pki.ca_der)).await;
        assert!(tls_get(&mut other, &key).await.contains("200"));
    }
    let mut again = tls_connect_with(&gw.proxy, first).await;
    assert_eq!(
        again.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the first client's session should resume"
    );
    assert!(tls_get(&mut again, &key).await.contains("200"));
}

/// A client's session store that counts the TLS 1.3 tickets it is given (kept in rustls'
/// own memory cache, so they resume as they would without the count).
mod counting {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::NamedGroup;
    use rustls::client::{
        ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue,
        Tls13ClientSessionValue,
    };
    use rustls_pki_types::ServerName;

    #[derive(Debug)]
    pub struct CountingStore {
        inner: ClientSessionMemoryCache,
        tickets: AtomicUsize,
    }

    impl CountingStore {
        pub fn new() -> std::sync::Arc<Self> {
            std::sync::Arc::new(Self {
                inner: ClientSessionMemoryCache::new(64),
                tickets: AtomicUsize::new(0),
            })
        }

        pub fn tickets(&self) -> usize {
            self.tickets.load(Ordering::SeqCst)
        }
    }

    impl ClientSessionStore for CountingStore {
        fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
            self.tickets.fetch_add(1, Ordering::SeqCst);
            self.inner.insert_tls13_ticket(name, value)
        }
        fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(name)
        }
        fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
            self.inner.set_kx_hint(name, group)
        }
        fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
            self.inner.kx_hint(name)
        }
        fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
            self.inner.set_tls12_session(name, value)
        }
        fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
            self.inner.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &ServerName<'static>) {
            self.inner.remove_tls12_session(name)
        }
    }
}

/// `[proxy] tls_session_tickets`: every handshake, full or resumed, gives the client that
/// many tickets (one by default), and a client that got one resumes its next connection; with
/// 0 it gets none and its next connection is a full handshake again.
#[tokio::test]
async fn tls_session_tickets_per_handshake_follow_the_setting() {
    for (setting, tickets) in [
        ("", 1),
        ("tls_session_tickets = 3\n", 3),
        ("tls_session_tickets = 0\n", 0),
    ] {
        let (gw, pki, key) = tls_gateway(setting).await;
        let store = counting::CountingStore::new();
        let mut cfg = client_tls(&pki.ca_der);
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.resumption = rustls::client::Resumption::store(store.clone());
        let cfg = Arc::new(cfg);
        let expected_kind = if tickets > 0 {
            rustls::HandshakeKind::Resumed
        } else {
            rustls::HandshakeKind::Full
        };
        for (round, kind) in [rustls::HandshakeKind::Full, expected_kind, expected_kind]
            .into_iter()
            .enumerate()
        {
            let mut s = tls_connect_with(&gw.proxy, Arc::clone(&cfg)).await;
            assert_eq!(
                s.get_ref().1.handshake_kind(),
                Some(kind),
                "{setting:?} round {round}"
            );
            // The tickets come before the answer; reading it reads them.
            assert!(tls_get(&mut s, &key).await.contains("200"));
            assert_eq!(
                store.tickets(),
                tickets * (round + 1),
                "{setting:?} round {round}"
            );
        }
    }
}

/// With `tls_session_tickets = 0` a TLS 1.2 client gets no session ticket either (rustls sent
/// TLS 1.2 tickets whatever the setting, sealed under the 6-hour ticket key); by default it
/// gets one. Seen with `openssl s_client`, whose saved session says whether it holds a ticket.
#[tokio::test]
async fn no_tls12_ticket_when_tickets_are_off() {
    for (setting, ticket) in [("", true), ("tls_session_tickets = 0\n", false)] {
        let (gw, pki, _key) = tls_gateway(setting).await;
        let dir = tempfile::tempdir().unwrap();
        let sess = dir.path().join("sess.pem");
        let port = gw.proxy.port();
        let sess_arg = sess.clone();
        let ca = pki.ca_pem.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args(["s_client", "-tls1_2", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-CAfile")
                .arg(&ca)
                .arg("-sess_out")
                .arg(&sess_arg)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("openssl")
        })
        .await
        .unwrap();
        assert!(sess.exists(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = std::process::Command::new("openssl")
            .args(["sess_id", "-noout", "-text", "-in"])
            .arg(&sess)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        assert!(text.contains("TLSv1.2"), "{text}");
        assert_eq!(
            text.contains("TLS session ticket:"),
            ticket,
            "{setting:?}: {text}"
        );
    }
}

/// A client that speaks only TLS 1.2 completes full and resumed handshakes and is answered.
#[tokio::test]
async fn tls12_handshakes_complete_and_resume() {
    let (gw, pki, key) = tls_gateway("").await;
    let mut cfg = client_tls_versions(&pki.ca_der, &[&rustls::version::TLS12]);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    for kind in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
        let mut s = tokio::time::timeout(
            Duration::from_secs(5),
            tls_connect_with(&gw.proxy, Arc::clone(&cfg)),
        )
        .await
        .expect("the TLS 1.2 handshake completes");
        assert_eq!(
            s.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(s.get_ref().1.handshake_kind(), Some(kind));
        assert!(tls_get(&mut s, &key).await.contains("200"));
    }
}

/// ALPN said h2: the connection is HTTP/2 only. HTTP/1.1 sent on it is not served (hyper's
/// own HTTP/1.1 parser read it without the fast path's refusals: Content-Length with
/// Transfer-Encoding was forwarded, 200); with ALPN http/1.1 the same bytes get the fast path's
/// 400, as on plain TCP.
#[tokio::test]
async fn http1_on_a_connection_alpn_made_h2_is_not_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, pki, key) = tls_gateway("").await;
    let smuggle = format!(
        "POST /x HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Length: 5\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let mut cfg = client_tls(&pki.ca_der);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut s = tls_connect_with(&gw.proxy, Arc::new(cfg)).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    s.write_all(smuggle.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/1.1"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let mut s = tls_connect(&gw.proxy, &pki.ca_der).await;
    s.write_all(smuggle.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// A client and its key, created through the admin API at `admin`.
async fn admin_client_key(admin: &std::net::SocketAddr) -> String {
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{admin}/v1/clients"))
        .header("x-admin-key", ADMIN_KEY)
        .body(Full::new(Bytes::from(
            json!({"client_id": "acme", "license": "pro"}).to_string(),
        )))
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["api_key"]["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = pki(dir.path(), "first");
    let text = with_proxy_tls(
        config_text(&upstream.url(), &dir.path().join("k.db"), ""),
        &first,
    );
    let mut p = spawn(&text, dir.path());
    let key = admin_client_key(&p.admin).await;

    let mut open = tls_connect(&p.proxy, &first.ca_der).await;
    let old_cert = peer_cert(&open);
    assert!(tls_get(&mut open, &key).await.contains("200"));

    // New certificate from another CA, written over the same files, then SIGHUP.
    let second = pki(dir.path(), "second");
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log_contains("certificate reloaded") {
        assert!(Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open connection keeps working.
    assert!(tls_get(&mut open, &key).await.contains("200"));
    // A new connection gets the new certificate (and verifies against the new CA).
    let mut fresh = tls_connect(&p.proxy, &second.ca_der).await;
    assert_ne!(peer_cert(&fresh), old_cert);
    assert!(tls_get(&mut fresh, &key).await.contains("200"));
    assert!(p.terminate().success());
}

#[test]
fn a_bad_certificate_file_is_a_startup_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("broken.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, "not a key").unwrap();
    let err = keygate::tls::ReloadableCert::load(&cert, &key).unwrap_err();
    assert!(err.contains("broken.pem"), "{err}");
    let missing = dir.path().join("missing.pem");
    let err = keygate::tls::ReloadableCert::load(&missing, &key).unwrap_err();
    assert!(err.contains("missing.pem"), "{err}");
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn ws_request(key: Option<&str>, version: &str, path: &str) -> String {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_websocket_session_echoes_through_the_gateway() {
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_request(Some(&key), "13", "/ws").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let seen = gw.upstream.last();
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.headers["upgrade"], "websocket");
    for _ in 0..3 {
        echoes_hello(&mut s).await;
    }
}

/// A masked text frame "hello" (RFC 6455 §5.7) sent through the tunnel comes back byte for
/// byte (the upstream echoes it).
async fn echoes_hello(s: &mut tokio::net::TcpStream) {
    let frame = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    s.write_all(&frame).await.unwrap();
    let mut back = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, frame);
}

/// A WebSocket to an `https://` upstream that offers HTTP/2 (by ALPN) opens over HTTP/1.1:
/// offered h2, the client would send the upgrade as an HTTP/2 request without its `Upgrade` and
/// `Connection` fields, and no tunnel ever opened. Ordinary requests still take HTTP/2.
#[tokio::test]
async fn a_websocket_to_an_https_upstream_that_speaks_http2_opens() {
    let (gw, key) = https_upstream_gateway().await;
    // An ordinary request first: an HTTP/2 connection to the upstream is pooled.
    assert_eq!(gw.get_with_key("/before", &key).await.status, 200);
    assert_eq!(gw.upstream.last().version, http::Version::HTTP_2);
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_request(Some(&key), "13", "/ws").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    echoes_hello(&mut s).await;
    assert_eq!(gw.upstream.last().version, http::Version::HTTP_11);
}

#[tokio::test]
async fn websocket_without_a_key_is_401_and_never_reaches_the_upstream() {
    let gw = Gateway::start().await;
    let conns = gw.upstream.connection_count();
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_request(None, "13", "/ws").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(gw.upstream.count(), 0);
    assert_eq!(
        gw.upstream.connection_count(),
        conns,
        "an upstream connection was opened"
    );
}

#[tokio::test]
async fn an_upstream_426_opens_no_tunnel() {
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(ws_request(Some(&key), "8", "/ws").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    // The connection closes after that answer: bytes sent on it are never tunnelled.
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let _ = s
        .write_all(b"GET /internal HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the connection stayed open"
    );
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let uris: Vec<String> = gw
        .upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.uri.clone())
        .collect();
    assert!(!uris.iter().any(|u| u.contains("internal")), "{uris:?}");
}

#[tokio::test]
async fn h2c_upgrades_are_not_forwarded() {
    let gw = Gateway::start().await;
    let (key, _) = gw.client("acme", "pro").await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET /plain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = gw.upstream.last();
    for h in ["upgrade", "http2-settings", "connection"] {
        assert!(!seen.headers.contains_key(h), "{h} forwarded");
    }
}

/// An `https://` upstream (relayed by hyper's client) answering a 204 with a `Content-Length`
/// and a HEAD with its length as a list: the client gets no length on the 204 and one plain
/// number on the HEAD answer, over HTTP/1.1 and HTTP/2 (an HTTP/2 client resets the stream for
/// either as written).
#[tokio::test]
async fn an_https_upstreams_bodiless_answers_lose_the_lengths_they_must_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let up_pki = pki(dir.path(), "upstream");
    let mut tls = (*upstream_tls(&up_pki)).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                loop {
                    // One request head, or the end of the connection.
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let answer: &[u8] = if head.contains("/nocontent") {
                        b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 100, 100\r\n\r\n"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let url = format!("https://localhost:{port}");
    let text = config_text(&url, &dir.path().join("k.db"), "").replace(
        "[admin]",
        &format!("upstream_ca = \"{}\"\n[admin]", up_pki.ca_pem.display()),
    );
    let gw = Gateway::start_from(Upstream::start().await, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    for h2 in [false, true] {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(h2)
                .build_http::<Full<Bytes>>();
        for (method, path, status, length) in [
            ("GET", "/nocontent", 204, None),
            ("HEAD", "/listed", 200, Some("100")),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{}{path}", gw.proxy))
                .header("x-api-key", &key)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = client.request(req).await.expect("an answer, not a reset");
            let (parts, body) = res.into_parts();
            body.collect().await.expect("a whole (empty) body");
            assert_eq!(parts.status.as_u16(), status, "h2 {h2} {path}");
            assert_eq!(
                parts
                    .headers
                    .get("content-length")
                    .map(|v| v.to_str().unwrap()),
                length,
                "h2 {h2} {path}: {:?}",
                parts.headers
            );
        }
    }
}
