//! Leaked-key reports in GitHub's secret scanning partner format: a report signed with a key
//! of a key file in GitHub's published format (made here from a locally generated P-256 key
//! pair) revokes the live keys it names, on every instance within 100 ms; forged, unsigned,
//! malformed or oversized reports are refused and change nothing; false positives are labelled;
//! `action = "notify"` keeps the key working; 1,000 tokens are handled in one request.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use keygate::keys::KeyFormat;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::events::{Receiver, SECRET, events_config, verify};
use crate::redis_support::RedisServer;
use crate::support::{Gateway, Reply, Upstream};

const PATH: &str = "/_keygate/secret-scanning/github";
const KEY_ID: &str = "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a";

/// A P-256 key pair standing in for GitHub's, and the key file naming it (plus an older key).
pub struct Signer {
    key: EcdsaKeyPair,
    other: EcdsaKeyPair,
    _dir: tempfile::TempDir,
}

fn key_pair() -> (EcdsaKeyPair, String) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &kp.serialize_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    (pair, kp.public_key_pem())
}

impl Signer {
    /// The signer and the `[secret_scanning]` section using its key file.
    pub fn config(action: &str) -> (String, Signer) {
        let dir = tempfile::tempdir().unwrap();
        let (key, pem) = key_pair();
        let (_, old_pem) = key_pair();
        let (other, _) = key_pair();
        let file = dir.path().join("github-keys.json");
        let keys = json!({"public_keys": [
            {"key_identifier": "0ld", "key": old_pem, "is_current": false},
            {"key_identifier": KEY_ID, "key": pem, "is_current": true},
        ]});
        std::fs::write(&file, keys.to_string()).unwrap();
        let text = format!(
            "[secret_scanning]\nenabled = true\ngithub_keys_file = \"{}\"\naction = \"{action}\"\n",
            file.display()
        );
        (
            text,
            Signer {
                key,
                other,
                _dir: dir,
            },
        )
    }

    pub fn sign_with(key: &EcdsaKeyPair, body: &[u8]) -> String {
        let sig = key.sign(&ring::rand::SystemRandom::new(), body).unwrap();
        STANDARD.encode(sig.as_ref())
    }

    pub fn sign(&self, body: &[u8]) -> String {
        Self::sign_with(&self.key, body)
    }

    /// POSTs a report signed with the file's current key.
    pub async fn post(&self, gw: &Gateway, body: &str) -> Reply {
        let sig = self.sign(body.as_bytes());
        post_raw(
            gw,
            body.as_bytes().to_vec(),
            &[
                ("github-public-key-identifier", KEY_ID),
                ("github-public-key-signature", &sig),
            ],
        )
        .await
    }
}

async fn post_raw(gw: &Gateway, body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::post(format!("http://{}{PATH}", gw.proxy))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    gw.send(b.body(Full::new(Bytes::from(body))).unwrap()).await
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn report(tokens: &[&str]) -> String {
    Value::Array(
        tokens
            .iter()
            .map(|t| {
                json!({"token": t, "type": "keygate_api_key",
                    "url": "https://github.com/octo/leaky/blob/main/config.yml",
                    "source": "content"})
            })
            .collect(),
    )
    .to_string()
}

async fn key_state(gw: &Gateway, id: &str) -> Value {
    let r = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.status, 200);
    r.json()
}

#[tokio::test]
async fn a_signed_report_revokes_the_live_key_and_labels_the_rest() {
    let (text, signer) = Signer::config("revoke");
    let gw = Gateway::start_with(&text).await;
    let (key, id) = gw.client("leaky", "pro").await;
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    let unknown = KeyFormat::new("kg_")
        .generate()
        .plaintext
        .expose()
        .to_owned();
    let body = report(&[&key, "ghp_notakeygatekey", &unknown]);
    let r = signer.post(&gw, &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        json!([
            {"token_hash": sha256_hex(&key), "token_type": "keygate_api_key", "label": "true_positive"},
            {"token_hash": sha256_hex("ghp_notakeygatekey"), "token_type": "keygate_api_key", "label": "false_positive"},
            {"token_hash": sha256_hex(&unknown), "token_type": "keygate_api_key", "label": "false_positive"},
        ])
    );
    assert!(!String::from_utf8_lossy(&r.body).contains(&key));
    // The next request with the key is refused.
    let r = gw.get_with_key("/x", &key).await;
    assert_eq!(r.status, 401);
    let k = key_state(&gw, &id).await;
    assert_eq!(k["enabled"], false);
    assert_eq!(k["disabled_by"], "admin");
    // Reported again: still a true positive, nothing more to do.
    let r = signer.post(&gw, &report(&[&key])).await;
    assert_eq!(r.json()[0]["label"], "true_positive");
    gw.stop().await;
}

