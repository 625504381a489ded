//! One conformance suite for the event outbox (`Store::outbox`), run unchanged against the
//! SQLite store and a real `redis-server`: events are written with the change that causes
//! them, each (webhook, key) queue hands out its oldest delivery only, leases keep a delivery
//! from a second caller until they end, retries wait for their time, outcomes are recorded, and
//! webhooks are created, changed and deleted with their pending deliveries.

use std::sync::Arc;
use std::time::Duration;

use keygate::keys::outbox::{Claimed, NewEvent, Outbox, Outcome, Subscription, Webhook};
use keygate::keys::store::redis::RedisStore;
use keygate::keys::store::sqlite::SqliteStore;
use keygate::keys::store::{KeyPatch, Store};
use keygate::keys::{ApiKey, SetBy, now_millis, testing};
use serde_json::Value;

use crate::redis_support::RedisServer;

struct Subject {
    store: Arc<dyn Store>,
    outbox: Arc<dyn Outbox>,
    _dir: Option<tempfile::TempDir>,
    redis: Option<RedisServer>,
    /// The servers of the Sentinel and cluster flavours (the store conformance harness).
    ha: Option<crate::store_conformance::Subject>,
}

/// A flavour of the store conformance harness (`redis_sentinel`, `redis_cluster`).
fn from_store(s: crate::store_conformance::Subject) -> Subject {
    Subject {
        store: Arc::clone(&s.store),
        outbox: s.store.outbox().unwrap(),
        _dir: None,
        redis: None,
        ha: Some(s),
    }
}

fn sqlite() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("k.db")).unwrap());
    Subject {
        outbox: store.outbox().unwrap(),
        store,
        _dir: Some(dir),
        redis: None,
        ha: None,
    }
}

fn redis() -> Subject {
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::open(&redis.tcp_url(3), "outbox:").unwrap());
    Subject {
        outbox: store.outbox().unwrap(),
        store,
        _dir: None,
        redis: Some(redis),
        ha: None,
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = super::sqlite();
                    super::$name(&s).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = super::redis();
                    super::$name(&s).await;
                    if let Some(r) = &s.redis {
                        r.assert_no_keyspace_scans();
                    }
                }
            )*
        }
        mod redis_sentinel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut s = super::from_store(
                        crate::store_conformance::redis_sentinel_store().await,
                    );
                    super::$name(&s).await;
                    s.ha.take().unwrap().finish();
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut s = super::from_store(
                        crate::store_conformance::redis_cluster_store().await,
                    );
                    super::$name(&s).await;
                    // Every key in the prefix's slot, on one node; no keyspace walks.
                    s.ha.take().unwrap().finish();
                }
            )*
        }
    };
}

conformance!(
    a_change_and_its_events_are_written_together,
    each_queue_hands_out_its_oldest_delivery_under_a_lease,
    retries_wait_and_outcomes_are_recorded,
    webhooks_are_created_changed_and_deleted_with_their_deliveries,
    a_webhook_secret_is_rotated_with_and_without_a_grace_period,
    emitted_and_expiring_events_are_delivered,
    client_wide_writes_write_an_event_per_key,
    imported_keys_write_key_created_marked_imported,
    an_import_of_ten_thousand_keys_is_written_whole_with_its_events,
    a_leak_report_is_written_with_the_revoke_it_caused,
    a_claim_hands_out_at_most_each_webhooks_room,
    queues_of_a_webhook_nobody_knows_do_not_starve_the_others,
    the_fan_out_follows_the_stores_webhooks_not_the_callers_list,
);

fn all() -> Vec<Subscription> {
    vec![Subscription {
        webhook_id: "wh_all".into(),
        events: vec!["*".into()],
        room: 1_000,
        stored: false,
    }]
}

fn kind(c: &Claimed) -> String {
    let v: Value = serde_json::from_str(&c.body).unwrap();
    assert_eq!(v["type"], c.event_type.as_str());
    c.event_type.clone()
}

