//! Crash safety of admin writes: the real binary is killed with SIGKILL while clients create and
//! rotate keys; after every restart each acknowledged write must be there, whole.
//!
//! The store is a parameter ([`crash_cycles`] takes its URL), so the same check runs against
//! any store the binary supports; the SQLite run below also checks the file's integrity
//! between kills.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{self, Recorder};
use crate::support::binary::Binary;

const CLIENT: &str = "durable";

/// A key as last acknowledged by the admin API.
#[derive(Clone, Debug)]
struct Acked {
    key: String,
    /// Keys it had before acknowledged rotations (must no longer work).
    old: Vec<String>,
    name: String,
    rotations: usize,
}

/// A write sent but not answered when the process died: either outcome is allowed.
#[derive(Clone, Debug)]
enum InFlight {
    Create,
    Rotate(String),
}

#[derive(Default)]
struct Ledger {
    keys: HashMap<String, Acked>,
    /// Ids whose last rotation was in flight at a kill: the acknowledged key or an unknown
    /// newer one may be current.
    uncertain: HashMap<String, Acked>,
    acked_writes: usize,
    in_flight_at_kills: usize,
}

fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// One admin call; `None` when the process is gone (connection error or no answer in 3 s).
async fn call(admin: SocketAddr, method: &str, path: &str, body: Value) -> Option<(u16, Value)> {
    use http_body_util::BodyExt;
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("x-admin-key", harness::ADMIN_KEY)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), async {
        let res = client().request(req).await.ok()?;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.ok()?.to_bytes();
        Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    })
    .await;
    res.ok().flatten()
}

/// Creates and rotates keys until the gateway dies. Rotates only keys it created itself, so
/// the order of acknowledgements is the order of writes for each key.
async fn worker(admin: SocketAddr, w: usize, ledger: Arc<Mutex<Ledger>>, mut seed: u64) {
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut mine: Vec<String> = ledger
        .lock()
        .unwrap()
        .keys
        .iter()
        .filter(|(_, a)| a.name.starts_with(&format!("w{w}-")))
        .map(|(id, _)| id.clone())
        .collect();
    let mut n = 0usize;
    loop {
        n += 1;
        let rotate = !mine.is_empty() && rnd(2) == 0;
        let in_flight = if rotate {
            InFlight::Rotate(mine[rnd(mine.len() as u64) as usize].clone())
        } else {
            InFlight::Create
        };
        let answer = match &in_flight {
            InFlight::Create => {
                let name = format!("w{w}-{}-{n}", rnd(1 << 40));
                call(
                    admin,
                    "POST",
                    "/v1/api-keys",
                    json!({"name": name, "client_id": CLIENT, "permissions": [format!("p{n}")]}),
                )
                .await
                .map(|(s, v)| (s, v, Some(name)))
            }
            InFlight::Rotate(id) => call(
                admin,
                "POST",
                &format!("/v1/api-keys/{id}/rotate"),
                json!({}),
            )
            .await
            .map(|(s, v)| (s, v, None)),
        };
        let mut l = ledger.lock().unwrap();
        match answer {
            None => {
                l.in_flight_at_kills += 1;
                if let InFlight::Rotate(id) = in_flight
                    && let Some(a) = l.keys.remove(&id)
                {
                    l.uncertain.insert(id, a);
                }
                return;
            }
            Some((201, v, Some(name))) => {
                let id = v["id"].as_str().unwrap().to_owned();
                l.keys.insert(
                    id.clone(),
                    Acked {
                        key: v["key"].as_str().unwrap().to_owned(),
                        old: Vec::new(),
                        name,
                        rotations: 0,
                    },
                );
                l.acked_writes += 1;
                mine.push(id);
            }
            Some((200, v, None)) => {
                let InFlight::Rotate(id) = in_flight else {
                    unreachable!()
                };
                let a = l.keys.get_mut(&id).unwrap();
                let old = std::mem::replace(&mut a.key, v["key"].as_str().unwrap().to_owned());
                a.old.push(old);
                a.rotations += 1;
                l.acked_writes += 1;
            }
            Some((s, v, _)) => panic!("admin write answered {s}: {v}"),
        }
    }
}