/// The revoke and its `key.leaked` are one write: a store that refuses the event leaves the key
/// as it was (503, GitHub sends the report again), and the resend revokes it with one event
/// saying `revoked`.
#[tokio::test]
async fn a_revoke_the_store_cannot_finish_changes_nothing_and_the_resend_revokes() {
    let (text, signer) = Signer::config("revoke");
    let gw = Gateway::start_with(&text).await;
    let (key, id) = gw.client("leaky", "pro").await;
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    // The store refuses to write a key.leaked event, as a full disk would.
    db.execute_batch(
        "CREATE TRIGGER no_leak BEFORE INSERT ON webhook_events WHEN NEW.type = 'key.leaked' \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    let r = signer.post(&gw, &report(&[&key])).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["retry-after"], "5");
    assert_eq!(key_state(&gw, &id).await["enabled"], true);
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    db.execute_batch("DROP TRIGGER no_leak").unwrap();
    let r = signer.post(&gw, &report(&[&key])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()[0]["label"], "true_positive");
    assert_eq!(gw.get_with_key("/x", &key).await.status, 401);
    let events: Vec<(String, String)> = db
        .prepare("SELECT type, body FROM webhook_events WHERE ordering_key = ?1 ORDER BY seq")
        .unwrap()
        .query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        ["key.created", "key.updated", "key.revoked", "key.leaked"]
    );
    let leaked: Value = serde_json::from_str(&events[3].1).unwrap();
    assert_eq!(leaked["data"]["action"], "revoked");
    assert_eq!(leaked["data"]["id"], id.as_str());
    drop(db);
    gw.stop().await;
}