async fn new_client(s: &Subject) -> ApiKey {
    let (key, _) = ApiKey::builder().build();
    s.store
        .insert_client(&testing::client(&key.client_id), &key)
        .await
        .unwrap();
    key
}

async fn a_change_and_its_events_are_written_together(s: &Subject) {
    let (key, secret) = ApiKey::builder().build();
    s.store
        .insert_client(&testing::client(&key.client_id), &key)
        .await
        .unwrap();
    let claimed = s
        .outbox
        .claim(&all(), now_millis(), 60_000, 10)
        .await
        .unwrap();
    let mut kinds: Vec<String> = claimed.iter().map(kind).collect();
    kinds.sort();
    assert_eq!(kinds, ["client.created", "key.created"]);
    for c in &claimed {
        assert!(c.event_id.starts_with("msg_"));
        assert!(!c.body.contains(secret.plaintext.expose()));
        assert!(!c.body.contains(&hex::encode(key.key_hash.0)));
        assert_eq!(c.attempts, 0);
    }
    // A refused write writes no event.
    assert!(
        s.store
            .insert_client(
                &testing::client(&key.client_id),
                &ApiKey::builder().build().0
            )
            .await
            .is_err()
    );
    for c in &claimed {
        s.outbox
            .complete(c, &Outcome::Delivered { status: 200 }, now_millis())
            .await
            .unwrap();
    }
    let more = s
        .outbox
        .claim(&all(), now_millis(), 60_000, 10)
        .await
        .unwrap();
    assert!(more.is_empty(), "{more:?}");
    assert_eq!(s.outbox.pending().await.unwrap(), 0);
}

