//! Webhooks: every event type reaches a local receiver, signed per Standard Webhooks (checked
//! with a verifier written here from the specification, and with the official Python
//! `standardwebhooks` package); a receiver that is down gets every event once it is up, in
//! order per key; a gateway killed with kill -9 delivers what was pending after its restart;
//! the `/v1/webhooks` admin API refuses hostile input and shows a secret once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Gateway, Upstream, config_text};

/// The secret of the configured webhook in these tests (24 random bytes, base64).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A request the receiver got, and what it answered.
#[derive(Clone, Debug)]
pub struct Got {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answered: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    pub fn id(&self) -> String {
        self.headers["webhook-id"].to_str().unwrap().to_owned()
    }
}

/// A webhook receiver on a free loopback port: records every request and answers `status`
/// (200 unless a test sets another).
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Got>>>,
    pub status: Arc<AtomicU16>,
    /// `Retry-After` seconds sent with a failure answer (0: none).
    pub retry_after: Arc<AtomicU16>,
    /// Send that `Retry-After` as the HTTP date so many seconds from now.
    pub retry_after_as_date: Arc<AtomicBool>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_with_tls(None).await
    }

    /// A receiver speaking TLS with `tls` when given.
    pub async fn start_with_tls(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let retry_after = Arc::new(AtomicU16::new(0));
        let retry_after_as_date = Arc::new(AtomicBool::new(false));
        let (g, s, ra) = (
            Arc::clone(&got),
            Arc::clone(&status),
            (Arc::clone(&retry_after), Arc::clone(&retry_after_as_date)),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (g, s, ra) = (Arc::clone(&g), Arc::clone(&s), ra.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (g, s, ra) = (Arc::clone(&g), Arc::clone(&s), ra.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let answered = s.load(Ordering::SeqCst);
                            g.lock().unwrap().push(Got {
                                path,
                                headers: parts.headers,
                                body,
                                answered,
                                at: Instant::now(),
                            });
                            let mut res = Response::new(Full::new(Bytes::new()));
                            *res.status_mut() = http::StatusCode::from_u16(answered).unwrap();
                            let wait = ra.0.load(Ordering::SeqCst);
                            if answered >= 300 && wait > 0 {
                                let value = if ra.1.load(Ordering::SeqCst) {
                                    let at = SystemTime::now() + Duration::from_secs(wait.into());
                                    httpdate::fmt_http_date(at).parse().unwrap()
                                } else {
                                    wait.into()
                                };
                                res.headers_mut().insert(http::header::RETRY_AFTER, value);
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Receiver {
            addr,
            got,
            status,
            retry_after,
            retry_after_as_date,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Requests answered 2xx on `path`.
    pub fn delivered(&self, path: &str) -> Vec<Got> {
        self.all()
            .into_iter()
            .filter(|g| g.path == path && g.answered < 300)
            .collect()
    }

    /// Waits until `pred` holds for the delivered requests on `path`.
    pub async fn wait_for(&self, path: &str, within: Duration, pred: impl Fn(&[Got]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let d = self.delivered(path);
            if pred(&d) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver did not get what was expected on {path}; got {:?}",
                d.iter()
                    .map(|g| String::from_utf8_lossy(&g.body).into_owned())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The Standard Webhooks verification, from the specification: the three headers present, the
/// timestamp within 5 minutes, and one of the space-separated `v1,` signatures equal (in
/// constant time) to base64 HMAC-SHA256 over `{id}.{timestamp}.{body}` with the base64-decoded
/// part of the `whsec_` secret. Returns the parsed body.
pub fn verify(secret: &str, g: &Got) -> Result<Value, String> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use hmac::Mac;
    let header = |n: &str| {
        g.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(format!("no {n}"))
    };
    let (id, ts, sigs) = (
        header("webhook-id")?,
        header("webhook-timestamp")?,
        header("webhook-signature")?,
    );
    let t: i64 = ts.parse().map_err(|_| "timestamp is not a number")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - t).abs() > 300 {
        return Err(format!(
            "timestamp {t} is more than 5 minutes from now ({now})"
        ));
    }
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").ok_or("secret prefix")?)
        .map_err(|e| e.to_string())?;
    for sig in sigs.split(' ') {
        let Some(b64) = sig.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = STANDARD.decode(b64) else {
            continue;
        };
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&g.body);
        if mac.verify_slice(&sig).is_ok() {
            return serde_json::from_slice(&g.body).map_err(|e| e.to_string());
        }
    }
    Err("no matching signature".into())
}

/// Verifies `g` with the official Python `standardwebhooks` package (PyPI), installed into
/// `target/webhooks-venv` when missing.
pub fn verify_with_python(secret: &str, g: &Got) -> Result<(), String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/webhooks-venv");
    let python = venv.join("bin/python");
    let ready = |p: &std::path::Path| {
        std::process::Command::new(p)
            .args(["-c", "import standardwebhooks"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Tests run in parallel: one installs, the others wait for it instead of racing it.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !ready(&python) {
        let _ = std::fs::remove_dir_all(&venv);
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new(venv.join("bin/pip"))
                .args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "standardwebhooks",
                ])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && ready(&python),
            "cannot install the standardwebhooks package into {} (python3-venv and PyPI are needed)",
            venv.display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), &g.body).unwrap();
    let headers: HashMap<String, String> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|n| (n.to_string(), g.headers[*n].to_str().unwrap().to_owned()))
        .collect();
    std::fs::write(
        dir.path().join("headers"),
        serde_json::to_string(&headers).unwrap(),
    )
    .unwrap();
    let script = "import json,sys\nfrom standardwebhooks.webhooks import Webhook\n\
        d=sys.argv[1]\nbody=open(d+'/body','rb').read()\nheaders=json.load(open(d+'/headers'))\n\
        v=Webhook(sys.argv[2]).verify(body, headers)\nprint(v['type'])\n";
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(dir.path())
        .arg(secret)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `[events]` with small intervals, and one webhook for every event type at `url`.
pub fn events_config(url: &str) -> String {
    events_config_with(url, "")
}

/// [`events_config`] with `more` lines in `[events]`.
pub fn events_config_with(url: &str, more: &str) -> String {
    format!(
        r#"
[events]
poll_interval_ms = 20
retry_base_ms = 50
retry_max_ms = 200
expiry_check_interval_ms = 100
request_timeout_ms = 2000
{more}
[[webhooks]]
url = "{url}"
events = "*"
secret = "{SECRET}"
"#
    )
}

fn rfc3339_in(d: chrono::Duration) -> String {
    (chrono::Utc::now() + d).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn every_event_type_is_delivered_signed_and_verified() {
    let rx = Receiver::start().await;
    let (scanning, signer) = crate::secret_scanning::Signer::config("revoke");
    let gw = Gateway::start_with(&format!("{}{}", events_config(&rx.url("/all")), scanning)).await;
    // A webhook made through the API, for key.created only.
    let r = gw
        .admin(
            "POST",
            "/v1/webhooks",
            Some(json!({"url": rx.url("/created"), "events": ["key.created"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let api_secret = r.json()["secret"].as_str().unwrap().to_owned();
    let api_hook = r.json()["id"].as_str().unwrap().to_owned();

    let (first_key, first_id) = gw.client("acme", "free").await;
    let k = gw.key("acme", json!({"name": "k1"})).await;
    let id = k["id"].as_str().unwrap().to_owned();
    let plaintexts = [first_key.clone(), k["key"].as_str().unwrap().to_owned()];
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"name": "k1-renamed"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .admin("POST", &format!("/v1/api-keys/{id}/rotate"), None)
        .await;
    assert_eq!(r.status, 200);
    let rotated = r.json()["key"].as_str().unwrap().to_owned();
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .admin("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    // Expiring keys: one within 7 days, one within a day.
    let week = gw
        .key(
            "acme",
            json!({"name": "week", "expires_at": rfc3339_in(chrono::Duration::days(3))}),
        )
        .await;
    let day = gw
        .key(
            "acme",
            json!({"name": "day", "expires_at": rfc3339_in(chrono::Duration::hours(12))}),
        )
        .await;
    // The expiry check writes its notices before the keys go.
    rx.wait_for("/all", Duration::from_secs(10), |d| {
        d.iter()
            .filter(|g| g.json()["type"] == "key.expiring")
            .count()
            >= 2
    })
    .await;
    // A leak report of the client's first key.
    let report = json!([{"token": first_key, "type": "keygate_api_key",
        "url": "https://github.com/octo/repo/blob/main/.env", "source": "content"}]);
    let r = signer.post(&gw, &report.to_string()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = gw.admin("DELETE", "/v1/clients/acme", None).await;
    assert_eq!(r.status, 200);

    rx.wait_for("/all", Duration::from_secs(10), |d| {
        d.iter().any(|g| g.json()["type"] == "client.deleted")
            && d.iter().any(|g| g.json()["type"] == "key.leaked")
            && d.iter()
                .filter(|g| g.json()["type"] == "key.expiring")
                .count()
                >= 2
    })
    .await;
    let all = rx.delivered("/all");
    let mut by_type: HashMap<String, Vec<Value>> = HashMap::new();
    for g in &all {
        let v = verify(SECRET, g).unwrap_or_else(|e| panic!("{e}: {g:?}"));
        assert!(g.id().starts_with("msg_"));
        assert_eq!(g.headers["content-type"], "application/json");
        chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap()).unwrap();
        let body = String::from_utf8_lossy(&g.body);
        for p in plaintexts.iter().chain([&rotated]) {
            assert!(
                !body.contains(p.as_str()),
                "a key in a webhook body: {body}"
            );
        }
        assert!(!body.contains("hash"), "{body}");
        by_type
            .entry(v["type"].as_str().unwrap().to_owned())
            .or_default()
            .push(v);
    }
    for t in [
        "client.created",
        "key.created",
        "key.updated",
        "key.rotated",
        "key.revoked",
        "key.expiring",
        "key.leaked",
        "client.deleted",
    ] {
        assert!(by_type.contains_key(t), "no {t} among {:?}", by_type.keys());
    }
    let of = |t: &str| by_type[t].clone();
    assert_eq!(of("client.created")[0]["data"]["client_id"], "acme");
    assert!(of("key.rotated").iter().any(|v| v["data"]["id"] == id));
    let revoked: Vec<_> = of("key.revoked")
        .iter()
        .filter(|v| v["data"]["id"] == id)
        .map(|v| v["data"]["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(revoked, ["disabled", "deleted"]);
    let expiring: HashMap<String, i64> = of("key.expiring")
        .iter()
        .map(|v| {
            (
                v["data"]["id"].as_str().unwrap().to_owned(),
                v["data"]["days"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(expiring[week["id"].as_str().unwrap()], 7);
    assert_eq!(expiring[day["id"].as_str().unwrap()], 1);
    assert_eq!(expiring.len(), 2, "one notice per key and window");
    let leaked = &of("key.leaked")[0]["data"];
    assert_eq!(leaked["id"], first_id.as_str());
    assert_eq!(leaked["url"], "https://github.com/octo/repo/blob/main/.env");
    assert_eq!(leaked["action"], "revoked");
    assert_eq!(of("client.deleted")[0]["data"]["client_id"], "acme");

    // The API webhook got key.created only, signed with its own secret.
    rx.wait_for("/created", Duration::from_secs(5), |d| d.len() >= 4)
        .await;
    let created = rx.delivered("/created");
    for g in &created {
        let v = verify(&api_secret, g).unwrap();
        assert_eq!(v["type"], "key.created");
        assert!(
            verify(SECRET, g).is_err(),
            "signed with another webhook's secret"
        );
    }
    // The same event goes to both webhooks under the same webhook-id.
    let ids: Vec<String> = created.iter().map(Got::id).collect();
    assert!(all.iter().any(|g| ids.contains(&g.id())));
    // The official verifier agrees.
    verify_with_python(&api_secret, &created[0]).unwrap();
    verify_with_python(SECRET, &all[0]).unwrap();
    let mut forged = all[0].clone();
    forged.body = Bytes::from(String::from_utf8_lossy(&forged.body).replace("acme", "acmf"));
    assert!(verify_with_python(SECRET, &forged).is_err());
    assert!(verify(SECRET, &forged).is_err());

    // Deliveries are listed with their status codes; no secret anywhere in the API.
    let r = gw
        .admin("GET", &format!("/v1/webhooks/{api_hook}/deliveries"), None)
        .await;
    assert_eq!(r.status, 200);
    let attempts = r.json()["data"].as_array().unwrap().clone();
    assert!(attempts.len() >= 4);
    assert!(
        attempts
            .iter()
            .all(|a| a["status"] == 200 && a["outcome"] == "delivered")
    );
    for path in ["/v1/webhooks", &format!("/v1/webhooks/{api_hook}")] {
        let r = gw.admin("GET", path, None).await;
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains(&api_secret) && !text.contains(SECRET),
            "{text}"
        );
        assert!(!text.contains("whsec_"), "{text}");
    }
    // Metrics count what was delivered.
    let r = gw.admin("GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let delivered: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("keygate_webhook_events_delivered_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(delivered as usize >= all.len() + created.len());
    gw.stop().await;
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_in_order_per_key() {
    let rx = Receiver::start().await;
    rx.status.store(503, Ordering::SeqCst);
    let gw = Gateway::start_with(&events_config(&rx.url("/hook"))).await;
    gw.client("order", "free").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let k = gw.key("order", json!({"name": format!("k{i}")})).await;
        ids.push(k["id"].as_str().unwrap().to_owned());
    }
    // Interleaved renames: k0 → k0-1 … k0-5, the same for each key.
    for n in 1..=5 {
        for id in &ids {
            let name = format!("{id}-{n}");
            let r = gw
                .admin(
                    "PATCH",
                    &format!("/v1/api-keys/{id}"),
                    Some(json!({"name": name})),
                )
                .await;
            assert_eq!(r.status, 200);
        }
    }
    // Down: attempts fail (and are retried) for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.all().iter().filter(|g| g.answered == 503).count() < 6 {
        assert!(Instant::now() < deadline, "no retries while down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rx.delivered("/hook").is_empty());
    let r = gw.admin("GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let pending: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("keygate_webhook_events_pending "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(pending > 0, "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.status.store(200, Ordering::SeqCst);
    // 1 client.created + 4 key.created + 15 key.updated.
    rx.wait_for("/hook", Duration::from_secs(10), |d| {
        let mut unique: Vec<String> = d.iter().map(Got::id).collect();
        unique.sort();
        unique.dedup();
        unique.len() >= 20
    })
    .await;
    let delivered = rx.delivered("/hook");
    for id in &ids {
        let names: Vec<String> = delivered
            .iter()
            .map(|g| verify(SECRET, g).unwrap())
            .filter(|v| v["data"]["id"] == id.as_str())
            .map(|v| v["data"]["name"].as_str().unwrap().to_owned())
            .collect();
        let mut want = vec![format!("k{}", ids.iter().position(|i| i == id).unwrap())];
        want.extend((1..=5).map(|n| format!("{id}-{n}")));
        assert_eq!(names, want, "events of key {id} out of order or missing");
    }
    // A retried event keeps its webhook-id: the 503'd ids are among the delivered ones.
    let failed_ids: Vec<String> = rx
        .all()
        .iter()
        .filter(|g| g.answered == 503)
        .map(Got::id)
        .collect();
    let delivered_ids: Vec<String> = delivered.iter().map(Got::id).collect();
    assert!(failed_ids.iter().all(|i| delivered_ids.contains(i)));
    let hook = gw.admin("GET", "/v1/webhooks", None).await.json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = gw
        .admin(
            "GET",
            &format!("/v1/webhooks/{hook}/deliveries?limit=1000"),
            None,
        )
        .await;
    let attempts = r.json()["data"].as_array().unwrap().clone();
    assert!(
        attempts
            .iter()
            .any(|a| a["status"] == 503 && a["outcome"] == "retrying")
    );
    assert!(attempts.iter().any(|a| a["status"] == 200
        && a["outcome"] == "delivered"
        && a["attempt"].as_u64() > Some(1)));
    gw.stop().await;
}

/// An endpoint that takes connections and never answers holds its own share of attempts (16)
/// until the request timeout (30 s here), not the other webhook's deliveries: with 80 events due
/// to both, the healthy endpoint gets all 80 while the silent one still holds its first 16.
#[tokio::test]
async fn a_silent_endpoint_holds_its_own_share_not_another_webhooks_deliveries() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&held);
    tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            h.lock().unwrap().push(stream);
        }
    });
    let rx = Receiver::start().await;
    let text = events_config(&rx.url("/hook"))
        .replace("request_timeout_ms = 2000", "request_timeout_ms = 30000")
        + &format!(
            "[[webhooks]]\nurl = \"http://{silent_addr}/silent\"\nevents = \"*\"\nsecret = \"{SECRET}\"\n"
        );
    let gw = Gateway::start_with(&text).await;
    let started = Instant::now();
    // 40 clients: 40 client.created and 40 key.created, each on a queue of its own.
    for n in 0..40 {
        gw.client(&format!("c{n}"), "free").await;
    }
    rx.wait_for("/hook", Duration::from_secs(15), |d| d.len() >= 80)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the healthy endpoint waited for the silent one's timeout"
    );
    // The silent endpoint holds exactly its share: 16 connections, each an attempt under way.
    assert_eq!(held.lock().unwrap().len(), 16);
    let got = rx.delivered("/hook");
    let mut ids: Vec<String> = got.iter().map(Got::id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 80, "each event once");
    gw.stop().await;
}

/// An import's `key.created` events go out when the import is answered, not at the next poll
/// (here 10 minutes away).
#[tokio::test]
async fn imported_keys_are_announced_without_waiting_for_the_poll() {
    let rx = Receiver::start().await;
    let text = events_config(&rx.url("/hook"))
        .replace("poll_interval_ms = 20", "poll_interval_ms = 600000");
    let gw = Gateway::start_with(&text).await;
    gw.client("acme", "free").await;
    rx.wait_for("/hook", Duration::from_secs(10), |d| d.len() >= 2)
        .await;
    let r = gw
        .admin(
            "POST",
            "/v1/api-keys/import",
            Some(json!({"keys": [{"client_id": "acme", "name": "moved",
                "key": "Vv8mJ1cUq0Qm2xW4e6r7t8y9u0i1o2p3"}]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["imported"], 1);
    rx.wait_for("/hook", Duration::from_secs(10), |d| {
        d.iter().any(|g| {
            let v = verify(SECRET, g).unwrap();
            v["type"] == "key.created" && v["data"]["imported"] == true
        })
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn events_pending_at_a_kill_9_are_delivered_after_the_restart() {
    let rx = Receiver::start().await;
    rx.status.store(503, Ordering::SeqCst);
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keygate.db");
    let text = config_text(
        &upstream.url(),
        &db,
        &events_config(&rx.url("/hook"))
            .replace("retry_base_ms = 50", "retry_base_ms = 1000")
            .replace("retry_max_ms = 200", "retry_max_ms = 1000"),
    );
    let mut gw = Binary::serve(&text, dir.path()).json_logs().spawn();
    let admin = |gw: &Binary, method: &str, path: &str, body: Option<Value>| {
        let addr = gw.admin;
        let method = method.to_owned();
        let path = path.to_owned();
        async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            let mut b = Request::builder()
                .method(method.as_str())
                .uri(format!("http://{addr}{path}"))
                .header("x-admin-key", ADMIN_KEY);
            if body.is_some() {
                b = b.header("content-type", "application/json");
            }
            let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
            let res = client
                .request(b.body(Full::new(body)).unwrap())
                .await
                .unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    // A webhook made through the API: its secret never reaches the log.
    let (s, v) = admin(
        &gw,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": rx.url("/api")})),
    )
    .await;
    assert_eq!(s, 201);
    let api_secret = v["secret"].as_str().unwrap().to_owned();
    let (s, _) = admin(
        &gw,
        "POST",
        "/v1/clients",
        Some(json!({"client_id": "crash", "license": "free"})),
    )
    .await;
    assert_eq!(s, 201);
    // The first attempts fail; the next are due a second later, when the process is dead.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.all().iter().filter(|g| g.path == "/hook").count() < 2 {
        assert!(Instant::now() < deadline, "no attempt before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_ids: Vec<String> = rx.all().iter().map(Got::id).collect();
    gw.kill9();
    assert!(!gw.log_contains(&api_secret), "a webhook secret in the log");
    assert!(!gw.log_contains(SECRET));
    rx.status.store(200, Ordering::SeqCst);
    let gw = Binary::serve(&text, dir.path()).json_logs().spawn();
    rx.wait_for("/hook", Duration::from_secs(10), |d| d.len() >= 2)
        .await;
    rx.wait_for("/api", Duration::from_secs(10), |d| d.len() >= 2)
        .await;
    let hook = rx.delivered("/hook");
    let mut types: Vec<String> = hook
        .iter()
        .map(|g| {
            verify(SECRET, g).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // (Events of different keys or clients have no order between them.)
    types.sort();
    assert_eq!(types, ["client.created", "key.created"]);
    for g in &hook {
        assert!(
            first_ids.contains(&g.id()),
            "a redelivery keeps its webhook-id"
        );
    }
    for g in rx.delivered("/api") {
        verify(&api_secret, &g).unwrap();
    }
    assert!(!gw.log_contains(&api_secret));
}

/// A webhook of the configuration file given a new `secret` and its old one as
/// `previous_secret`: deliveries carry both signatures, either verifies.
#[tokio::test]
async fn a_configured_previous_secret_signs_beside_the_secret() {
    const NEW: &str = "whsec_c2Vjb25kIHNlY3JldCBvZiB0aGlydHkgdHdvIGJ5dGVz";
    let rx = Receiver::start().await;
    let config = events_config(&rx.url("/all")).replace(
        &format!("secret = \"{SECRET}\""),
        &format!("secret = \"{NEW}\"\nprevious_secret = \"{SECRET}\""),
    );
    assert!(config.contains("previous_secret"));
    let gw = Gateway::start_with(&config).await;
    gw.client("one", "free").await;
    let g = delivery_of(&rx, "/all", "one").await;
    assert_eq!(signature_count(&g), 2);
    for secret in [NEW, SECRET] {
        verify(secret, &g).unwrap();
        verify_with_python(secret, &g).unwrap();
    }
    gw.stop().await;
}

/// How many signatures a delivery carries.
fn signature_count(g: &Got) -> usize {
    g.headers["webhook-signature"]
        .to_str()
        .unwrap()
        .split(' ')
        .count()
}

/// The client.created delivery of `client` at `path` (waited for).
async fn delivery_of(rx: &Receiver, path: &str, client: &str) -> Got {
    rx.wait_for(path, Duration::from_secs(10), |d| {
        d.iter().any(|g| g.json()["data"]["client_id"] == client)
    })
    .await;
    rx.delivered(path)
        .into_iter()
        .find(|g| g.json()["data"]["client_id"] == client)
        .unwrap()
}

/// A webhook's secret rotated with a grace period: deliveries carry both signatures (either
/// verifies, with the specification's own check and the official Python package); rotated again
/// without one: the new secret alone. Refused rotations (no or a wrong credential, a client's
/// key, a bad grace period or body, an unknown or configured webhook) change nothing.
#[tokio::test]
async fn a_webhook_secret_rotated_with_a_grace_period_signs_beside_the_new_one() {
    let rx = Receiver::start().await;
    let gw = Gateway::start_with(&events_config(&rx.url("/all"))).await;
    let r = gw
        .admin(
            "POST",
            "/v1/webhooks",
            Some(json!({"url": rx.url("/api"), "events": ["client.created"]})),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let first = r.json()["secret"].as_str().unwrap().to_owned();
    gw.client("one", "free").await;
    verify(&first, &delivery_of(&rx, "/api", "one").await).unwrap();

    let rotate = format!("/v1/webhooks/{id}/rotate");
    let r = gw
        .admin("POST", &rotate, Some(json!({"grace_period_seconds": 3600})))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let second = r.json()["secret"].as_str().unwrap().to_owned();
    assert!(second.starts_with("whsec_") && second != first);
    let until = r.json()["previous_secret_valid_until"]
        .as_str()
        .unwrap()
        .to_owned();
    let left = chrono::DateTime::parse_from_rfc3339(&until)
        .unwrap()
        .timestamp()
        - chrono::Utc::now().timestamp();
    assert!((3590..=3600).contains(&left), "{until}");
    // Shown once: the listing has the grace period's end and neither secret.
    let shown = gw.admin("GET", &format!("/v1/webhooks/{id}"), None).await;
    assert_eq!(shown.json()["previous_secret_valid_until"], until.as_str());
    assert!(shown.json().get("secret").is_none());
    let text =
        String::from_utf8_lossy(&gw.admin("GET", "/v1/webhooks", None).await.body).into_owned();
    assert!(!text.contains(&first) && !text.contains(&second));

    gw.client("two", "free").await;
    let g = delivery_of(&rx, "/api", "two").await;
    assert_eq!(signature_count(&g), 2);
    for secret in [&first, &second] {
        verify(secret, &g).unwrap();
        verify_with_python(secret, &g).unwrap();
    }
    assert!(verify(SECRET, &g).is_err());
    assert!(verify_with_python(SECRET, &g).is_err());

    // Rotated again with no body: the secret it replaces stops at once, and the one before.
    let r = gw.admin("POST", &rotate, None).await;
    assert_eq!(r.status, 200);
    let third = r.json()["secret"].as_str().unwrap().to_owned();
    assert!(r.json().get("previous_secret_valid_until").is_none());
    gw.client("three", "free").await;
    let g = delivery_of(&rx, "/api", "three").await;
    assert_eq!(signature_count(&g), 1);
    verify(&third, &g).unwrap();
    verify_with_python(&third, &g).unwrap();
    for old in [&first, &second] {
        assert!(verify(old, &g).is_err());
        assert!(verify_with_python(old, &g).is_err());
    }

    // Refused: each answers its error and the secret stays the third.
    gw.client("hostile", "free").await;
    let manager = gw
        .key("hostile", json!({"permissions": ["keys:manage"]}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let configured = gw.admin("GET", "/v1/webhooks", None).await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["source"] == "config")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    const ADMIN: &[(&str, &str)] = &[("x-admin-key", ADMIN_KEY)];
    let grace = |v: Value| Some(json!({ "grace_period_seconds": v }));
    let bearer = format!("Bearer {manager}");
    // What is refused, the path, the body, the credentials and the answer's status.
    type Refused<'a> = (&'a str, String, Option<Value>, Vec<(&'a str, &'a str)>, u16);
    let refused: Vec<Refused> = vec![
        ("no credential", rotate.clone(), None, vec![], 401),
        (
            "a wrong admin key",
            rotate.clone(),
            None,
            vec![("x-admin-key", "wrong-admin-key-0123456789")],
            401,
        ),
        (
            "a client's key",
            rotate.clone(),
            None,
            vec![("authorization", bearer.as_str())],
            403,
        ),
        (
            "a grace period too long",
            rotate.clone(),
            grace(json!(604_801)),
            ADMIN.to_vec(),
            422,
        ),
        (
            "a negative grace period",
            rotate.clone(),
            grace(json!(-1)),
            ADMIN.to_vec(),
            422,
        ),
        (
            "a text grace period",
            rotate.clone(),
            grace(json!("1h")),
            ADMIN.to_vec(),
            422,
        ),
        (
            "an unknown field",
            rotate.clone(),
            Some(json!({"secret": first})),
            ADMIN.to_vec(),
            422,
        ),
        (
            "an unknown webhook",
            "/v1/webhooks/wh_0123456789abcdef0123456789abcdef/rotate".into(),
            None,
            ADMIN.to_vec(),
            404,
        ),
        (
            "a webhook of the configuration file",
            format!("/v1/webhooks/{configured}/rotate"),
            None,
            ADMIN.to_vec(),
            409,
        ),
    ];
    for (what, path, body, headers, status) in refused {
        let r = gw.admin_as("POST", &path, body, &headers).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json().get("secret").is_none(), "{what}");
    }
    for (what, body) in [
        ("malformed JSON", b"{\"grace_period_seconds\":".to_vec()),
        ("an oversized body", vec![b' '; 2 * 1024 * 1024]),
    ] {
        let req = Request::post(format!("http://{}{rotate}", gw.admin))
            .header("x-admin-key", ADMIN_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let r = gw.send(req).await;
        assert!(r.status == 400 || r.status == 413, "{what}: {}", r.status);
    }
    gw.client("four", "free").await;
    let g = delivery_of(&rx, "/api", "four").await;
    assert_eq!(signature_count(&g), 1);
    verify(&third, &g).unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn the_webhook_api_refuses_hostile_input_and_shows_a_secret_once() {
    let rx = Receiver::start().await;
    let gw = Gateway::start_with(&events_config(&rx.url("/hook"))).await;
    let body = json!({"url": rx.url("/x"), "events": "*"});
    // No credential, a wrong one, a client's key: refused, nothing made.
    let r = gw
        .admin_as("POST", "/v1/webhooks", Some(body.clone()), &[])
        .await;
    assert_eq!(r.status, 401);
    let r = gw
        .admin_as(
            "POST",
            "/v1/webhooks",
            Some(body.clone()),
            &[("x-admin-key", "wrong-admin-key-0123456789")],
        )
        .await;
    assert_eq!(r.status, 401);
    let k = gw.client("hostile", "free").await.0;
    let r = gw
        .key("hostile", json!({"permissions": ["keys:manage"]}))
        .await;
    let manager = r["key"].as_str().unwrap().to_owned();
    let r = gw
        .admin_as(
            "POST",
            "/v1/webhooks",
            Some(body.clone()),
            &[("authorization", &format!("Bearer {manager}"))],
        )
        .await;
    assert_eq!(r.status, 403);
    // Whatever its body: the admin-only calls refuse a client principal before reading it.
    for (path, body) in [
        ("/v1/webhooks", json!({"url": 5, "events": "everything"})),
        ("/v1/clients", json!({"client_id": ["x"]})),
        ("/v1/api-keys/import", json!("not an import")),
        (
            "/v1/api-keys/0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d/credits",
            json!({"add": "lots"}),
        ),
    ] {
        let r = gw
            .admin_as(
                "POST",
                path,
                Some(body),
                &[("authorization", &format!("Bearer {manager}"))],
            )
            .await;
        assert_eq!(
            r.status,
            403,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = gw
        .admin_as(
            "GET",
            "/v1/webhooks",
            None,
            &[("authorization", &format!("Bearer {k}"))],
        )
        .await;
    assert!(r.status == 401 || r.status == 403);
    // Malformed and wrong input.
    for (bad, status) in [
        (json!({"url": "ftp://example.com/x"}), 422),
        (json!({"url": "javascript:alert(1)"}), 422),
        (json!({"url": "http://user:pw@example.com/"}), 422),
        (json!({"url": "not a url"}), 422),
        (
            json!({"url": format!("http://example.com/{}", "a".repeat(3000))}),
            422,
        ),
        (
            json!({"url": "http://example.com/", "events": ["key.stolen"]}),
            422,
        ),
        (json!({"url": "http://example.com/", "events": []}), 422),
        (json!({"url": "http://example.com/", "events": 5}), 422),
        (
            json!({"url": "http://example.com/", "secret": "whsec_mine"}),
            422,
        ),
        (json!({"events": "*"}), 422),
    ] {
        let r = gw.admin("POST", "/v1/webhooks", Some(bad.clone())).await;
        assert_eq!(
            r.status,
            status,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = gw
        .admin_as("POST", "/v1/webhooks", None, &[("x-admin-key", ADMIN_KEY)])
        .await;
    assert_eq!(r.status, 422);
    let raw = |text: String| {
        Request::post(format!("http://{}/v1/webhooks", gw.admin))
            .header("x-admin-key", ADMIN_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)))
            .unwrap()
    };
    assert_eq!(gw.send(raw("{\"url\": ".into())).await.status, 400);
    let huge = format!("{{\"url\": \"http://e.com/{}\"}}", "a".repeat(2 << 20));
    assert_eq!(gw.send(raw(huge)).await.status, 413);
    // Only the configured webhook exists.
    let r = gw.admin("GET", "/v1/webhooks", None).await;
    let list = r.json()["data"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["source"], "config");
    let configured = list[0]["id"].as_str().unwrap().to_owned();
    // A configured webhook is changed in the file, not here.
    let r = gw
        .admin("DELETE", &format!("/v1/webhooks/{configured}"), None)
        .await;
    assert_eq!(r.status, 409);
    // Made, shown once, deleted.
    let r = gw.admin("POST", "/v1/webhooks", Some(body)).await;
    assert_eq!(r.status, 201);
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    for path in [
        "/v1/webhooks".to_owned(),
        format!("/v1/webhooks/{id}"),
        format!("/v1/webhooks/{id}/deliveries"),
    ] {
        let r = gw.admin("GET", &path, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("whsec_"),
            "{path}"
        );
    }
    // Changed: hostile changes refused, a good one kept (no secret shown).
    let path = format!("/v1/webhooks/{id}");
    let patch = json!({"url": rx.url("/moved"), "events": ["key.revoked"]});
    let r = gw.admin_as("PATCH", &path, Some(patch.clone()), &[]).await;
    assert_eq!(r.status, 401);
    for bad in [
        json!({"url": "gopher://example.com/"}),
        json!({"events": ["key.stolen"]}),
        json!({"events": []}),
        json!({"secret": "whsec_mine"}),
    ] {
        let r = gw.admin("PATCH", &path, Some(bad.clone())).await;
        assert_eq!(r.status, 422, "{bad}");
    }
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/webhooks/{configured}"),
            Some(patch.clone()),
        )
        .await;
    assert_eq!(r.status, 409);
    let r = gw
        .admin("PATCH", "/v1/webhooks/wh_nothing", Some(patch.clone()))
        .await;
    assert_eq!(r.status, 404);
    let r = gw.admin("GET", &path, None).await;
    assert_eq!(r.json()["url"], rx.url("/x").as_str());
    let r = gw.admin("PATCH", &path, Some(patch)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["url"], rx.url("/moved").as_str());
    assert_eq!(r.json()["events"], json!(["key.revoked"]));
    assert!(!String::from_utf8_lossy(&r.body).contains("whsec_"));
    let r = gw.admin("GET", &path, None).await;
    assert_eq!(r.json()["events"], json!(["key.revoked"]));
    // A list names each type once, and `*` beside names is every type.
    for (events, kept) in [
        (
            json!(["key.created", "key.revoked", "key.created"]),
            json!(["key.created", "key.revoked"]),
        ),
        (json!(["key.created", "*"]), json!(["*"])),
        (json!(["key.revoked"]), json!(["key.revoked"])),
    ] {
        let r = gw
            .admin("PATCH", &path, Some(json!({ "events": events })))
            .await;
        assert_eq!(r.status, 200, "{events}");
        assert_eq!(r.json()["events"], kept, "{events}");
        let r = gw.admin("GET", &path, None).await;
        assert_eq!(r.json()["events"], kept, "{events}");
    }
    let r = gw
        .admin(
            "GET",
            &format!("/v1/webhooks/{id}/deliveries?limit=0"),
            None,
        )
        .await;
    assert_eq!(r.status, 422);
    let r = gw
        .admin("GET", "/v1/webhooks/wh_nothing/deliveries", None)
        .await;
    assert_eq!(r.status, 404);
    let r = gw
        .admin("DELETE", &format!("/v1/webhooks/{id}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert!(!String::from_utf8_lossy(&r.body).contains("whsec_"));
    let r = gw.admin("GET", &format!("/v1/webhooks/{id}"), None).await;
    assert_eq!(r.status, 404);
    let r = gw
        .admin("DELETE", &format!("/v1/webhooks/{id}"), None)
        .await;
    assert_eq!(r.status, 404);
    gw.stop().await;
}

/// At most 100 webhooks, even when created at once: with 99 made, six creates sent together
/// get one 201 and five 409, and 100 are listed (the store checks the cap in the same step as
/// the write; a count read before it let several through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_one_hundred_webhooks_even_when_created_at_once() {
    let rx = Receiver::start().await;
    let gw = Gateway::start_with(&events_config(&rx.url("/hook"))).await;
    let listed = || async {
        let r = gw.admin("GET", "/v1/webhooks", None).await;
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["source"] == "api")
            .count()
    };
    for i in 0..99 {
        let r = gw
            .admin(
                "POST",
                "/v1/webhooks",
                Some(json!({"url": rx.url(&format!("/w{i}"))})),
            )
            .await;
        assert_eq!(r.status, 201, "{i}");
    }
    let create = |i: usize| {
        let gw = &gw;
        let url = rx.url(&format!("/at-once-{i}"));
        async move {
            gw.admin("POST", "/v1/webhooks", Some(json!({"url": url})))
                .await
                .status
                .as_u16()
        }
    };
    let (a, b, c, d, e, f) = tokio::join!(
        create(0),
        create(1),
        create(2),
        create(3),
        create(4),
        create(5)
    );
    let mut statuses = vec![a, b, c, d, e, f];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409]);
    assert_eq!(listed().await, 100);
    gw.stop().await;
}

/// Writes `text` to `path` and runs `keygate check-config` on it: it must fail; its output.
fn refused_config(path: &std::path::Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(path)
        .output();
    assert!(!out.status.success());
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_config_explains_bad_webhooks_and_secret_scanning() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        "http://127.0.0.1:9",
        &dir.path().join("k.db"),
        r#"
[[webhooks]]
url = "ftp://example.com/"
events = ["key.stolen"]
secret = "hunter2"
previous_secret = "hunter3"
[events]
retry_base_ms = 0
[secret_scanning]
enabled = true
"#,
    );
    let path = dir.path().join("keygate.toml");
    let text = refused_config(&path, &text);
    for needle in [
        "webhooks[0].url",
        "webhooks[0].events",
        "webhooks[0].secret",
        "webhooks[0].previous_secret",
        "events.retry_base_ms",
        "secret_scanning.github_keys_file",
    ] {
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    assert!(
        !text.contains("hunter2") && !text.contains("hunter3"),
        "a secret in check-config output"
    );

    // The same URL and events twice, the events in another order (and one named twice): every
    // event would reach that URL twice.
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let text = config_text(
        "http://127.0.0.1:9",
        &dir.path().join("k.db"),
        &format!(
            r#"
[[webhooks]]
url = "https://hooks.example.com/k"
events = ["key.created", "key.revoked"]
secret = "{secret}"
[[webhooks]]
url = "https://hooks.example.com/k"
events = ["key.revoked", "key.created", "key.revoked"]
secret = "{secret}"
"#
        ),
    );
    let text = refused_config(&path, &text);
    assert!(text.contains("webhooks[1] repeats"), "{text}");

    // A key file that exists but that `serve` would refuse: check-config refuses it too.
    let keys = dir.path().join("github-keys.json");
    for (content, why) in [
        (r#"{"public_keys": []}"#, "public_keys is empty"),
        ("not json", "expected {\"public_keys\""),
        (
            r#"{"public_keys": [{"key_identifier": "k", "key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}]}"#,
            "not an ECDSA P-256 public key",
        ),
    ] {
        std::fs::write(&keys, content).unwrap();
        let text = config_text(
            "http://127.0.0.1:9",
            &dir.path().join("k.db"),
            &format!(
                "[secret_scanning]\nenabled = true\ngithub_keys_file = \"{}\"\n",
                keys.display()
            ),
        );
        let text = refused_config(&path, &text);
        assert!(text.contains("secret_scanning.github_keys_file"), "{text}");
        assert!(text.contains(why), "{why} not in {text}");
    }
}

#[tokio::test]
async fn two_instances_on_one_redis_deliver_each_event_once_in_order_per_key() {
    let redis = crate::redis_support::RedisServer::start();
    let rx = Receiver::start().await;
    rx.status.store(503, Ordering::SeqCst);
    let upstream = Upstream::start().await;
    let extra = events_config(&rx.url("/hook"));
    let a = Gateway::start_on_store(
        upstream.clone(),
        &format!("url = \"{}\"", redis.unix_url()),
        &extra,
    )
    .await;
    let b =
        Gateway::start_on_store(upstream, &format!("url = \"{}\"", redis.tcp_url(0)), &extra).await;
    // A webhook made on one instance is served by both.
    let r = a
        .admin(
            "POST",
            "/v1/webhooks",
            Some(json!({"url": rx.url("/api"), "events": ["key.updated"]})),
        )
        .await;
    assert_eq!(r.status, 201);
    let api_secret = r.json()["secret"].as_str().unwrap().to_owned();
    let listed = b.admin("GET", "/v1/webhooks", None).await;
    assert_eq!(listed.json()["data"].as_array().unwrap().len(), 2);
    assert!(!String::from_utf8_lossy(&listed.body).contains("whsec_"));

    a.client("shared", "free").await;
    let mut ids = Vec::new();
    for (i, gw) in [&a, &b, &a].iter().enumerate() {
        let k = gw.key("shared", json!({"name": format!("k{i}")})).await;
        ids.push(k["id"].as_str().unwrap().to_owned());
    }
    // Renames made on both instances, alternating.
    for n in 1..=4 {
        for (i, id) in ids.iter().enumerate() {
            let gw = if (n + i) % 2 == 0 { &a } else { &b };
            let r = gw
                .admin(
                    "PATCH",
                    &format!("/v1/api-keys/{id}"),
                    Some(json!({"name": format!("{id}-{n}")})),
                )
                .await;
            assert_eq!(r.status, 200);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.all().iter().filter(|g| g.answered == 503).count() < 4 {
        assert!(
            Instant::now() < deadline,
            "no attempts while the receiver is down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rx.status.store(200, Ordering::SeqCst);
    // 1 client.created + 4 key.created (the client's first key too) + 12 key.updated.
    rx.wait_for("/hook", Duration::from_secs(15), |d| d.len() >= 17)
        .await;
    rx.wait_for("/api", Duration::from_secs(15), |d| d.len() >= 12)
        .await;
    // Let any duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = rx.delivered("/hook");
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for g in &delivered {
        *per_id.entry(g.id()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 17);
    assert!(
        per_id.values().all(|&n| n == 1),
        "an event delivered twice: {per_id:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let names: Vec<String> = delivered
            .iter()
            .map(|g| verify(SECRET, g).unwrap())
            .filter(|v| v["data"]["id"] == id.as_str())
            .map(|v| v["data"]["name"].as_str().unwrap().to_owned())
            .collect();
        let mut want = vec![format!("k{i}")];
        want.extend((1..=4).map(|n| format!("{id}-{n}")));
        assert_eq!(names, want, "events of key {id} out of order or missing");
    }
    let api = rx.delivered("/api");
    assert_eq!(api.len(), 12);
    for g in &api {
        assert_eq!(verify(&api_secret, g).unwrap()["type"], "key.updated");
    }
    verify_with_python(&api_secret, &api[0]).unwrap();
    // A change made on one instance is seen by the other.
    let hook = listed.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["source"] == "api")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = b
        .admin(
            "PATCH",
            &format!("/v1/webhooks/{hook}"),
            Some(json!({"events": "*"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = a.admin("GET", &format!("/v1/webhooks/{hook}"), None).await;
    assert_eq!(r.json()["events"], json!(["*"]));
    assert_eq!(r.json()["url"], rx.url("/api").as_str());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn events_pending_at_a_kill_9_on_redis_are_delivered_by_another_instance() {
    let redis = crate::redis_support::RedisServer::start();
    let rx = Receiver::start().await;
    rx.status.store(503, Ordering::SeqCst);
    let upstream = Upstream::start().await;
    let extra = events_config(&rx.url("/hook"))
        .replace("retry_base_ms = 50", "retry_base_ms = 1000")
        .replace("retry_max_ms = 200", "retry_max_ms = 1000");
    let store = format!("url = \"{}\"", redis.tcp_url(0));
    let dir = tempfile::tempdir().unwrap();
    let text = crate::support::store_config_text(&upstream.url(), &store, &extra);
    let mut a = Binary::serve(&text, dir.path()).json_logs().spawn();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{}/v1/clients", a.admin))
        .header("x-admin-key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"client_id": "gone", "license": "free"}).to_string(),
        )))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.all().len() < 2 {
        assert!(Instant::now() < deadline, "no attempt before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tried: Vec<String> = rx.all().iter().map(Got::id).collect();
    a.kill9();
    rx.status.store(200, Ordering::SeqCst);
    // Another instance on the same Redis takes the deliveries over.
    let b = Gateway::start_on_store(upstream, &store, &extra).await;
    rx.wait_for("/hook", Duration::from_secs(15), |d| d.len() >= 2)
        .await;
    let delivered = rx.delivered("/hook");
    let mut types: Vec<String> = delivered
        .iter()
        .map(|g| {
            verify(SECRET, g).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    types.sort();
    assert_eq!(types, ["client.created", "key.created"]);
    for g in &delivered {
        assert!(tried.contains(&g.id()), "a redelivery keeps its webhook-id");
    }
    b.stop().await;
}

#[tokio::test]
async fn key_expiring_on_redis_is_sent_once_per_key_and_window_by_either_instance() {
    let redis = crate::redis_support::RedisServer::start();
    let rx = Receiver::start().await;
    let upstream = Upstream::start().await;
    let extra =
        events_config(&rx.url("/hook")).replace("events = \"*\"", "events = [\"key.expiring\"]");
    let a = Gateway::start_on_store(
        upstream.clone(),
        &format!("url = \"{}\"", redis.unix_url()),
        &extra,
    )
    .await;
    let b =
        Gateway::start_on_store(upstream, &format!("url = \"{}\"", redis.tcp_url(0)), &extra).await;
    a.client("soon", "free").await;
    let week = a
        .key(
            "soon",
            json!({"expires_at": rfc3339_in(chrono::Duration::days(3))}),
        )
        .await;
    let day = b
        .key(
            "soon",
            json!({"expires_at": rfc3339_in(chrono::Duration::hours(12))}),
        )
        .await;
    let disabled = a
        .key(
            "soon",
            json!({"expires_at": rfc3339_in(chrono::Duration::hours(12)), "enabled": false}),
        )
        .await;
    let later = b
        .key(
            "soon",
            json!({"expires_at": rfc3339_in(chrono::Duration::days(30))}),
        )
        .await;
    rx.wait_for("/hook", Duration::from_secs(10), |d| d.len() >= 2)
        .await;
    // Several checks on both instances later: still one notice per key and window.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let got: Vec<Value> = rx
        .delivered("/hook")
        .iter()
        .map(|g| verify(SECRET, g).unwrap())
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    let days: HashMap<String, i64> = got
        .iter()
        .map(|v| {
            assert_eq!(v["type"], "key.expiring");
            (
                v["data"]["id"].as_str().unwrap().to_owned(),
                v["data"]["days"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(days[week["id"].as_str().unwrap()], 7);
    assert_eq!(days[day["id"].as_str().unwrap()], 1);
    for k in [&disabled, &later] {
        assert!(!days.contains_key(k["id"].as_str().unwrap()));
    }
    // Moving the week key's expiry within a day is a new expiry: one more notice.
    let r = a
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{}", week["id"].as_str().unwrap()),
            Some(json!({"expires_at": rfc3339_in(chrono::Duration::hours(6))})),
        )
        .await;
    assert_eq!(r.status, 200);
    rx.wait_for("/hook", Duration::from_secs(10), |d| d.len() >= 3)
        .await;
    let last = verify(SECRET, rx.delivered("/hook").last().unwrap()).unwrap();
    assert_eq!(last["data"]["id"], week["id"]);
    assert_eq!(last["data"]["days"], 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn https_webhooks_are_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::tls_ws::pki(dir.path(), "hooks");
    let rx = Receiver::start_with_tls(Some(crate::tls_ws::upstream_tls(&pki))).await;
    let url = format!("https://localhost:{}/hook", rx.addr.port());
    let trusted = events_config_with(&url, &format!("ca_file = \"{}\"\n", pki.ca_pem.display()));
    let gw = Gateway::start_with(&trusted).await;
    gw.client("tls", "free").await;
    rx.wait_for("/hook", Duration::from_secs(10), |d| d.len() >= 2)
        .await;
    for g in rx.delivered("/hook") {
        verify(SECRET, &g).unwrap();
    }
    gw.stop().await;

    // Without the CA (webpki roots only) the receiver's certificate is refused: nothing is sent.
    let before = rx.all().len();
    let gw = Gateway::start_with(&events_config(&url)).await;
    gw.client("untrusted", "free").await;
    let hook = gw.admin("GET", "/v1/webhooks", None).await.json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let attempts = loop {
        let r = gw
            .admin("GET", &format!("/v1/webhooks/{hook}/deliveries"), None)
            .await;
        let a = r.json()["data"].as_array().unwrap().clone();
        if !a.is_empty() {
            break a;
        }
        assert!(Instant::now() < deadline, "no attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(attempts[0]["status"].is_null());
    assert_eq!(attempts[0]["outcome"], "retrying");
    let error = attempts[0]["error"].as_str().unwrap();
    assert!(
        error.contains("certificate") || error.contains("Certificate"),
        "{error}"
    );
    assert_eq!(rx.all().len(), before, "a request reached the receiver");
    gw.stop().await;
}

/// `quota.threshold` through the real gateway: a client's daily quota and a key's credits,
/// each crossing 80 % and 100 % once, delivered signed (verified with the Standard Webhooks
/// verifier) with ids and numbers only.
#[tokio::test]
async fn quota_and_credit_thresholds_are_delivered_once_each_and_signed() {
    let rx = Receiver::start().await;
    let gw = Gateway::start_with(&format!(
        "{}{THRESHOLD_PLANS}",
        events_config(&rx.url("/all"))
    ))
    .await;
    thresholds_end_to_end(gw, rx).await;
}

/// The same on the Redis store (the events written by the charge script).
#[tokio::test]
async fn quota_and_credit_thresholds_on_redis_are_delivered_once_each_and_signed() {
    let redis = crate::redis_support::RedisServer::start();
    let rx = Receiver::start().await;
    let gw = Gateway::start_on_store(
        Upstream::start().await,
        &format!("url = \"{}\"", redis.tcp_url(0)),
        &format!("{}{THRESHOLD_PLANS}", events_config(&rx.url("/all"))),
    )
    .await;
    thresholds_end_to_end(gw, rx).await;
}

const THRESHOLD_PLANS: &str = r#"
[plans.bulk]
rate_limit = { per_second = 100000, burst = 100000 }
[plans.metered]
rate_limit = { per_second = 100000, burst = 100000 }
quota = { requests = 5, per = "day" }
"#;

async fn thresholds_end_to_end(gw: Gateway, rx: Receiver) {
    let (metered, _) = gw.client("metered-co", "metered").await;
    let (_, _) = gw.client("payg-co", "bulk").await;
    let k = gw
        .key("payg-co", json!({"credits": {"remaining": 10}}))
        .await;
    let (payg, payg_id) = (
        k["key"].as_str().unwrap().to_owned(),
        k["id"].as_str().unwrap().to_owned(),
    );
    let thresholds = |rx: &Receiver| -> Vec<Value> {
        rx.delivered("/all")
            .iter()
            .filter(|g| g.json()["type"] == "quota.threshold")
            .map(|g| verify(SECRET, g).unwrap_or_else(|e| panic!("{e}: {g:?}"))["data"].clone())
            .collect()
    };
    // Quota of 5: the 4th request crosses 80 %, the 5th 100 %, the refused 6th and 7th nothing.
    for i in 1..=7 {
        let r = gw.get_with_key("/", &metered).await;
        assert_eq!(r.status, if i <= 5 { 200 } else { 429 }, "request {i}");
    }
    // Credits of 10: the 8th request crosses 80 %, the 10th 100 %.
    for i in 1..=11 {
        let r = gw.get_with_key("/", &payg).await;
        assert_eq!(r.status, if i <= 10 { 200 } else { 429 }, "request {i}");
    }
    rx.wait_for("/all", Duration::from_secs(10), |d| {
        d.iter()
            .filter(|g| g.json()["type"] == "quota.threshold")
            .count()
            >= 4
    })
    .await;
    // Nothing more comes: each threshold fired once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = thresholds(&rx);
    let mut seen: Vec<(String, u64, u64, u64, u64)> = got
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["threshold"].as_u64().unwrap(),
                d["limit"].as_u64().unwrap(),
                d["used"].as_u64().unwrap(),
                d["remaining"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("credits".to_owned(), 80, 10, 8, 2),
            ("credits".to_owned(), 100, 10, 10, 0),
            ("quota".to_owned(), 80, 5, 4, 1),
            ("quota".to_owned(), 100, 5, 5, 0),
        ]
    );
    for d in &got {
        match d["kind"].as_str().unwrap() {
            "quota" => {
                assert_eq!(d["client_id"], "metered-co");
                assert_eq!(d["key_id"], Value::Null);
                assert_eq!(d["period"], "day");
            }
            _ => {
                assert_eq!(d["client_id"], "payg-co");
                assert_eq!(d["key_id"], payg_id.as_str());
                assert_eq!(d["period"], Value::Null);
            }
        }
    }
    for g in rx.delivered("/all") {
        let body = String::from_utf8_lossy(&g.body);
        for secret in [&metered, &payg] {
            assert!(
                !body.contains(secret.as_str()),
                "a key in a webhook: {body}"
            );
        }
        assert!(!body.contains("hash"), "{body}");
    }
    let one = rx
        .delivered("/all")
        .into_iter()
        .find(|g| g.json()["type"] == "quota.threshold")
        .unwrap();
    verify_with_python(SECRET, &one).unwrap();
    gw.stop().await;
}

/// A receiver answering `410 Gone` does not want the delivery (Standard Webhooks): it is
/// given up at once, not tried again for a day.
#[tokio::test]
async fn a_receiver_answering_gone_is_not_tried_again() {
    let rx = Receiver::start().await;
    rx.status.store(410, Ordering::SeqCst);
    let gw = Gateway::start_with(&events_config(&rx.url("/hook"))).await;
    gw.client("gone", "free").await;
    // client.created and key.created, each tried once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.all().len() < 2 {
        assert!(Instant::now() < deadline, "not tried: {:?}", rx.all().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // With a 50 ms backoff, a retried delivery would have been tried again several times.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let tried = rx.all();
    let mut ids: Vec<String> = tried.iter().map(Got::id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        tried.len(),
        ids.len(),
        "a delivery tried twice: {}",
        tried.len()
    );
    let text = String::from_utf8_lossy(&gw.admin("GET", "/metrics", None).await.body).into_owned();
    let failed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("keygate_webhook_events_failed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(failed, ids.len() as u64, "{text}");
    gw.stop().await;
}

/// A receiver's `Retry-After` (seconds) on a failure is honoured: the delivery is not tried
/// again before it, though the backoff (50 ms here) would have; without it, the backoff.
#[tokio::test]
async fn a_receivers_retry_after_is_waited_for() {
    let gap = first_retry_gap(1, false).await;
    assert!(
        gap >= Duration::from_millis(900),
        "tried again after {gap:?}"
    );
}

/// The same given as an HTTP date 2 s ahead (whole seconds: at least 1 s from when it was sent).
#[tokio::test]
async fn a_receivers_retry_after_as_an_http_date_is_waited_for() {
    let gap = first_retry_gap(2, true).await;
    assert!(
        gap >= Duration::from_millis(900),
        "tried again after {gap:?}"
    );
}

/// The time between the first attempt of a delivery and the next, the receiver answering 503
/// with `Retry-After` `secs` (as a date when `as_date`).
async fn first_retry_gap(secs: u16, as_date: bool) -> Duration {
    let rx = Receiver::start().await;
    rx.status.store(503, Ordering::SeqCst);
    rx.retry_after.store(secs, Ordering::SeqCst);
    rx.retry_after_as_date.store(as_date, Ordering::SeqCst);
    let gw = Gateway::start_with(&events_config(&rx.url("/hook"))).await;
    gw.client("later", "free").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let twice = |rx: &Receiver| {
        let all = rx.all();
        all.iter()
            .filter_map(|first| {
                let again = all
                    .iter()
                    .find(|g| g.id() == first.id() && g.at > first.at)?;
                Some(again.at - first.at)
            })
            .min()
    };
    let gap = loop {
        if let Some(gap) = twice(&rx) {
            break gap;
        }
        assert!(Instant::now() < deadline, "never tried again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    gw.stop().await;
    gap
}