/// A key its client disabled and GitHub then reports is disabled by the admin: the client may
/// lift its own disable, never a leak's (the report once left the client's disable as it was).
#[tokio::test]
async fn a_reported_key_its_client_disabled_cannot_be_enabled_by_the_client() {
    let (text, signer) = Signer::config("revoke");
    let gw = Gateway::start_with(&text).await;
    let manager = gw.manager("leaky", "pro").await;
    let as_client = [("x-api-key", manager.as_str())];
    let v = gw.key("leaky", json!({})).await;
    let (key, id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    );
    let path = format!("/v1/api-keys/{id}");
    let r = gw
        .admin_as("PATCH", &path, Some(json!({"enabled": false})), &as_client)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["disabled_by"], "client");
    let r = signer.post(&gw, &report(&[&key])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()[0]["label"], "true_positive");
    assert_eq!(key_state(&gw, &id).await["disabled_by"], "admin");
    let r = gw
        .admin_as("PATCH", &path, Some(json!({"enabled": true})), &as_client)
        .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(gw.get_with_key("/x", &key).await.status, 401);
    // One key.leaked, saying the key was disabled already; a resend writes nothing more but
    // its own key.leaked.
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let leaked = |db: &rusqlite::Connection| -> Vec<(String, Value)> {
        db.prepare("SELECT type, body FROM webhook_events WHERE ordering_key = ?1 ORDER BY seq")
            .unwrap()
            .query_map([&id], |r| Ok((r.get(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .map(|e| {
                let (t, b) = e.unwrap();
                (t, serde_json::from_str(&b).unwrap())
            })
            .collect()
    };
    let events = leaked(&db);
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "key.created",
            "key.updated",
            "key.revoked",
            "key.updated",
            "key.leaked"
        ]
    );
    assert_eq!(events[4].1["data"]["action"], "already_disabled");
    let r = signer.post(&gw, &report(&[&key])).await;
    assert_eq!(r.status, 200);
    let events = leaked(&db);
    assert_eq!(events.len(), 6);
    assert_eq!(events[5].0, "key.leaked");
    assert_eq!(events[5].1["data"]["action"], "already_disabled");
    drop(db);
    gw.stop().await;
}

#[tokio::test]
async fn forged_unsigned_and_unknown_key_reports_are_refused_and_change_nothing() {
    let (text, signer) = Signer::config("revoke");
    let gw = Gateway::start_with(&text).await;
    let (key, id) = gw.client("target", "pro").await;
    let body = report(&[&key]);
    let good = signer.sign(body.as_bytes());
    let forged = Signer::sign_with(&signer.other, body.as_bytes());
    let other_body = signer.sign(report(&["something else"]).as_bytes());
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("unsigned", vec![]),
        (
            "no identifier",
            vec![("github-public-key-signature", &good)],
        ),
        (
            "no signature",
            vec![("github-public-key-identifier", KEY_ID)],
        ),
        (
            "another key's signature",
            vec![
                ("github-public-key-identifier", KEY_ID),
                ("github-public-key-signature", &forged),
            ],
        ),
        (
            "an unknown key id",
            vec![
                ("github-public-key-identifier", "no-such-key"),
                ("github-public-key-signature", &good),
            ],
        ),
        (
            "the old key's id",
            vec![
                ("github-public-key-identifier", "0ld"),
                ("github-public-key-signature", &good),
            ],
        ),
        (
            "a signature of another body (replayed)",
            vec![
                ("github-public-key-identifier", KEY_ID),
                ("github-public-key-signature", &other_body),
            ],
        ),
        (
            "not base64",
            vec![
                ("github-public-key-identifier", KEY_ID),
                ("github-public-key-signature", "%%%"),
            ],
        ),
    ];
    for (what, headers) in cases {
        let r = post_raw(&gw, body.clone().into_bytes(), &headers).await;
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.code(), "invalid_signature", "{what}");
        assert!(!String::from_utf8_lossy(&r.body).contains(&key));
        assert_eq!(gw.get_with_key("/x", &key).await.status, 200, "{what}");
    }
    // A body altered after signing.
    let altered = body.replace("leaky", "leakz");
    let r = post_raw(
        &gw,
        altered.into_bytes(),
        &[
            ("github-public-key-identifier", KEY_ID),
            ("github-public-key-signature", &good),
        ],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(key_state(&gw, &id).await["enabled"], true);
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_reports_are_refused() {
    let (text, signer) = Signer::config("revoke");
    let gw = Gateway::start_with(&text).await;
    let (key, id) = gw.client("target", "pro").await;
    for body in [
        "not json".to_owned(),
        json!({"token": key}).to_string(),
        json!([{"type": "x"}]).to_string(),
        json!([{"token": 5}]).to_string(),
    ] {
        let r = signer.post(&gw, &body).await;
        assert_eq!(r.status, 400, "{body}");
    }
    // Over 1 MiB: 413 (signed or not), nothing read further.
    let mut big = report(&[&key]);
    big.push_str(&" ".repeat(1 << 20));
    let r = signer.post(&gw, &big).await;
    assert_eq!(r.status, 413);
    let r = post_raw(&gw, big.into_bytes(), &[]).await;
    assert_eq!(r.status, 413);
    // A body whose chunked framing is broken is a bad request, not a large one.
    let r = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                 Connection: close\r\n\r\nzz\r\n[]\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "no answer in time");
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(key_state(&gw, &id).await["enabled"], true);
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    // Other methods are not the report endpoint.
    let r = gw
        .send(
            Request::get(format!("http://{}{PATH}", gw.proxy))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_ne!(r.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn the_notify_action_reports_the_leak_and_keeps_the_key() {
    let rx = Receiver::start().await;
    let (text, signer) = Signer::config("notify");
    let gw = Gateway::start_with(&format!("{}{text}", events_config(&rx.url("/hook")))).await;
    let (key, id) = gw.client("noisy", "pro").await;
    let r = signer.post(&gw, &report(&[&key])).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()[0]["label"], "true_positive");
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    assert_eq!(key_state(&gw, &id).await["enabled"], true);
    rx.wait_for("/hook", Duration::from_secs(10), |d| {
        d.iter().any(|g| g.json()["type"] == "key.leaked")
    })
    .await;
    let leaked = rx
        .delivered("/hook")
        .into_iter()
        .map(|g| verify(SECRET, &g).unwrap())
        .find(|v| v["type"] == "key.leaked")
        .unwrap();
    assert_eq!(leaked["data"]["id"], id.as_str());
    assert_eq!(leaked["data"]["action"], "notified");
    assert_eq!(
        leaked["data"]["url"],
        "https://github.com/octo/leaky/blob/main/config.yml"
    );
    assert!(!leaked.to_string().contains(&key));
    assert!(
        !rx.delivered("/hook")
            .iter()
            .any(|g| g.json()["type"] == "key.revoked")
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_report_of_1000_tokens_is_handled_in_one_request() {
    let (text, signer) = Signer::config("revoke");
    let gw = Gateway::start_with(&format!("{text}[keys]\nmax_per_client = 0\n")).await;
    let (first, _) = gw.client("many", "pro").await;
    let mut live = vec![first];
    for i in 0..19 {
        let k = gw.key("many", json!({"name": format!("k{i}")})).await;
        live.push(k["key"].as_str().unwrap().to_owned());
    }
    let format = KeyFormat::new("kg_");
    let mut tokens: Vec<String> = (0..980)
        .map(|_| format.generate().plaintext.expose().to_owned())
        .collect();
    for (i, k) in live.iter().enumerate() {
        tokens.insert(i * 50, k.clone());
    }
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let body = report(&refs);
    assert!(body.len() < 1 << 20);
    let started = Instant::now();
    let r = signer.post(&gw, &body).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let labels = r.json().as_array().unwrap().clone();
    assert_eq!(labels.len(), 1000);
    for (t, l) in tokens.iter().zip(&labels) {
        assert_eq!(l["token_hash"], sha256_hex(t));
        let want = if live.contains(t) {
            "true_positive"
        } else {
            "false_positive"
        };
        assert_eq!(l["label"], want);
    }
    for k in &live {
        assert_eq!(gw.get_with_key("/x", k).await.status, 401);
    }
    eprintln!("1,000-token report answered in {took:?}");
    gw.stop().await;
}

#[tokio::test]
async fn the_endpoint_is_off_by_default() {
    let (_, signer) = Signer::config("revoke");
    let gw = Gateway::start().await;
    let (key, _) = gw.client("quiet", "pro").await;
    let r = signer.post(&gw, &report(&[&key])).await;
    // Not the report endpoint: an unauthenticated request on the catch-all route.
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_credentials");
    assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_leak_reported_to_one_instance_is_enforced_by_every_instance_within_100_ms() {
    let redis = RedisServer::start();
    let (text, signer) = Signer::config("revoke");
    let upstream = Upstream::start().await;
    let a = Gateway::start_on_store(
        upstream.clone(),
        &format!("url = \"{}\"", redis.unix_url()),
        &text,
    )
    .await;
    let b =
        Gateway::start_on_store(upstream, &format!("url = \"{}\"", redis.tcp_url(0)), &text).await;
    let (key, _) = a.client("shared", "pro").await;
    for gw in [&a, &b] {
        for _ in 0..3 {
            assert_eq!(gw.get_with_key("/warm", &key).await.status, 200);
        }
    }
    let r = signer.post(&a, &report(&[&key])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let reported = Instant::now();
    assert_eq!(r.json()[0]["label"], "true_positive");
    assert_eq!(a.get_with_key("/x", &key).await.status, 401);
    loop {
        let s = b.get_with_key("/x", &key).await.status;
        if s == 401 {
            break;
        }
        assert!(
            reported.elapsed() < Duration::from_millis(100),
            "the other instance still answers {s} after {:?}",
            reported.elapsed()
        );
    }
    eprintln!(
        "leak revocation enforced by the other instance after {:?}",
        reported.elapsed()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_audit_line_names_the_key_never_the_token_or_its_hash() {
    use crate::support::binary::Binary;
    let (text, signer) = Signer::config("revoke");
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        crate::support::config_text(&upstream.url(), &dir.path().join("keygate.db"), &text);
    let gw = Binary::serve(&config, dir.path()).json_logs().spawn();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let send = |req: Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            use http_body_util::BodyExt;
            let res = client.request(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (status, v) = send(
        Request::post(format!("http://{}/v1/clients", gw.admin))
            .header("x-admin-key", crate::support::ADMIN_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"client_id": "audited", "license": "pro"}).to_string(),
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    let key = v["api_key"]["key"].as_str().unwrap().to_owned();
    let id = v["api_key"]["id"].as_str().unwrap().to_owned();
    let body = report(&[&key]);
    let sig = signer.sign(body.as_bytes());
    let (status, v) = send(
        Request::post(format!("http://{}{PATH}", gw.proxy))
            .header("github-public-key-identifier", KEY_ID)
            .header("github-public-key-signature", sig)
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v[0]["label"], "true_positive");
    let line = gw.wait_for_line("key.leaked", Duration::from_secs(5));
    assert!(line.contains(&id), "{line}");
    assert!(
        line.contains("https://github.com/octo/leaky/blob/main/config.yml"),
        "{line}"
    );
    assert!(!gw.log_contains(&key), "the token in the log");
    assert!(
        !gw.log_contains(&sha256_hex(&key)),
        "the token's hash in the log"
    );

    // Forged reports are failed authentications of their sender: each audited up to the
    // allowance (20 a minute by default), then refused 429 without another line.
    let forged = report(&["kg_forged"]);
    let mut statuses = Vec::new();
    for _ in 0..25 {
        let res = client
            .request(
                Request::post(format!("http://{}{PATH}", gw.proxy))
                    .header("github-public-key-identifier", KEY_ID)
                    .header(
                        "github-public-key-signature",
                        Signer::sign_with(&signer.other, forged.as_bytes()),
                    )
                    .body(Full::new(Bytes::from(forged.clone())))
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(&statuses[..20], &[401; 20]);
    assert_eq!(&statuses[20..], &[429; 5]);
    let refused = || {
        gw.lines()
            .iter()
            .filter(|l| l.contains("secret_scanning.report"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused() < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (The log is read as it comes: a line that should not exist gets the time to show.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        refused(),
        20,
        "one audit line per refusal up to the allowance"
    );
}