async fn each_queue_hands_out_its_oldest_delivery_under_a_lease(s: &Subject) {
    let key = new_client(s).await;
    for n in 1..=3 {
        let patch = KeyPatch {
            name: Some(format!("n{n}")),
            by: SetBy::Admin,
            ..KeyPatch::default()
        };
        s.store
            .patch_key(key.id, &patch, now_millis())
            .await
            .unwrap();
    }
    let now = now_millis();
    let first = s.outbox.claim(&all(), now, 60_000, 10).await.unwrap();
    // One per queue: the client's client.created and the key's key.created.
    assert_eq!(first.len(), 2, "{first:?}");
    let created = first
        .iter()
        .find(|c| c.event_type == "key.created")
        .unwrap()
        .clone();
    // Leased: nobody else gets them, nor what queues behind them.
    assert!(
        s.outbox
            .claim(&all(), now, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    s.outbox
        .complete(&created, &Outcome::Delivered { status: 204 }, now)
        .await
        .unwrap();
    let mut names = Vec::new();
    loop {
        let next = s
            .outbox
            .claim(&all(), now_millis(), 60_000, 10)
            .await
            .unwrap();
        let Some(c) = next.iter().find(|c| c.event_type == "key.updated") else {
            break;
        };
        let v: Value = serde_json::from_str(&c.body).unwrap();
        names.push(v["data"]["name"].as_str().unwrap().to_owned());
        s.outbox
            .complete(c, &Outcome::Delivered { status: 200 }, now_millis())
            .await
            .unwrap();
    }
    assert_eq!(names, ["n1", "n2", "n3"]);
    // A lease that ends gives the delivery to the next caller, under the same event id.
    let client = first
        .iter()
        .find(|c| c.event_type == "client.created")
        .unwrap();
    let again = s
        .outbox
        .claim(&all(), now + 60_001, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event_id, client.event_id);
    assert_eq!(again[0].body, client.body);
}

async fn retries_wait_and_outcomes_are_recorded(s: &Subject) {
    new_client(s).await;
    let now = now_millis();
    let claimed = s.outbox.claim(&all(), now, 60_000, 10).await.unwrap();
    let c = claimed
        .iter()
        .find(|c| c.event_type == "key.created")
        .unwrap();
    s.outbox
        .complete(
            c,
            &Outcome::Retry {
                at: now + 5_000,
                status: Some(503),
                error: None,
            },
            now,
        )
        .await
        .unwrap();
    let early = s
        .outbox
        .claim(&all(), now + 4_000, 60_000, 10)
        .await
        .unwrap();
    assert!(!early.iter().any(|x| x.event_id == c.event_id));
    let due = s
        .outbox
        .claim(&all(), now + 5_000, 60_000, 10)
        .await
        .unwrap();
    let retry = due.iter().find(|x| x.event_id == c.event_id).unwrap();
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.body, c.body);
    s.outbox
        .complete(
            retry,
            &Outcome::Failed {
                status: None,
                error: Some("timed out".into()),
            },
            now + 5_000,
        )
        .await
        .unwrap();
    let attempts = s.outbox.attempts("wh_all", 10).await.unwrap();
    let mine: Vec<_> = attempts
        .iter()
        .filter(|a| a.event_id == c.event_id)
        .collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(
        (mine[0].attempt, mine[0].outcome.as_str(), mine[0].status),
        (2, "failed", None)
    );
    assert_eq!(mine[0].error.as_deref(), Some("timed out"));
    assert_eq!(
        (mine[1].attempt, mine[1].outcome.as_str(), mine[1].status),
        (1, "retrying", Some(503))
    );
    assert_eq!(s.outbox.attempts("wh_all", 1).await.unwrap().len(), 1);
    assert_eq!(
        s.outbox.pending().await.unwrap(),
        1,
        "client.created is left"
    );
}

/// A rotation replaces the secret and keeps the one it replaces until the given time, or not
/// at all; nothing else of the webhook changes; an unknown id is `None`.
async fn a_webhook_secret_is_rotated_with_and_without_a_grace_period(s: &Subject) {
    let (first, second, third) = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_c2Vjb25kIHNlY3JldCBvZiB0aGlydHkgdHdvIGJ5dGVz",
        "whsec_dGhpcmQgc2VjcmV0IG9mIHRoaXJ0eSB0d28gYnl0ZXMh",
    );
    let w = Webhook {
        id: "wh_r".into(),
        url: "http://127.0.0.1:9/r".into(),
        events: vec!["key.created".into(), "key.revoked".into()],
        secret: first.into(),
        created_at: 1_765_000_000_123,
        previous_secret: None,
        previous_until: None,
    };
    assert!(s.outbox.insert_webhook(&w, 10).await.unwrap());
    let until = 1_765_100_000_456;
    let rotated = s
        .outbox
        .rotate_webhook_secret("wh_r", second, Some(until))
        .await
        .unwrap()
        .unwrap();
    let expected = Webhook {
        secret: second.into(),
        previous_secret: Some(first.into()),
        previous_until: Some(until),
        ..w.clone()
    };
    assert_eq!(rotated, expected);
    assert_eq!(
        s.outbox.list_webhooks().await.unwrap(),
        std::slice::from_ref(&expected)
    );
    assert_eq!(rotated.previous_at(until - 1), Some(first));
    assert_eq!(rotated.previous_at(until), None);
    // Without a grace period the replaced secret (and the one before it) stop at once.
    let again = s
        .outbox
        .rotate_webhook_secret("wh_r", third, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            again.secret.as_str(),
            again.previous_secret,
            again.previous_until
        ),
        (third, None, None)
    );
    // A change of URL keeps the secrets as they are.
    let moved = s
        .outbox
        .update_webhook("wh_r", Some("http://127.0.0.1:9/s"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((moved.secret.as_str(), moved.events), (third, w.events));
    assert!(
        s.outbox
            .rotate_webhook_secret("wh_none", second, None)
            .await
            .unwrap()
            .is_none()
    );
}

/// A webhook as the admin API writes it: a secret, no previous one.
fn api_webhook(id: &str, url: &str, events: &[&str], created_at: i64) -> Webhook {
    Webhook {
        id: id.into(),
        url: url.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        created_at,
        previous_secret: None,
        previous_until: None,
    }
}

async fn webhooks_are_created_changed_and_deleted_with_their_deliveries(s: &Subject) {
    let w = api_webhook("wh_1", "http://127.0.0.1:9/a", &["key.created"], 1_000);
    assert!(s.outbox.insert_webhook(&w, 2).await.unwrap());
    assert!(
        s.outbox.insert_webhook(&w, 2).await.is_err(),
        "an id is unique"
    );
    // The store holds the cap: a webhook beyond it is not written.
    let second = Webhook {
        id: "wh_2".into(),
        ..w.clone()
    };
    let third = Webhook {
        id: "wh_3".into(),
        ..w.clone()
    };
    assert!(s.outbox.insert_webhook(&second, 2).await.unwrap());
    assert!(!s.outbox.insert_webhook(&third, 2).await.unwrap());
    assert_eq!(s.outbox.list_webhooks().await.unwrap().len(), 2);
    assert!(s.outbox.delete_webhook("wh_2").await.unwrap().is_some());
    assert_eq!(
        s.outbox.list_webhooks().await.unwrap(),
        std::slice::from_ref(&w)
    );
    let changed = s
        .outbox
        .update_webhook("wh_1", Some("http://127.0.0.1:9/b"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.url, "http://127.0.0.1:9/b");
    assert_eq!(changed.events, w.events);
    assert_eq!(changed.secret, w.secret);
    assert!(
        s.outbox
            .update_webhook("wh_none", Some("http://x/"), None)
            .await
            .unwrap()
            .is_none()
    );
    new_client(s).await;
    let subs = [Subscription {
        webhook_id: "wh_1".into(),
        events: changed.events.clone(),
        room: 10,
        stored: true,
    }];
    let claimed = s
        .outbox
        .claim(&subs, now_millis(), 60_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "key.created only");
    assert_eq!(claimed[0].event_type, "key.created");
    assert_eq!(s.outbox.pending().await.unwrap(), 1);
    let retry = Outcome::Retry {
        at: now_millis() + 60_000,
        status: Some(503),
        error: None,
    };
    s.outbox
        .complete(&claimed[0], &retry, now_millis())
        .await
        .unwrap();
    assert_eq!(s.outbox.attempts("wh_1", 10).await.unwrap().len(), 1);
    let gone = s.outbox.delete_webhook("wh_1").await.unwrap().unwrap();
    assert_eq!(gone.id, "wh_1");
    assert_eq!(s.outbox.pending().await.unwrap(), 0);
    assert!(s.outbox.list_webhooks().await.unwrap().is_empty());
    assert!(s.outbox.delete_webhook("wh_1").await.unwrap().is_none());
    // Its attempts went with it, and one that ends after the deletion records nothing.
    assert!(s.outbox.attempts("wh_1", 10).await.unwrap().is_empty());
    s.outbox
        .complete(&claimed[0], &retry, now_millis())
        .await
        .unwrap();
    assert!(s.outbox.attempts("wh_1", 10).await.unwrap().is_empty());
    // A claim made with a list read before the delete (`subs` still names wh_1) fans the
    // events written since out to no deleted webhook: nothing pending, nothing handed out, not
    // even once its events are a day old.
    let (key, _) = ApiKey::builder().client("after_delete").build();
    s.store
        .insert_client(&testing::client(&key.client_id), &key)
        .await
        .unwrap();
    assert!(
        s.outbox
            .claim(&subs, now_millis(), 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.outbox.pending().await.unwrap(), 0);
    let orphaned = now_millis() + keygate::keys::outbox::ORPHAN_AFTER_MS;
    assert!(
        s.outbox
            .claim(&[], orphaned, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The fan-out takes the store's webhooks as they are when it runs, not as the caller's list
/// (read before) has them: a webhook made since gets the events written after it was made
/// (they waited for an instance that knows it), and a change of its event types applies to
/// the events written after the change.
async fn the_fan_out_follows_the_stores_webhooks_not_the_callers_list(s: &Subject) {
    let late = api_webhook("wh_late", "http://127.0.0.1:9/late", &["*"], now_millis());
    assert!(s.outbox.insert_webhook(&late, 10).await.unwrap());
    // client.created and key.created.
    new_client(s).await;
    // The claimer's list was read before wh_late was made.
    assert!(
        s.outbox
            .claim(&[], now_millis(), 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.outbox.pending().await.unwrap(),
        2,
        "not fanned out to wh_late"
    );
    let knows = [Subscription {
        webhook_id: "wh_late".into(),
        events: vec!["*".into()],
        room: 10,
        stored: true,
    }];
    // (Redis moved the queues of the webhook the first claimer did not know behind its lease.)
    let later = now_millis() + 60_001;
    let mut kinds: Vec<String> = s
        .outbox
        .claim(&knows, later, 60_000, 10)
        .await
        .unwrap()
        .iter()
        .map(kind)
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["client.created", "key.created"]);
    // Narrowed to key.revoked; the claimer's list still says every event.
    let narrowed = ["key.revoked".to_owned()];
    assert!(
        s.outbox
            .update_webhook("wh_late", None, Some(&narrowed))
            .await
            .unwrap()
            .is_some()
    );
    let (key, _) = ApiKey::builder().client("after_narrowing").build();
    s.store
        .insert_client(&testing::client(&key.client_id), &key)
        .await
        .unwrap();
    assert!(
        s.outbox
            .claim(&knows, later, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.outbox.pending().await.unwrap(),
        2,
        "fanned out as before the change"
    );
}

async fn emitted_and_expiring_events_are_delivered(s: &Subject) {
    let key = new_client(s).await;
    let quota = NewEvent::quota_threshold(&key, now_millis(), "quota", 80, 1000, 800, Some(0));
    s.outbox.emit(std::slice::from_ref(&quota)).await.unwrap();
    let (soon, _) = ApiKey::builder()
        .expires_at(now_millis() + 3_600_000)
        .build();
    s.store.insert_key(&soon, 0).await.unwrap();
    assert_eq!(s.outbox.emit_expiring(now_millis()).await.unwrap(), 1);
    assert_eq!(s.outbox.emit_expiring(now_millis()).await.unwrap(), 0);
    let mut kinds = Vec::new();
    for _ in 0..10 {
        let claimed = s
            .outbox
            .claim(&all(), now_millis(), 60_000, 10)
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        for c in claimed {
            let v: Value = serde_json::from_str(&c.body).unwrap();
            if c.event_type == "quota.threshold" {
                assert_eq!(c.body, quota.body);
                assert_eq!(v["data"]["percent"], 80);
            }
            if c.event_type == "key.expiring" {
                assert_eq!(v["data"]["id"], soon.id.to_string());
                assert_eq!(v["data"]["days"], 1);
            }
            kinds.push(c.event_type.clone());
            s.outbox
                .complete(&c, &Outcome::Delivered { status: 200 }, now_millis())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "client.created",
            "key.created",
            "key.created",
            "key.expiring",
            "quota.threshold"
        ]
    );
}

/// Every delivery's (type, data.reason, data.id), claimed and delivered until none is left.
async fn drain(s: &Subject) -> Vec<(String, Option<String>, String)> {
    let mut out = Vec::new();
    loop {
        let claimed = s
            .outbox
            .claim(&all(), now_millis(), 60_000, 100)
            .await
            .unwrap();
        if claimed.is_empty() {
            return out;
        }
        for c in claimed {
            let v: Value = serde_json::from_str(&c.body).unwrap();
            out.push((
                c.event_type.clone(),
                v["data"]["reason"].as_str().map(str::to_owned),
                v["data"]["id"]
                    .as_str()
                    .or(v["data"]["client_id"].as_str())
                    .unwrap()
                    .to_owned(),
            ));
            s.outbox
                .complete(&c, &Outcome::Delivered { status: 200 }, now_millis())
                .await
                .unwrap();
        }
    }
}

async fn client_wide_writes_write_an_event_per_key(s: &Subject) {
    let first = new_client(s).await;
    let (second, _) = ApiKey::builder().build();
    s.store.insert_key(&second, 0).await.unwrap();
    let (off, _) = ApiKey::builder().enabled(false).build();
    s.store.insert_key(&off, 0).await.unwrap();
    drain(s).await;
    // Disabling every key: key.revoked for each key that was enabled.
    s.store.disable_client_keys(&first.client_id).await.unwrap();
    let mut got = drain(s).await;
    got.sort();
    let mut want = vec![
        (
            "key.revoked".to_owned(),
            Some("disabled".to_owned()),
            first.id.to_string(),
        ),
        (
            "key.revoked".to_owned(),
            Some("disabled".to_owned()),
            second.id.to_string(),
        ),
    ];
    want.sort();
    assert_eq!(got, want);
    // Replacing the keys: key.revoked (deleted) for each, key.created for the new one.
    let (new, _) = ApiKey::builder().build();
    s.store
        .replace_client_keys(&first.client_id, &new)
        .await
        .unwrap();
    let got = drain(s).await;
    assert_eq!(got.len(), 4, "{got:?}");
    for k in [&first, &second, &off] {
        assert!(got.contains(&(
            "key.revoked".to_owned(),
            Some("deleted".to_owned()),
            k.id.to_string()
        )));
    }
    assert!(got.contains(&("key.created".to_owned(), None, new.id.to_string())));
    // Deleting the client: key.revoked (deleted) for its key, then client.deleted.
    s.store.delete_client(&first.client_id).await.unwrap();
    let got = drain(s).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains(&(
        "key.revoked".to_owned(),
        Some("deleted".to_owned()),
        new.id.to_string()
    )));
    assert!(got.contains(&("client.deleted".to_owned(), None, first.client_id.clone())));
}

/// Every delivery body, claimed and delivered until none is left.
async fn drain_bodies(s: &Subject) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let claimed = s
            .outbox
            .claim(&all(), now_millis(), 60_000, 100)
            .await
            .unwrap();
        if claimed.is_empty() {
            return out;
        }
        for c in claimed {
            out.push(serde_json::from_str(&c.body).unwrap());
            s.outbox
                .complete(&c, &Outcome::Delivered { status: 200 }, now_millis())
                .await
                .unwrap();
        }
    }
}

/// A leak report's revoke: `key.updated`, `key.revoked` and `key.leaked` from one write, in that
/// order, `action` saying what the write found.
async fn a_leak_report_is_written_with_the_revoke_it_caused(s: &Subject) {
    let key = new_client(s).await;
    drain_bodies(s).await;
    let report = serde_json::json!({
        "url": "https://github.com/octo/leaky/blob/main/.env",
        "source": "content",
        "token_type": "keygate_api_key",
    });
    let revoke = KeyPatch {
        enabled: Some(false),
        by: SetBy::Admin,
        leak: Some(report.clone()),
        ..KeyPatch::default()
    };
    let after = s
        .store
        .patch_key(key.id, &revoke, now_millis())
        .await
        .unwrap()
        .unwrap();
    assert!(!after.enabled);
    let got = drain_bodies(s).await;
    let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["key.updated", "key.revoked", "key.leaked"],
        "{got:?}"
    );
    let leaked = &got[2]["data"];
    assert_eq!(leaked["id"], key.id.to_string());
    assert_eq!(leaked["enabled"], false);
    assert_eq!(leaked["url"], report["url"]);
    assert_eq!(leaked["source"], "content");
    assert_eq!(leaked["token_type"], "keygate_api_key");
    assert_eq!(leaked["action"], "revoked");
    assert_eq!(got[1]["data"]["reason"], "disabled");
    // The same report on the key as it is now (disabled): no second key.revoked.
    s.store
        .patch_key(key.id, &revoke, now_millis())
        .await
        .unwrap()
        .unwrap();
    let got = drain_bodies(s).await;
    let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["key.updated", "key.leaked"], "{got:?}");
    assert_eq!(got[1]["data"]["action"], "already_disabled");
    // A patch without a report writes no key.leaked.
    let rename = KeyPatch {
        name: Some("renamed".into()),
        by: SetBy::Admin,
        ..KeyPatch::default()
    };
    s.store
        .patch_key(key.id, &rename, now_millis())
        .await
        .unwrap();
    let got = drain_bodies(s).await;
    let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["key.updated"], "{got:?}");
}

/// A claim hands out at most each webhook's room (0: fanned out, none claimed) and `limit` in all;
/// a webhook the claimer does not name (another instance's, or removed) has its due deliveries
/// left to those that know it until their events are `ORPHAN_AFTER_MS` old, then handed out
/// without a bound (to be given up).
async fn a_claim_hands_out_at_most_each_webhooks_room(s: &Subject) {
    let sub = |id: &str, room: usize| Subscription {
        webhook_id: id.into(),
        events: vec!["*".into()],
        room,
        stored: false,
    };
    for n in 0..3 {
        let (key, _) = ApiKey::builder().client(format!("room{n}")).build();
        s.store
            .insert_client(&testing::client(&key.client_id), &key)
            .await
            .unwrap();
    }
    // The webhook of each delivery a claim hands out.
    let claim_at = |subs: Vec<Subscription>, limit: usize, now: i64| async move {
        let claimed = s.outbox.claim(&subs, now, 60_000, limit).await.unwrap();
        claimed
            .into_iter()
            .map(|c| c.webhook_id)
            .collect::<Vec<_>>()
    };
    let claim = |subs: Vec<Subscription>, limit: usize| claim_at(subs, limit, now_millis());
    // Six queues per webhook (each client's client.created and its key's key.created).
    assert_eq!(
        claim(vec![sub("wh_a", 0), sub("wh_b", 2)], 10).await,
        ["wh_b"; 2]
    );
    // wh_a's deliveries were written all the same; the limit binds before its room of 5.
    assert_eq!(
        claim(vec![sub("wh_a", 5), sub("wh_b", 0)], 3).await,
        ["wh_a"; 3]
    );
    // A claimer that does not know wh_a leaves its other three to those that do, until
    // their events are a day old; then it hands out all six (the three claimed above long
    // past their lease) without a bound.
    assert!(claim(vec![sub("wh_b", 0)], 10).await.is_empty());
    let orphaned = now_millis() + keygate::keys::outbox::ORPHAN_AFTER_MS;
    assert_eq!(
        claim_at(vec![sub("wh_b", 0)], 10, orphaned).await,
        ["wh_a"; 6]
    );
    // wh_b's other four, then nothing (every delivery is leased).
    assert_eq!(
        claim(vec![sub("wh_a", 10), sub("wh_b", 10)], 10).await,
        ["wh_b"; 4]
    );
    assert!(
        claim(vec![sub("wh_a", 10), sub("wh_b", 10)], 10)
            .await
            .is_empty()
    );
}

/// A backlog of queues of a webhook no claimer knows (removed from the configuration, its
/// receiver long down) does not starve the others: the queues of `wh_gone` (more than a
/// claim looks at) come first by time, and `wh_live`'s delivery is still handed out.
async fn queues_of_a_webhook_nobody_knows_do_not_starve_the_others(s: &Subject) {
    let sub = |id: &str, room: usize| Subscription {
        webhook_id: id.into(),
        events: vec!["*".into()],
        room,
        stored: false,
    };
    let first = new_client(s).await;
    drain_bodies(s).await;
    let n = keygate::keys::outbox::CLAIM_SCAN + 10;
    let keys: Vec<ApiKey> = (0..n)
        .map(|i| {
            ApiKey::builder()
                .client(&first.client_id)
                .name(format!("g{i}"))
                .build()
                .0
        })
        .collect();
    assert!(s.store.import_keys(keys, 0, true).await.unwrap().is_empty());
    // Fanned out to wh_gone (a queue per key), none claimed.
    let now = now_millis();
    assert!(
        s.outbox
            .claim(&[sub("wh_gone", 0)], now, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let (live, _) = ApiKey::builder().client("live").build();
    s.store
        .insert_client(&testing::client("live"), &live)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got = s
            .outbox
            .claim(&[sub("wh_live", 10)], now_millis(), 60_000, 10)
            .await
            .unwrap();
        if !got.is_empty() {
            break;
        }
    }
    assert!(
        !got.is_empty(),
        "wh_live got nothing behind wh_gone's backlog"
    );
    assert!(got.iter().all(|c| c.webhook_id == "wh_live"));
}

async fn imported_keys_write_key_created_marked_imported(s: &Subject) {
    use keygate::keys::store::import::Refusal;
    let first = new_client(s).await;
    let before = drain_bodies(s).await;
    assert!(
        before.iter().all(|v| v["data"].get("imported").is_none()),
        "{before:?}"
    );
    let imported = |name: &str| {
        let (k, _) = ApiKey::builder()
            .client(&first.client_id)
            .name(name)
            .build();
        k
    };
    let (a, b) = (imported("a"), imported("b"));
    let mut dup = imported("dup");
    dup.key_hash = a.key_hash;
    let (orphan, _) = ApiKey::builder().client("nobody").build();
    // An atomic import with a refusal writes nothing: no key, no event.
    let refused = s
        .store
        .import_keys(vec![a.clone(), orphan.clone()], 0, true)
        .await
        .unwrap();
    assert_eq!(refused, [(1, Refusal::UnknownClient)]);
    assert!(s.store.find_by_id(a.id).await.unwrap().is_none());
    assert!(
        drain_bodies(s).await.is_empty(),
        "events of an import undone"
    );
    // A non-atomic import: one key.created per written key, marked imported.
    let refused = s
        .store
        .import_keys(vec![a.clone(), dup, b.clone(), orphan], 0, false)
        .await
        .unwrap();
    assert_eq!(
        refused,
        [(1, Refusal::Duplicate), (3, Refusal::UnknownClient)]
    );
    let got = drain_bodies(s).await;
    let mut created: Vec<(String, String)> = got
        .iter()
        .map(|v| {
            assert_eq!(v["type"], "key.created", "{v}");
            assert_eq!(v["data"]["imported"], true, "{v}");
            assert_eq!(v["data"]["client_id"], first.client_id.as_str());
            (
                v["data"]["id"].as_str().unwrap().to_owned(),
                v["data"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    created.sort();
    let mut want = vec![
        (a.id.to_string(), "a".to_owned()),
        (b.id.to_string(), "b".to_owned()),
    ];
    want.sort();
    assert_eq!(created, want);
    for v in &got {
        let text = v.to_string();
        assert!(!text.contains("hash"), "{text}");
    }
}

/// The most keys one admin import takes (10,000) go through in one call, each with its event.
async fn an_import_of_ten_thousand_keys_is_written_whole_with_its_events(s: &Subject) {
    let first = new_client(s).await;
    drain_bodies(s).await;
    let keys: Vec<ApiKey> = (0..10_000)
        .map(|i| {
            ApiKey::builder()
                .client(&first.client_id)
                .name(format!("k{i}"))
                .build()
                .0
        })
        .collect();
    // Atomic: a refusal in the last key, or a maximum reached across chunks, writes nothing.
    let mut bad = keys.clone();
    bad[9_999].client_id = "nobody".into();
    let refused = s.store.import_keys(bad, 0, true).await.unwrap();
    assert_eq!(
        refused,
        [(9_999, keygate::keys::store::import::Refusal::UnknownClient)]
    );
    let refused = s
        .store
        .import_keys(keys[..1_000].to_vec(), 600, true)
        .await
        .unwrap();
    // The client has its first key: the 600th imported (index 599) is one too many.
    assert_eq!(refused.first().map(|r| r.0), Some(599));
    assert_eq!(refused.len(), 401);
    assert!(s.store.find_by_id(keys[0].id).await.unwrap().is_none());
    assert!(
        drain_bodies(s).await.is_empty(),
        "events of an import refused"
    );
    let refused = s.store.import_keys(keys.clone(), 0, true).await.unwrap();
    assert!(refused.is_empty());
    for k in [&keys[0], &keys[9_999]] {
        assert_eq!(
            s.store.find_by_id(k.id).await.unwrap().unwrap().key.id,
            k.id
        );
    }
    let got = drain_bodies(s).await;
    assert_eq!(got.len(), 10_000);
    assert!(got.iter().all(|v| v["data"]["imported"] == true));
}