async fn proxied(proxy: SocketAddr, key: &str) -> u16 {
    let req = format!(
        "GET /check HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    harness::exchange(
        proxy,
        &[req.as_bytes()],
        Duration::ZERO,
        Duration::from_secs(2),
        Duration::from_secs(3),
    )
    .await
    .finals()
    .first()
    .copied()
    .unwrap_or(0)
}

/// Every acknowledged write is present and whole. Authenticates every key when `all`, else
/// the keys in `recent` plus every 10th other one. Returns (lost, torn) descriptions.
async fn verify(
    gw: &Binary,
    ledger: &Ledger,
    recent: &[String],
    all: bool,
) -> (Vec<String>, Vec<String>) {
    let mut lost = Vec::new();
    let mut torn = Vec::new();
    // Every record, through the listing.
    let mut listed: HashMap<String, Value> = HashMap::new();
    for page in 1.. {
        let (s, v) = call(
            gw.admin,
            "GET",
            &format!("/v1/api-keys?client_id={CLIENT}&per_page=1000&page={page}"),
            Value::Null,
        )
        .await
        .expect("listing after restart");
        assert_eq!(s, 200, "{v}");
        let data = v["data"].as_array().unwrap();
        for k in data {
            listed.insert(k["id"].as_str().unwrap().to_owned(), k.clone());
        }
        if data.len() < 1000 {
            break;
        }
    }
    let check_record = |id: &str, a: &Acked, exact: bool, torn: &mut Vec<String>| {
        let Some(rec) = listed.get(id) else {
            return false;
        };
        let whole = rec["name"] == a.name.as_str()
            && rec["client_id"] == CLIENT
            && rec["enabled"] == true
            && rec["permissions"].as_array().is_some_and(|p| p.len() == 1)
            && rec["created_at"].as_str().is_some_and(|t| t.ends_with('Z'))
            && rec["prefix"].as_str().is_some_and(|p| p.len() == 12);
        if !whole {
            torn.push(format!("{id}: {rec}"));
        }
        if exact && rec["prefix"].as_str() != Some(&a.key[..12]) {
            torn.push(format!(
                "{id}: prefix {} is not the acknowledged key's",
                rec["prefix"]
            ));
        }
        true
    };
    let mut n = 0;
    for (id, a) in &ledger.keys {
        n += 1;
        if !check_record(id, a, true, &mut torn) {
            lost.push(format!("{id} missing"));
            continue;
        }
        if all || recent.contains(id) || n % 10 == 0 {
            if proxied(gw.proxy, &a.key).await != 200 {
                lost.push(format!(
                    "{id}: acknowledged key ({} rotations) refused",
                    a.rotations
                ));
            }
            if let Some(old) = a.old.last()
                && proxied(gw.proxy, old).await != 401
            {
                lost.push(format!(
                    "{id}: key from before an acknowledged rotation still works"
                ));
            }
        }
    }
    for (id, a) in &ledger.uncertain {
        if !check_record(id, a, false, &mut torn) {
            lost.push(format!("{id} missing (rotation in flight at a kill)"));
            continue;
        }
        let prefix = listed[id]["prefix"].as_str().unwrap_or("");
        // Either the rotation did not happen and the acknowledged key works, or it did and the
        // record holds a newer key.
        if prefix == &a.key[..12] && proxied(gw.proxy, &a.key).await != 200 {
            lost.push(format!("{id}: acknowledged key refused"));
        }
    }
    (lost, torn)
}

fn sqlite_integrity(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let fk: i64 = conn
        .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    if fk == 0 {
        check
    } else {
        format!("{check}; {fk} foreign key violations")
    }
}

/// The figures of one run.
pub struct CrashFigures {
    pub text: String,
    pub lost: usize,
    pub torn: usize,
    pub acked: usize,
}

