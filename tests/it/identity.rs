//! Signed identity (`[identity]`): the real binary signs `X-Keygate-Assertion` with keys kept in
//! a real SQLite file or a real redis-server, and the upstream verifies it against the live
//! `/.well-known/jwks.json` with stock libraries: PyJWT's `PyJWKClient` (the README's example,
//! `examples/verify-upstream/verify.py`, run as it is) and Rust `jsonwebtoken`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::redis_support::RedisServer;
use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Reply, Upstream, config_text, store_config_text};

const ASSERTION: &str = "x-keygate-assertion";

/// Routes of every test gateway: the catch-all (default audience: the upstream's origin), one
/// with its own audience, one public.
const ROUTES: &str = r#"
[[routes]]
path = "/"
[[routes]]
path = "/billing"
audience = "https://billing.internal"
[[routes]]
path = "/public"
auth = "none"
"#;

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    call_with(addr, method, path, headers, body, false).await
}

/// One request; `h2`: HTTP/2 with prior knowledge (the hyper engine).
async fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
    h2: bool,
) -> Reply {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http::<Full<Bytes>>();
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    send(client, b, body).await
}

/// Sends `body` as JSON with the request `b` built.
async fn send(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    mut b: http::request::Builder,
    body: Bytes,
) -> Reply {
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    let res = client
        .request(b.body(Full::new(body)).unwrap())
        .await
        .expect("request sent");
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn admin(bin: &Binary, method: &str, path: &str, body: Option<Value>) -> Reply {
    call(bin.admin, method, path, &[("x-admin-key", ADMIN_KEY)], body).await
}

/// A client of license `pro` with a key holding READ and WRITE; answers the key.
async fn client(bin: &Binary, id: &str) -> String {
    let r = admin(
        bin,
        "POST",
        "/v1/clients",
        Some(json!({"client_id": id, "license": "pro"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = admin(
        bin,
        "POST",
        "/v1/api-keys",
        Some(json!({"name": "k", "client_id": id, "permissions": ["READ", "WRITE"]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["key"].as_str().unwrap().to_owned()
}

/// A proxied GET with `key`; answers the assertion the upstream received.
async fn assertion_for(bin: &Binary, up: &Upstream, path: &str, key: &str) -> String {
    let r = call(
        bin.proxy,
        "GET",
        path,
        &[("authorization", &format!("Bearer {key}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = up.last();
    let all: Vec<_> = seen.headers.get_all(ASSERTION).iter().collect();
    assert_eq!(all.len(), 1, "one assertion: {:?}", seen.headers);
    all[0].to_str().unwrap().to_owned()
}

fn jwks_url(bin: &Binary) -> String {
    format!("http://{}/.well-known/jwks.json", bin.proxy)
}

async fn jwks(addr: SocketAddr) -> Value {
    let r = call(addr, "GET", "/.well-known/jwks.json", &[], None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// The Python of `scripts/test.sh`'s PyJWT environment (made here on first use when the
/// tests run on their own).
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyjwt-venv");
    let py = venv.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import jwt, cryptography"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready(&py) {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "python3 -m venv {v} && {v}/bin/pip install -q --disable-pip-version-check 'pyjwt[crypto]>=2.8,<3'",
                    v = venv.display()
                ),
            ])
            .output()
            .expect("sh runs");
        assert!(
            out.status.success() && ready(&py),
            "installing pyjwt[crypto] (PyPI) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    py
}

/// The README's Python example: `Ok(claims)` or `Err(why)`.
fn py_verify(jwks_url: &str, audience: &str, token: &str) -> Result<Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verify-upstream/verify.py");
    let mut child = Command::new(python())
        .arg(script)
        .args([jwks_url, audience])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Rust `jsonwebtoken`: the key named by `kid` in `jwks`, the algorithm pinned to `alg`.
fn rust_verify(jwks: &Value, alg: Algorithm, audience: &str, token: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let set: JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let kid = header.kid.ok_or("no kid")?;
    let jwk = set.find(&kid).ok_or("no such key in the set")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut v = Validation::new(alg);
    v.leeway = 0;
    v.set_audience(&[audience]);
    v.set_issuer(&["keygate"]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// The README's Rust example (its audience a parameter here).
fn readme_verify(
    jwks: &JwkSet,
    assertion: &str,
    audience: &str,
) -> jsonwebtoken::errors::Result<Value> {
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{decode, decode_header};
    let kid = decode_header(assertion)?
        .kid
        .ok_or(ErrorKind::InvalidToken)?;
    let jwk = jwks.find(&kid).ok_or(ErrorKind::InvalidToken)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[audience]);
    v.set_issuer(&["keygate"]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    Ok(decode(assertion, &DecodingKey::from_jwk(jwk)?, &v)?.claims)
}

fn header_of(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
}

fn claims_of(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

/// `token` with its payload replaced by `edit(claims)`, signature kept.
fn tampered(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims = claims_of(token);
    edit(&mut claims);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

fn start(dir: &Path, text: &str) -> Binary {
    Binary::serve(text, dir)
        .json_logs()
        .env("RUST_LOG", "keygate=debug,info")
        .spawn()
}

/// A gateway on a SQLite file in `dir`, signing with `identity` (the body of `[identity]`).
fn sqlite_gateway(up: &Upstream, dir: &Path, identity: &str, extra: &str) -> Binary {
    let text = config_text(
        &up.url(),
        &dir.join("k.db"),
        &format!("[identity]\nsign = true\n{identity}\n{extra}\n{ROUTES}"),
    );
    start(dir, &text)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_verifies_the_assertion_against_the_live_jwks_with_stock_libraries() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sqlite_gateway(&up, dir.path(), "", "");
    let key = client(&gw, "acme").await;
    let origin = up.url();

    // A spoofed assertion from the client is dropped; the gateway's own one arrives.
    let r = call(
        gw.proxy,
        "GET",
        "/things",
        &[
            ("authorization", &format!("Bearer {key}")),
            (ASSERTION, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."),
        ],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let token = up.last().headers[ASSERTION].to_str().unwrap().to_owned();
    assert_ne!(token, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.");

    // PyJWT's PyJWKClient against the proxy listener's key set (the README example).
    let claims = py_verify(&jwks_url(&gw), &origin, &token).unwrap();
    assert_eq!(claims["iss"], "keygate");
    assert_eq!(claims["sub"], "acme");
    assert_eq!(claims["aud"], origin);
    assert_eq!(claims["permissions"], json!(["READ", "WRITE"]));
    assert_eq!(claims["license"], "pro");
    assert_eq!(
        claims["key_id"],
        up.last().headers["x-keygate-key-id"].to_str().unwrap()
    );
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 60, "default ttl_secs");
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    let header = header_of(&token);
    assert_eq!(header["alg"], "EdDSA");

    // Rust jsonwebtoken, against the admin listener's key set (the same keys, no credential).
    let set = jwks(gw.admin).await;
    assert_eq!(set, jwks(gw.proxy).await);
    assert_eq!(kids(&set), [header["kid"].as_str().unwrap()]);
    assert_eq!(set["keys"][0]["kty"], "OKP");
    assert_eq!(
        rust_verify(&set, Algorithm::EdDSA, &origin, &token).unwrap(),
        claims
    );
    let parsed: JwkSet = serde_json::from_value(set.clone()).unwrap();
    assert_eq!(readme_verify(&parsed, &token, &origin).unwrap(), claims);
    assert!(
        readme_verify(
            &parsed,
            &tampered(&token, |c| c["sub"] = json!("x")),
            &origin
        )
        .is_err()
    );

    // The assertion is reused (same jti) until it nears its expiry; HTTP/2 (the hyper engine)
    // carries the same one.
    assert_eq!(assertion_for(&gw, &up, "/things", &key).await, token);
    let r = call_with(
        gw.proxy,
        "GET",
        "/h2",
        &[("authorization", &format!("Bearer {key}"))],
        None,
        true,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers[ASSERTION], token.as_str());

    // Another route has its own audience: an assertion for one upstream does not verify at
    // another (no replay across upstreams).
    let billing = assertion_for(&gw, &up, "/billing/x", &key).await;
    assert_eq!(
        py_verify(&jwks_url(&gw), "https://billing.internal", &billing).unwrap()["aud"],
        "https://billing.internal"
    );
    let err = py_verify(&jwks_url(&gw), &origin, &billing).unwrap_err();
    assert!(err.contains("InvalidAudience"), "{err}");
    assert!(py_verify(&jwks_url(&gw), "https://billing.internal", &token).is_err());

    // A change of the key's permissions gives a new assertion at once.
    let key_id = claims["key_id"].as_str().unwrap();
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{key_id}"),
        Some(json!({"permissions": ["READ"]})),
    )
    .await;
    assert_eq!(r.status, 200);
    let after = assertion_for(&gw, &up, "/things", &key).await;
    assert_eq!(
        py_verify(&jwks_url(&gw), &origin, &after).unwrap()["permissions"],
        json!(["READ"])
    );

    // A public route has no caller: nothing to assert.
    let r = call(gw.proxy, "GET", "/public/x", &[(ASSERTION, "forged")], None).await;
    assert_eq!(r.status, 200);
    assert!(!up.last().headers.contains_key(ASSERTION));
    // The key set is served to anyone, on GET and HEAD only.
    let r = call(gw.proxy, "HEAD", "/.well-known/jwks.json", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert!(
        r.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age=")
    );
    // HEAD answers carry the length of the GET answer's body (RFC 9110 §8.6), on both
    // engines (HTTP/1.1; HTTP/2 through hyper), for the key set and the health check.
    // And keygate's own refusals (here 401 without a key): over HTTP/2 a refusal's body on a
    // HEAD answer was a DATA frame the client reset the stream for.
    for h2 in [false, true] {
        let get = call_with(gw.proxy, "GET", "/things", &[], None, h2).await;
        let head = call_with(gw.proxy, "HEAD", "/things", &[], None, h2).await;
        assert_eq!((get.status.as_u16(), head.status.as_u16()), (401, 401));
        assert!(head.body.is_empty());
        assert_eq!(
            head.headers["content-length"].to_str().unwrap(),
            get.body.len().to_string(),
            "h2 {h2}"
        );
    }
    for path in ["/.well-known/jwks.json", "/_keygate/health"] {
        for h2 in [false, true] {
            let get = call_with(gw.proxy, "GET", path, &[], None, h2).await;
            let head = call_with(gw.proxy, "HEAD", path, &[], None, h2).await;
            assert_eq!(head.status, 200, "{path} h2 {h2}");
            assert!(!get.body.is_empty() && head.body.is_empty());
            assert_eq!(
                head.headers["content-length"].to_str().unwrap(),
                get.body.len().to_string(),
                "{path} h2 {h2}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_forged_and_expired_assertions_fail() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sqlite_gateway(&up, dir.path(), "ttl_secs = 5\noverlap_secs = 60", "");
    let key = client(&gw, "acme").await;
    let origin = up.url();
    let token = assertion_for(&gw, &up, "/things", &key).await;
    let url = jwks_url(&gw);
    let set = jwks(gw.proxy).await;
    assert!(py_verify(&url, &origin, &token).is_ok());

    type Edit = Box<dyn FnOnce(&mut Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("sub", Box::new(|c| c["sub"] = json!("admin"))),
        ("aud", Box::new(|c| c["aud"] = json!("http://elsewhere:1"))),
        ("iss", Box::new(|c| c["iss"] = json!("keygate-evil"))),
        (
            "key_id",
            Box::new(|c| c["key_id"] = json!("00000000-0000-7000-8000-000000000000")),
        ),
        (
            "permissions",
            Box::new(|c| c["permissions"] = json!(["READ", "WRITE", "ADMIN"])),
        ),
        ("license", Box::new(|c| c["license"] = json!("enterprise"))),
        (
            "exp",
            Box::new(|c| c["exp"] = json!(c["exp"].as_i64().unwrap() + 3600)),
        ),
        (
            "iat",
            Box::new(|c| c["iat"] = json!(c["iat"].as_i64().unwrap() - 1)),
        ),
        ("jti", Box::new(|c| c["jti"] = json!("replayed"))),
    ];
    for (claim, edit) in edits {
        let forged = tampered(&token, edit);
        let py = py_verify(&url, &origin, &forged);
        assert!(py.is_err(), "{claim} tampered: PyJWT accepted it");
        let rs = rust_verify(&set, Algorithm::EdDSA, &origin, &forged);
        assert!(rs.is_err(), "{claim} tampered: jsonwebtoken accepted it");
    }
    // A flipped signature byte, a signature of another key, `alg: none`.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
    sig[0] ^= 1;
    parts[2] = URL_SAFE_NO_PAD.encode(sig);
    assert!(py_verify(&url, &origin, &parts.join(".")).is_err());
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut h = jsonwebtoken::Header::new(Algorithm::EdDSA);
    h.kid = header_of(&token)["kid"].as_str().map(str::to_owned);
    let forged = jsonwebtoken::encode(
        &h,
        &claims_of(&token),
        &jsonwebtoken::EncodingKey::from_ed_der(&other.serialize_der()),
    )
    .unwrap();
    assert!(py_verify(&url, &origin, &forged).is_err());
    assert!(rust_verify(&set, Algorithm::EdDSA, &origin, &forged).is_err());
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        token.split('.').nth(1).unwrap()
    );
    assert!(py_verify(&url, &origin, &none).is_err());
    assert!(rust_verify(&set, Algorithm::EdDSA, &origin, &none).is_err());

    // Expired: ttl_secs = 5 (the shortest).
    let exp = claims_of(&token)["exp"].as_i64().unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    // verify.py allows 5 s of clock skew (LEEWAY).
    while now() <= exp + 5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = py_verify(&url, &origin, &token).unwrap_err();
    assert!(err.contains("ExpiredSignature"), "{err}");
    let err = rust_verify(&set, Algorithm::EdDSA, &origin, &token).unwrap_err();
    assert!(err.contains("ExpiredSignature"), "{err}");
    // The gateway itself never forwards one past its refresh point: a new request gets a
    // fresh, valid assertion.
    let fresh = assertion_for(&gw, &up, "/things", &key).await;
    assert_ne!(fresh, token);
    rust_verify(&set, Algorithm::EdDSA, &origin, &fresh).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_publishes_the_new_key_ahead_and_keeps_the_old_one_for_its_overlap() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sqlite_gateway(
        &up,
        dir.path(),
        "ttl_secs = 8\npublish_ahead_secs = 1\noverlap_secs = 8",
        "",
    );
    let key = client(&gw, "acme").await;
    let origin = up.url();
    let url = jwks_url(&gw);
    let old = assertion_for(&gw, &up, "/things", &key).await;
    let old_kid = header_of(&old)["kid"].as_str().unwrap().to_owned();

    let r = admin(&gw, "POST", "/v1/identity/rotate", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rotated_at = Instant::now();
    let answer = r.json();
    let new_kid = answer["next"]["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    let states: Vec<(&str, &str)> = answer["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["kid"].as_str().unwrap(), k["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [(old_kid.as_str(), "current"), (new_kid.as_str(), "next")]
    );
    // Published at once, on both listeners; not signing yet.
    assert_eq!(
        kids(&jwks(gw.proxy).await),
        [old_kid.clone(), new_kid.clone()]
    );
    assert_eq!(
        kids(&jwks(gw.admin).await),
        [old_kid.clone(), new_kid.clone()]
    );
    // A second rotation while one is pending is refused and changes nothing.
    let r = admin(&gw, "POST", "/v1/identity/rotate", None).await;
    assert_eq!(r.status, 409);
    assert_eq!(
        kids(&jwks(gw.proxy).await),
        [old_kid.clone(), new_kid.clone()]
    );

    // After publish_ahead the new key signs; old assertions still verify.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(rotated_at.elapsed())).await;
    let new = assertion_for(&gw, &up, "/things", &key).await;
    assert_eq!(header_of(&new)["kid"], new_kid.as_str());
    py_verify(&url, &origin, &new).unwrap();
    py_verify(&url, &origin, &old).unwrap();
    let set = jwks(gw.proxy).await;
    assert_eq!(kids(&set), [old_kid.clone(), new_kid.clone()]);
    assert!(rust_verify(&set, Algorithm::EdDSA, &origin, &old).is_ok());

    // After the overlap the old key leaves the set: its assertions no longer verify, for
    // want of the key (not only of time).
    tokio::time::sleep(Duration::from_millis(9300).saturating_sub(rotated_at.elapsed())).await;
    let set = jwks(gw.proxy).await;
    assert!(!kids(&set).contains(&old_kid), "{set}");
    assert_eq!(kids(&set), [new_kid.as_str()]);
    let err = py_verify(&url, &origin, &old).unwrap_err();
    assert!(err.contains("Unable to find a signing key"), "{err}");
    let err = rust_verify(&set, Algorithm::EdDSA, &origin, &old).unwrap_err();
    assert!(err.contains("no such key"), "{err}");
    let now = assertion_for(&gw, &up, "/things", &key).await;
    assert_eq!(header_of(&now)["kid"], new_kid.as_str());
    assert!(py_verify(&url, &origin, &now).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_on_one_redis_publish_one_key_set_and_verify_each_other() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let text = store_config_text(
        &up.url(),
        &format!("url = \"{}\"", redis.tcp_url(0)),
        &format!("[identity]\nsign = true\npublish_ahead_secs = 2\noverlap_secs = 60\n{ROUTES}"),
    );
    // Started together: the first key of the fleet is made once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start(da.path(), &text));
        let b = s.spawn(|| start(db.path(), &text));
        (a.join().unwrap(), b.join().unwrap())
    });
    let stored = |redis: &RedisServer| -> u64 {
        redis.query(0, redis::cmd("HLEN").arg("keygate:signing_keys"))
    };
    assert_eq!(stored(&redis), 1);
    let set = jwks(a.proxy).await;
    assert_eq!(kids(&set).len(), 1);
    assert_eq!(jwks(b.proxy).await, set);
    assert_eq!(jwks(b.admin).await, set);

    let key = client(&a, "acme").await;
    let origin = up.url();
    let from_a = assertion_for(&a, &up, "/things", &key).await;
    let from_b = assertion_for(&b, &up, "/things", &key).await;
    for (token, jwks_of) in [(&from_a, &b), (&from_b, &a), (&from_a, &a), (&from_b, &b)] {
        assert_eq!(
            py_verify(&jwks_url(jwks_of), &origin, token).unwrap()["sub"],
            "acme"
        );
    }

    // A rotation made on A is published by B within its poll interval (publish_ahead / 4
    // here), before the new key signs.
    let r = admin(&a, "POST", "/v1/identity/rotate", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rotated = Instant::now();
    let new_kid = r.json()["next"]["kid"].as_str().unwrap().to_owned();
    assert_eq!(stored(&redis), 2);
    let seen_by_b = loop {
        if kids(&jwks(b.proxy).await).contains(&new_kid) {
            break rotated.elapsed();
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(2),
            "B never published the new key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(seen_by_b < Duration::from_secs(2), "{seen_by_b:?}");
    assert_eq!(jwks(a.proxy).await, jwks(b.proxy).await);
    // After publish_ahead both sign with it, and each verifies against the other.
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(rotated.elapsed())).await;
    let from_a = assertion_for(&a, &up, "/things", &key).await;
    let from_b = assertion_for(&b, &up, "/things", &key).await;
    for token in [&from_a, &from_b] {
        assert_eq!(header_of(token)["kid"], new_kid.as_str());
        assert!(py_verify(&jwks_url(&a), &origin, token).is_ok());
        assert!(py_verify(&jwks_url(&b), &origin, token).is_ok());
    }
    // The private keys Redis holds appear in neither instance's logs.
    let records: Vec<String> = redis.query(0, redis::cmd("HVALS").arg("keygate:signing_keys"));
    assert_eq!(records.len(), 2);
    let logs = format!("{}\n{}", a.lines().join("\n"), b.lines().join("\n"));
    for r in records {
        let v: Value = serde_json::from_str(&r).unwrap();
        let der = STANDARD
            .decode(v["private_pkcs8"].as_str().unwrap())
            .unwrap();
        for s in spellings(&der) {
            assert!(!logs.contains(&s), "a private key in the logs");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forward_auth_allow_carries_the_assertion_signed_with_es256() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sqlite_gateway(
        &up,
        dir.path(),
        "algorithm = \"ES256\"",
        "[forward_auth]\nenabled = true",
    );
    let key = client(&gw, "acme").await;
    let origin = up.url();
    let verify = |auth: Option<String>, uri: &'static str| {
        let proxy = gw.proxy;
        async move {
            let mut h = vec![
                ("x-forwarded-method", "GET".to_owned()),
                ("x-forwarded-uri", uri.to_owned()),
                // A client's own copy, which an edge proxy would pass along.
                (ASSERTION, "forged".to_owned()),
            ];
            if let Some(a) = auth {
                h.push(("authorization", a));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            call(proxy, "GET", "/_keygate/verify", &h, None).await
        }
    };
    let r = verify(Some(format!("Bearer {key}")), "/things").await;
    assert_eq!(r.status, 200);
    let token = r.headers[ASSERTION].to_str().unwrap().to_owned();
    assert_eq!(header_of(&token)["alg"], "ES256");
    let set = jwks(gw.proxy).await;
    assert_eq!(set["keys"][0]["kty"], "EC");
    assert_eq!(set["keys"][0]["crv"], "P-256");
    assert_eq!(set["keys"][0]["alg"], "ES256");
    let claims = py_verify(&jwks_url(&gw), &origin, &token).unwrap();
    assert_eq!(
        (claims["sub"].as_str(), claims["license"].as_str()),
        (Some("acme"), Some("pro"))
    );
    assert_eq!(
        rust_verify(&set, Algorithm::ES256, &origin, &token).unwrap(),
        claims
    );
    // Pinned to ES256: the same token is refused as EdDSA.
    assert!(rust_verify(&set, Algorithm::EdDSA, &origin, &token).is_err());
    // The audience of the route the original request names.
    let billing = verify(Some(format!("Bearer {key}")), "/billing/1").await;
    let billing = billing.headers[ASSERTION].to_str().unwrap();
    assert_eq!(claims_of(billing)["aud"], "https://billing.internal");
    // A public route: present and empty (an edge proxy copying it overwrites the client's).
    let r = verify(None, "/public/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers[ASSERTION], "");
    // A refusal carries none.
    let r = verify(None, "/things").await;
    assert_eq!(r.status, 401);
    assert!(!r.headers.contains_key(ASSERTION));
    let r = verify(Some("Bearer kg_wrong".into()), "/things").await;
    assert_eq!(r.status, 401);
    assert!(!r.headers.contains_key(ASSERTION));
}

/// Every spelling of a secret a log or an answer could carry.
fn spellings(secret: &[u8]) -> Vec<String> {
    vec![
        STANDARD.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        hex::encode(secret),
    ]
}

fn stored_private_keys(db: &Path) -> Vec<Vec<u8>> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c.prepare("SELECT private_pkcs8 FROM signing_keys").unwrap();
    stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_private_key_material_in_any_log_listing_or_answer() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = sqlite_gateway(&up, dir.path(), "publish_ahead_secs = 1", "");
    let key = client(&gw, "acme").await;
    let mut answers: Vec<Bytes> = Vec::new();
    let token = assertion_for(&gw, &up, "/things", &key).await;
    answers.push(Bytes::from(token));
    for r in [
        admin(&gw, "POST", "/v1/identity/rotate", None).await,
        admin(&gw, "POST", "/v1/identity/rotate", None).await, // 409: pending
        call(gw.admin, "POST", "/v1/identity/rotate", &[], None).await, // 401
        call(gw.proxy, "GET", "/.well-known/jwks.json", &[], None).await,
        call(gw.admin, "GET", "/.well-known/jwks.json", &[], None).await,
        call(gw.admin, "GET", "/metrics", &[], None).await,
        call(gw.admin, "GET", "/openapi.json", &[], None).await,
    ] {
        answers.push(r.body);
        answers.push(Bytes::from(format!("{:?}", r.headers)));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    answers.push(Bytes::from(assertion_for(&gw, &up, "/things", &key).await));
    assert!(gw.terminate().success());
    let keys = stored_private_keys(&dir.path().join("k.db"));
    assert_eq!(keys.len(), 2);
    let logs = gw.lines().join("\n");
    assert!(logs.contains("signing key rotation started"), "{logs}");
    for der in &keys {
        // PKCS#8 of Ed25519 (RFC 8410): the 32-byte seed follows `04 22 04 20`.
        let at = der
            .windows(4)
            .position(|w| w == [0x04, 0x22, 0x04, 0x20])
            .expect("an Ed25519 PKCS#8 key")
            + 4;
        for secret in [&der[..], &der[at..at + 32]] {
            for s in spellings(secret) {
                assert!(!logs.contains(&s), "a private key in the logs");
                for a in &answers {
                    assert!(
                        !String::from_utf8_lossy(a).contains(&s),
                        "a private key in an answer"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signing_key_file_signs_is_published_and_never_shown() {
    for (alg, rc) in [
        (Algorithm::EdDSA, &rcgen::PKCS_ED25519),
        (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let up = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate_for(rc).unwrap();
        let pem = pair.serialize_pem();
        let file = dir.path().join("signing.pem");
        std::fs::write(&file, &pem).unwrap();
        let name = if alg == Algorithm::EdDSA {
            "EdDSA"
        } else {
            "ES256"
        };
        let mut gw = sqlite_gateway(
            &up,
            dir.path(),
            &format!(
                "algorithm = \"{name}\"\nsigning_key_file = \"{}\"",
                file.display()
            ),
            "",
        );
        let key = client(&gw, "acme").await;
        let token = assertion_for(&gw, &up, "/things", &key).await;
        let set = jwks(gw.proxy).await;
        assert_eq!(kids(&set).len(), 1);
        assert!(rust_verify(&set, alg, &up.url(), &token).is_ok());
        assert!(py_verify(&jwks_url(&gw), &up.url(), &token).is_ok());
        // The public key of the file is the one published.
        let public = pair.public_key_raw();
        let x = URL_SAFE_NO_PAD
            .decode(set["keys"][0]["x"].as_str().unwrap())
            .unwrap();
        assert!(public.windows(x.len()).any(|w| w == x.as_slice()));
        // The operator rotates the file, not keygate.
        let r = admin(&gw, "POST", "/v1/identity/rotate", None).await;
        assert_eq!(r.status, 409);
        assert!(
            r.json()["detail"]
                .as_str()
                .unwrap()
                .contains("signing_key_file")
        );
        assert_eq!(jwks(gw.proxy).await, set);
        assert!(gw.terminate().success());
        let logs = gw.lines().join("\n");
        let der = pair.serialize_der();
        for s in spellings(&der).into_iter().chain(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        ) {
            assert!(!logs.contains(&s), "the key file's key in the logs");
            assert!(!r.body.windows(s.len()).any(|w| w == s.as_bytes()));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_needs_the_admin_key_and_a_refusal_changes_nothing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sqlite_gateway(&up, dir.path(), "", "");
    // A client allowed to manage its own keys is still no admin.
    let r = admin(
        &gw,
        "POST",
        "/v1/clients",
        Some(json!({"client_id": "acme", "license": "pro"})),
    )
    .await;
    assert_eq!(r.status, 201);
    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"name": "self", "client_id": "acme", "permissions": ["keys:manage"]})),
    )
    .await;
    let own = r.json()["key"].as_str().unwrap().to_owned();
    let before = jwks(gw.admin).await;
    let db = dir.path().join("k.db");
    let stored = stored_private_keys(&db);
    for (headers, status) in [
        (vec![], 401),
        (vec![("x-admin-key", "wrong-admin-key-0123456789")], 401),
        (
            vec![("authorization", "Bearer wrong-admin-key-0123456789")],
            401,
        ),
        (vec![("x-admin-key", "")], 401),
        (
            vec![("authorization", format!("Bearer {own}").leak() as &str)],
            403,
        ),
        (vec![("x-api-key", own.as_str())], 403),
    ] {
        let r = call(gw.admin, "POST", "/v1/identity/rotate", &headers, None).await;
        assert_eq!(
            r.status,
            status,
            "{headers:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{headers:?}"
        );
        assert_eq!(jwks(gw.admin).await, before);
        assert_eq!(stored_private_keys(&db), stored);
    }
    // Bodies other than none or `{}`: refused with a clear error, nothing changed.
    let oversized = format!("{{\"x\": \"{}\"}}", "a".repeat(2 << 20));
    for (body, status) in [
        ("{", 400),
        ("[]", 400),
        ("\"rotate\"", 400),
        ("{\"algorithm\": \"RS256\"}", 422),
        ("{\"kid\": null}", 422),
        (oversized.as_str(), 413),
    ] {
        let b = Request::builder()
            .method("POST")
            .uri(format!("http://{}/v1/identity/rotate", gw.admin))
            .header("x-admin-key", ADMIN_KEY);
        let client = Client::builder(TokioExecutor::new()).build_http();
        let r = send(client, b, Bytes::from(body.to_owned())).await;
        assert_eq!(r.status, status, "{}", &body[..body.len().min(40)]);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(jwks(gw.admin).await, before);
        assert_eq!(stored_private_keys(&db), stored);
    }
    // The key set is read-only: other methods do not reach it.
    for method in ["POST", "PUT", "DELETE"] {
        let r = call(gw.admin, method, "/.well-known/jwks.json", &[], None).await;
        assert_eq!(r.status, 405, "{method}");
        let r = call(gw.proxy, method, "/.well-known/jwks.json", &[], None).await;
        assert_eq!(r.status, 401, "{method}: judged as a proxied request");
    }
    assert_eq!(stored_private_keys(&db), stored);
    // The admin key with no body, or `{}`, does rotate (so the refusals above were refusals).
    let r = admin(&gw, "POST", "/v1/identity/rotate", Some(json!({}))).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(kids(&jwks(gw.admin).await).len(), 2);
    assert_eq!(stored_private_keys(&db).len(), 2);
}

#[test]
fn check_config_explains_a_bad_identity_section() {
    let dir = tempfile::tempdir().unwrap();
    let check = |identity: &str| {
        let path = dir.path().join("k.toml");
        let text = config_text(
            "http://127.0.0.1:9",
            &dir.path().join("k.db"),
            &format!("[identity]\nsign = true\n{identity}"),
        );
        std::fs::write(&path, text).unwrap();
        let out = Binary::command(["check-config", "--config"])
            .arg(&path)
            .output();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = dir.path().join("missing.pem");
    let (ok, err) = check(&format!("signing_key_file = \"{}\"", missing.display()));
    assert!(!ok);
    assert!(
        err.contains("identity.signing_key_file") && err.contains("cannot be read"),
        "{err}"
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let (ok, err) = check(&format!("signing_key_file = \"{}\"", garbage.display()));
    assert!(!ok);
    assert!(err.contains("not a PEM private key"), "{err}");
    assert!(
        !err.contains("bm90IGEga2V5"),
        "the file's content is not quoted"
    );
    let p256 = dir.path().join("p256.pem");
    std::fs::write(
        &p256,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    let (ok, err) = check(&format!("signing_key_file = \"{}\"", p256.display()));
    assert!(!ok);
    assert!(err.contains("holds a key for ES256"), "{err}");
    let (ok, err) = check(&format!(
        "algorithm = \"ES256\"\nsigning_key_file = \"{}\"",
        p256.display()
    ));
    assert!(ok, "{err}");
    let (ok, err) = check("algorithm = \"RS256\"");
    assert!(!ok && err.contains("RS256"), "{err}");
    for short in ["ttl_secs = 0", "ttl_secs = 1", "ttl_secs = 4"] {
        let (ok, err) = check(short);
        assert!(!ok && err.contains("identity.ttl_secs"), "{short}: {err}");
    }
    let (ok, err) = check("ttl_secs = 120\noverlap_secs = 60");
    assert!(!ok && err.contains("identity.overlap_secs"), "{err}");
    let (ok, err) = check("issuer = \"\"");
    assert!(!ok && err.contains("identity.issuer"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_gets_the_assertion_with_its_origin_as_audience() {
    use crate::tls_ws::{pki, upstream_tls};
    let dir = tempfile::tempdir().unwrap();
    let up_pki = pki(dir.path(), "upstream");
    let upstream = Upstream::start_with_tls(Some(upstream_tls(&up_pki))).await;
    let origin = format!("https://localhost:{}", upstream.addr.port());
    let text = config_text(&origin, &dir.path().join("k.db"), "[identity]\nsign = true").replace(
        "[admin]",
        &format!("upstream_ca = \"{}\"\n[admin]", up_pki.ca_pem.display()),
    );
    let gw = crate::support::Gateway::start_from(upstream, dir, &text).await;
    let (key, _) = gw.client("acme", "pro").await;
    let r = gw
        .get(
            "/over-tls",
            &[
                ("authorization", &format!("Bearer {key}")),
                (ASSERTION, "forged"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = gw.upstream.last();
    assert_eq!(seen.version, http::Version::HTTP_2);
    let all: Vec<_> = seen.headers.get_all(ASSERTION).iter().collect();
    assert_eq!(all.len(), 1);
    let token = all[0].to_str().unwrap();
    let set = jwks(gw.proxy).await;
    let claims = rust_verify(&set, Algorithm::EdDSA, &origin, token).unwrap();
    assert_eq!(claims["sub"], "acme");
    let jwks_url = format!("http://{}/.well-known/jwks.json", gw.proxy);
    assert_eq!(py_verify(&jwks_url, &origin, token).unwrap()["aud"], origin);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_signing_key_requests_are_refused_not_forwarded_unsigned() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // publish_ahead 40 s: the key set is read again every 10 s.
    let text = store_config_text(
        &up.url(),
        &format!("url = \"{}\"", redis.tcp_url(0)),
        "[identity]\nsign = true\npublish_ahead_secs = 40",
    );
    // The store hangs while the gateway starts: no signing key is loaded.
    redis.pause();
    let gw = start(dir.path(), &text);
    redis.resume();
    assert!(gw.log_contains("cannot read the signing keys"));
    let key = client(&gw, "acme").await;
    let before = up.count();
    let r = call(
        gw.proxy,
        "GET",
        "/things",
        &[("authorization", &format!("Bearer {key}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "store_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(up.count(), before, "nothing forwarded unsigned");
    // A key with credits is refused the same way, and the refusal costs it nothing.
    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(
            json!({"name": "paid", "client_id": "acme", "permissions": ["READ"],
                    "credits": {"remaining": 3}}),
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let (paid, paid_id) = (
        r.json()["key"].as_str().unwrap().to_owned(),
        r.json()["id"].as_str().unwrap().to_owned(),
    );
    let r = call(
        gw.proxy,
        "GET",
        "/things",
        &[("authorization", &format!("Bearer {paid}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let r = admin(&gw, "GET", &format!("/v1/api-keys/{paid_id}"), None).await;
    assert_eq!(
        r.json()["credits"]["remaining"],
        3,
        "a refused request took a credit"
    );
    // The next read of the key set (within 10 s) makes the first key; requests pass, signed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = call(
            gw.proxy,
            "GET",
            "/things",
            &[("authorization", &format!("Bearer {key}"))],
            None,
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(Instant::now() < deadline, "no signing key after 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let token = up.last().headers[ASSERTION].to_str().unwrap().to_owned();
    assert!(py_verify(&jwks_url(&gw), &up.url(), &token).is_ok());
}

/// A plan name that is not header text (`básico`) goes out as `invalid` in the identity
/// header, but as itself in the signed assertion's JSON; a move to another such plan (which
/// the header cannot tell apart) signs a new assertion.
#[tokio::test(flavor = "multi_thread")]
async fn the_assertion_carries_a_plan_name_a_header_cannot() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sqlite_gateway(
        &up,
        dir.path(),
        "",
        "[plans.\"básico\"]\n[plans.\"médio\"]\n",
    );
    let r = admin(
        &gw,
        "POST",
        "/v1/clients",
        Some(json!({"client_id": "acme", "license": "básico"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let key = r.json()["api_key"]["key"].as_str().unwrap().to_owned();
    let token = assertion_for(&gw, &up, "/things", &key).await;
    assert_eq!(claims_of(&token)["license"], "básico");
    assert_eq!(up.last().headers["x-keygate-license"], "invalid");
    let r = admin(
        &gw,
        "PATCH",
        "/v1/clients/acme",
        Some(json!({"license": "médio"})),
    )
    .await;
    assert_eq!(r.status, 200);
    let token = assertion_for(&gw, &up, "/things", &key).await;
    assert_eq!(claims_of(&token)["license"], "médio");
}