/// `kills` times: start the binary on `store`, check the ledger, run two writers for a random
/// 100–400 ms, SIGKILL. `between_kills` runs after each kill (e.g. a file integrity check) and
/// returns a problem, if any. A last start checks everything, authenticating every key.
pub async fn crash_cycles(
    store: &str,
    dir: &Path,
    kills: usize,
    between_kills: &dyn Fn() -> Option<String>,
) -> CrashFigures {
    let rec = Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let text = harness::config_with_store(&format!("http://{up}"), store, "");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let first_seed = seed;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut lost, mut torn) = (Vec::new(), Vec::new());
    let mut recent: Vec<String> = Vec::new();
    let started = Instant::now();
    for cycle in 0..=kills {
        let mut gw = harness::keygate(&text, dir).spawn();
        if cycle == 0 {
            let (s, v) = harness::admin_call(
                gw.admin,
                "POST",
                "/v1/clients",
                Some(json!({"client_id": CLIENT, "license": "pro"})),
            )
            .await;
            assert_eq!(s, 201, "{v}");
        }
        let snapshot = {
            let l = ledger.lock().unwrap();
            Ledger {
                keys: l.keys.clone(),
                uncertain: l.uncertain.clone(),
                ..Default::default()
            }
        };
        let (l, t) = verify(&gw, &snapshot, &recent, cycle == kills).await;
        lost.extend(l.into_iter().map(|s| format!("after kill {cycle}: {s}")));
        torn.extend(t.into_iter().map(|s| format!("after kill {cycle}: {s}")));
        if cycle == kills {
            break;
        }
        let before: Vec<String> = snapshot.keys.keys().cloned().collect();
        let workers: Vec<_> = (0..2)
            .map(|w| tokio::spawn(worker(gw.admin, w, Arc::clone(&ledger), rnd(u64::MAX) | 1)))
            .collect();
        tokio::time::sleep(Duration::from_millis(100 + rnd(300))).await;
        gw.kill9();
        for w in workers {
            w.await.unwrap();
        }
        if let Some(problem) = between_kills() {
            torn.push(format!("after kill {}: {problem}", cycle + 1));
        }
        let l = ledger.lock().unwrap();
        recent = l
            .keys
            .keys()
            .filter(|id| !before.contains(id))
            .cloned()
            .collect();
        // Rotated since the last check, too.
        recent.extend(
            l.keys
                .iter()
                .filter(|(id, a)| {
                    a.rotations > 0
                        && snapshot.keys.get(*id).map(|b| b.rotations) != Some(a.rotations)
                })
                .map(|(id, _)| id.clone()),
        );
    }
    let l = ledger.lock().unwrap();
    let text = format!(
        "store: {}\n{kills} kills × {} acknowledged writes (creates and rotations, 2 writers): lost {}, torn {}\n\
         writes in flight at a kill (either outcome allowed): {}\n\
         keys checked at the end: {} (+{} whose last rotation was in flight), all authenticated\n\
         seed {first_seed}, {:.1} s\n",
        store.split("://").next().unwrap_or(store),
        l.acked_writes,
        lost.len(),
        torn.len(),
        l.in_flight_at_kills,
        l.keys.len(),
        l.uncertain.len(),
        started.elapsed().as_secs_f64(),
    );
    for p in lost.iter().chain(&torn).take(20) {
        eprintln!("{p}");
    }
    CrashFigures {
        text,
        lost: lost.len(),
        torn: torn.len(),
        acked: l.acked_writes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_admin_writes_survive_kill_9_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keygate.db");
    let store = format!("sqlite://{}", db.display());
    let integrity = || {
        let r = sqlite_integrity(&db);
        (r != "ok").then(|| format!("sqlite integrity: {r}"))
    };
    let f = crash_cycles(&store, dir.path(), 20, &integrity).await;
    harness::report("crash-safety-sqlite", &f.text);
    assert!(
        f.acked >= 200,
        "too few writes to mean anything: {}",
        f.acked
    );
    assert_eq!(f.lost, 0, "acknowledged writes lost");
    assert_eq!(f.torn, 0, "torn records");
}

/// The same against Redis with the append-only file on: the gateway is killed, Redis keeps
/// running; every acknowledged write must be there and whole when the gateway comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_admin_writes_survive_kill_9_redis_aof() {
    let redis = crate::redis_support::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = redis.tcp_url(3);
    let f = crash_cycles(&store, dir.path(), 20, &|| None).await;
    harness::report("crash-safety-redis", &f.text);
    assert!(
        f.acked >= 200,
        "too few writes to mean anything: {}",
        f.acked
    );
    assert_eq!(f.lost, 0, "acknowledged writes lost");
    assert_eq!(f.torn, 0, "torn records");
}
