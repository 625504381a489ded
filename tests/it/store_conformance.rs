//! One conformance suite for the `Store` trait, run unchanged against every implementation:
//! each behaviour is a generic `async fn(Arc<dyn Store>)`, and `conformance!` makes one test per
//! behaviour and store (`store_conformance::sqlite::…`, `store_conformance::redis::…`).
//! The Redis variant runs against a real `redis-server` (TCP, database 2, a non-default prefix)
//! and afterwards checks that no command walked the keyspace (`KEYS`, `SCAN`). Tests run on a
//! multi-threaded runtime, so the calls a test spawns really run at the same time.

use std::sync::Arc;

use keygate::keys::store::redis::RedisStore;
use keygate::keys::store::sqlite::SqliteStore;
use keygate::keys::store::{
    ClientPatch, Conflict, Constraint, KeyPatch, Rotated, Rotation, Store, StoreError, Usage,
};
use keygate::keys::{ApiKey, Client, KeyHash, Millis, RateLimit, SetBy, now_millis};
use uuid::Uuid;

use crate::redis_support::RedisServer;

/// A store under test and what keeps it alive.
pub struct Subject {
    pub store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    redis: Option<RedisServer>,
}

pub fn sqlite_store() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("k.db")).unwrap();
    Subject {
        store: Arc::new(store),
        _dir: Some(dir),
        redis: None,
    }
}

pub fn redis_store() -> Subject {
    let redis = RedisServer::start();
    let store = RedisStore::open(&redis.tcp_url(2), "conformance:").unwrap();
    Subject {
        store: Arc::new(store),
        _dir: None,
        redis: Some(redis),
    }
}

impl Subject {
    fn finish(self) {
        if let Some(r) = &self.redis {
            r.assert_no_keyspace_scans();
            // Everything lives under the prefix, in the configured database.
            let keys: Vec<String> = r.query(2, ::redis::cmd("KEYS").arg("*"));
            assert!(!keys.is_empty());
            for k in &keys {
                assert!(k.starts_with("conformance:"), "{k} outside the prefix");
            }
            let other: Vec<String> = r.query(0, ::redis::cmd("KEYS").arg("*"));
            assert!(other.is_empty(), "{other:?} written to database 0");
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = super::sqlite_store();
                    super::$name(Arc::clone(&s.store)).await;
                    s.finish();
                }
            )*
            use std::sync::Arc;
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let s = super::redis_store();
                    super::$name(Arc::clone(&s.store)).await;
                    s.finish();
                }
            )*
            use std::sync::Arc;
        }
    };
}

conformance!(
    insert_then_find_by_hash_and_by_id,
    unknown_hashes_and_ids_are_none,
    previous_hash_works_only_within_its_grace_period,
    list_keys_paginates_in_creation_order_with_client_filter,
    max_keys_per_client_and_unknown_client,
    patch_key_changes_only_what_it_names,
    rotate_key_changes_only_the_secret,
    delete_key_removes_it_everywhere,
    insert_client_conflicts_write_nothing,
    clients_get_list_patch_delete,
    disable_client_keys_disables_them_all,
    replace_client_keys_replaces_them_all,
    racing_disable_rotate_and_patch_never_undo_an_acknowledged_write,
    client_patches_never_loosen_what_an_admin_set,
    disables_rotations_and_revokes_move_the_token_generation_on,
    usage_counts_add_up_per_day_and_die_with_the_key,
    ping_answers,
);

fn client(id: &str, license: &str, created_at: Millis) -> Client {
    Client {
        client_id: id.into(),
        license: license.into(),
        created_at,
        metadata: None,
    }
}

/// A new key of `client_id` created at `created_at`, and its hash.
fn key(client_id: &str, created_at: Millis) -> (ApiKey, KeyHash) {
    let (key, new) = ApiKey::builder()
        .client(client_id)
        .name("a key")
        .permissions(&["READ", "WRITE"])
        .created_at(created_at)
        .build();
    (key, new.hash)
}

async fn insert_then_find_by_hash_and_by_id(s: Arc<dyn Store>) {
    let now = now_millis();
    let mut c = client("acme", "pro", now);
    c.metadata = Some(serde_json::json!({"tier": "gold", "n": [1, 2]}));
    let (mut k, h) = key("acme", now);
    k.expires_at = Some(now + 86_400_000);
    k.rate_limit = Some(RateLimit {
        per_second: None,
        per_minute: Some(600),
        per_hour: None,
        burst: 50,
    });
    k.metadata = Some(serde_json::json!({"team": "ci"}));
    // Who set each constraint is kept as written.
    k.expires_set_by = Some(SetBy::Client);
    k.rate_limit_set_by = Some(SetBy::Admin);
    k.permissions = vec!["DATA_EXTRACTION".into(), "keys:manage".into()];
    s.insert_client(&c, &k).await.unwrap();

    let r = s
        .find_by_hash(&h, now)
        .await
        .unwrap()
        .expect("found by hash");
    assert_eq!(r.key, k);
    assert_eq!(r.license, "pro");
    let r = s.find_by_id(k.id).await.unwrap().expect("found by id");
    assert_eq!(r.key, k);
    assert_eq!(r.license, "pro");
    assert_eq!(s.get_client("acme").await.unwrap(), Some(c));

    // A second key of the same client, without any optional field.
    let (k2, h2) = key("acme", now + 1);
    s.insert_key(&k2, 5).await.unwrap();
    assert_eq!(s.find_by_hash(&h2, now).await.unwrap().unwrap().key, k2);
    assert_eq!(s.find_by_hash(&h, now).await.unwrap().unwrap().key, k);
}

async fn unknown_hashes_and_ids_are_none(s: Arc<dyn Store>) {
    let now = now_millis();
    assert_eq!(
        s.find_by_hash(&KeyHash::of("nothing"), now).await.unwrap(),
        None
    );
    assert_eq!(s.find_by_id(Uuid::now_v7()).await.unwrap(), None);
    let (k, _) = key("acme", now);
    s.insert_client(&client("acme", "free", now), &k)
        .await
        .unwrap();
    assert_eq!(
        s.find_by_hash(&KeyHash::of("still nothing"), now)
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.find_by_id(Uuid::now_v7()).await.unwrap(), None);
    assert_eq!(s.get_client("nobody").await.unwrap(), None);
}

/// A rotation to `hash` at `at`, the replaced secret working until `until` (if given).
fn rotation(hash: KeyHash, at: Millis, until: Option<Millis>) -> Rotation {
    Rotation {
        key_hash: hash,
        prefix: "kg_rotatedAB".into(),
        previous_valid_until: until,
        at,
    }
}

async fn previous_hash_works_only_within_its_grace_period(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k, h1) = key("acme", now);
    s.insert_client(&client("acme", "pro", now), &k)
        .await
        .unwrap();

    // Rotation with a one-hour grace period.
    let until = now + 3_600_000;
    let h2 = KeyHash::of("second");
    let r = s
        .rotate_key(k.id, &rotation(h2, now, Some(until)))
        .await
        .unwrap()
        .expect("rotated");
    assert_eq!(r.before, k);
    assert_eq!((r.after.key_hash, r.after.previous_hash), (h2, Some(h1)));
    let k = r.after;

    let found = s
        .find_by_hash(&h1, now)
        .await
        .unwrap()
        .expect("old key in grace");
    assert_eq!(found.key, k);
    assert!(s.find_by_hash(&h1, until - 1).await.unwrap().is_some());
    assert_eq!(
        s.find_by_hash(&h1, until).await.unwrap(),
        None,
        "grace over"
    );
    assert_eq!(s.find_by_hash(&h1, until + 1).await.unwrap(), None);
    for t in [now, until, until + 1] {
        assert_eq!(s.find_by_hash(&h2, t).await.unwrap().unwrap().key, k);
    }

    // Rotation without grace: only the newest hash works.
    let h3 = KeyHash::of("third");
    let k = s
        .rotate_key(k.id, &rotation(h3, now, None))
        .await
        .unwrap()
        .unwrap()
        .after;
    assert_eq!((k.previous_hash, k.previous_valid_until), (None, None));
    assert_eq!(s.find_by_hash(&h1, now).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h2, now).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h3, now).await.unwrap().unwrap().key, k);

    // Rotation with grace again: the grace hash is the one just replaced, never an older one.
    let h4 = KeyHash::of("fourth");
    s.rotate_key(k.id, &rotation(h4, now, Some(until)))
        .await
        .unwrap()
        .unwrap();
    assert!(s.find_by_hash(&h3, now).await.unwrap().is_some());
    assert_eq!(s.find_by_hash(&h2, now).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h1, now).await.unwrap(), None);
    // And a rotation with grace right after it drops h3: only one previous secret at a time.
    let h5 = KeyHash::of("fifth");
    s.rotate_key(k.id, &rotation(h5, now, Some(until)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.find_by_hash(&h3, now).await.unwrap(), None);
    assert!(s.find_by_hash(&h4, now).await.unwrap().is_some());
    assert!(s.find_by_hash(&h5, now).await.unwrap().is_some());
}

async fn list_keys_paginates_in_creation_order_with_client_filter(s: Arc<dyn Store>) {
    let t = 1_700_000_000_000;
    s.insert_client(&client("a", "pro", t), &key("a", t + 10).0)
        .await
        .unwrap();
    s.insert_client(&client("b", "free", t), &key("b", t + 5).0)
        .await
        .unwrap();
    // Two keys created in the same millisecond: ordered by id.
    let (mut same1, _) = key("a", t + 20);
    let (mut same2, _) = key("a", t + 20);
    same1.id = Uuid::parse_str("00000000-0000-7000-8000-00000000000b").unwrap();
    same2.id = Uuid::parse_str("00000000-0000-7000-8000-00000000000a").unwrap();
    s.insert_key(&same1, 0).await.unwrap();
    s.insert_key(&same2, 0).await.unwrap();
    s.insert_key(&key("b", t + 1).0, 0).await.unwrap();

    let all: Vec<(String, Millis)> = s
        .list_keys(None, 1, 100)
        .await
        .unwrap()
        .items
        .iter()
        .map(|k| (k.client_id.clone(), k.created_at))
        .collect();
    assert_eq!(
        all,
        vec![
            ("b".into(), t + 1),
            ("b".into(), t + 5),
            ("a".into(), t + 10),
            ("a".into(), t + 20),
            ("a".into(), t + 20),
        ]
    );
    let p = s.list_keys(None, 2, 2).await.unwrap();
    assert_eq!(p.total, 5);
    assert_eq!(
        p.items.iter().map(|k| k.created_at).collect::<Vec<_>>(),
        vec![t + 10, t + 20]
    );
    assert_eq!(p.items[1].id, same2.id, "ties ordered by id");
    let p = s.list_keys(None, 3, 2).await.unwrap();
    assert_eq!((p.items.len(), p.total), (1, 5));
    assert_eq!(p.items[0].id, same1.id);
    let p = s.list_keys(None, 4, 2).await.unwrap();
    assert_eq!((p.items.len(), p.total), (0, 5));

    let a = s.list_keys(Some("a"), 1, 2).await.unwrap();
    assert_eq!(a.total, 3);
    assert_eq!(a.items.len(), 2);
    assert!(a.items.iter().all(|k| k.client_id == "a"));
    let a2 = s.list_keys(Some("a"), 2, 2).await.unwrap();
    assert_eq!(a2.items, vec![same1.clone()]);
    let none = s.list_keys(Some("nobody"), 1, 10).await.unwrap();
    assert_eq!((none.items.len(), none.total), (0, 0));
    // Full records, as stored.
    let full = s.list_keys(Some("a"), 1, 10).await.unwrap();
    assert_eq!(full.items[1], same2);
}

async fn max_keys_per_client_and_unknown_client(s: Arc<dyn Store>) {
    let now = now_millis();
    s.insert_client(&client("acme", "pro", now), &key("acme", now).0)
        .await
        .unwrap();
    s.insert_key(&key("acme", now + 1).0, 2).await.unwrap();
    let (third, third_hash) = key("acme", now + 2);
    match s.insert_key(&third, 2).await {
        Err(StoreError::Conflict(Conflict::TooManyKeys { max: 2 })) => {}
        other => panic!("expected TooManyKeys, got {other:?}"),
    }
    assert_eq!(
        s.find_by_id(third.id).await.unwrap(),
        None,
        "nothing written"
    );
    assert_eq!(s.find_by_hash(&third_hash, now).await.unwrap(), None);
    assert_eq!(s.list_keys(Some("acme"), 1, 10).await.unwrap().total, 2);
    // 0 = unlimited.
    s.insert_key(&third, 0).await.unwrap();
    assert_eq!(s.list_keys(Some("acme"), 1, 10).await.unwrap().total, 3);
    // A higher limit leaves room.
    s.insert_key(&key("acme", now + 3).0, 4).await.unwrap();

    let (orphan, orphan_hash) = key("nobody", now);
    match s.insert_key(&orphan, 5).await {
        Err(StoreError::NotFound) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(s.find_by_hash(&orphan_hash, now).await.unwrap(), None);
    assert_eq!(s.list_keys(None, 1, 10).await.unwrap().total, 4);
}

async fn patch_key_changes_only_what_it_names(s: Arc<dyn Store>) {
    let now = now_millis();
    let (mut k, h) = key("acme", now);
    k.metadata = Some(serde_json::json!({"a": 1}));
    k.expires_at = Some(now + 1000);
    s.insert_client(&client("acme", "pro", now), &k)
        .await
        .unwrap();
    s.insert_client(&client("other", "pro", now), &key("other", now).0)
        .await
        .unwrap();
    s.record_usage(&[Usage {
        key_id: k.id,
        last_used_at: now + 40,
        day: 1,
        requests: 1,
    }])
    .await
    .unwrap();
    k.last_used_at = Some(now + 40);

    // Every patchable attribute at once.
    let limit = RateLimit {
        per_second: Some(5),
        per_minute: None,
        per_hour: None,
        burst: 10,
    };
    let all = KeyPatch {
        name: Some("renamed".into()),
        enabled: Some(false),
        permissions: Some(vec!["ONLY".into()]),
        expires_at: Some(None),
        rate_limit: Some(Some(limit)),
        metadata: Some(None),
        by: SetBy::Admin,
    };
    let expected = ApiKey {
        name: "renamed".into(),
        enabled: false,
        permissions: vec!["ONLY".into()],
        expires_at: None,
        rate_limit: Some(limit),
        metadata: None,
        updated_at: now + 50,
        disabled_by: Some(SetBy::Admin),
        expires_set_by: None,
        rate_limit_set_by: Some(SetBy::Admin),
        // A disable moves the token generation on to the write's time.
        tokens_valid_after: Some(now + 50),
        ..k.clone()
    };
    let patched = s.patch_key(k.id, &all, now + 50).await.unwrap();
    assert_eq!(
        patched,
        Some(expected.clone()),
        "the key as the write left it"
    );
    let r = s.find_by_id(k.id).await.unwrap().unwrap();
    assert_eq!(r.key, expected);
    assert_eq!(
        s.find_by_hash(&h, now).await.unwrap().unwrap().key,
        expected
    );
    assert_eq!(
        s.list_keys(Some("acme"), 1, 10).await.unwrap().items,
        vec![expected.clone()]
    );
    assert_eq!(s.list_keys(Some("other"), 1, 10).await.unwrap().total, 1);

    // One attribute: the others stay, whatever they are now.
    let enable = KeyPatch {
        enabled: Some(true),
        ..KeyPatch::default()
    };
    let k2 = s.patch_key(k.id, &enable, now + 60).await.unwrap().unwrap();
    assert_eq!(
        k2,
        ApiKey {
            enabled: true,
            updated_at: now + 60,
            disabled_by: None,
            ..expected.clone()
        }
    );
    let k3 = s
        .patch_key(
            k.id,
            &KeyPatch {
                expires_at: Some(Some(now + 5000)),
                metadata: Some(Some(serde_json::json!({"b": [2]}))),
                ..KeyPatch::default()
            },
            now + 70,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        k3,
        ApiKey {
            expires_at: Some(now + 5000),
            metadata: Some(serde_json::json!({"b": [2]})),
            updated_at: now + 70,
            expires_set_by: Some(SetBy::Admin),
            ..k2.clone()
        }
    );
    // An empty patch changes nothing but updated_at, which never moves back.
    let k4 = s
        .patch_key(k.id, &KeyPatch::default(), now + 65)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(k4, k3);
    assert_eq!(s.find_by_id(k.id).await.unwrap().unwrap().key, k3);

    let (ghost, _) = key("acme", now);
    assert_eq!(s.patch_key(ghost.id, &all, now).await.unwrap(), None);
    assert_eq!(s.find_by_id(ghost.id).await.unwrap(), None);
}

async fn rotate_key_changes_only_the_secret(s: Arc<dyn Store>) {
    let now = now_millis();
    let (mut k, h1) = key("acme", now);
    k.metadata = Some(serde_json::json!({"a": 1}));
    s.insert_client(&client("acme", "pro", now), &k)
        .await
        .unwrap();
    let disabled = s
        .patch_key(
            k.id,
            &KeyPatch {
                enabled: Some(false),
                name: Some("off".into()),
                ..KeyPatch::default()
            },
            now + 10,
        )
        .await
        .unwrap()
        .unwrap();

    let h2 = KeyHash::of("new secret");
    let Rotated { before, after } = s
        .rotate_key(k.id, &rotation(h2, now + 20, Some(now + 60_000)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before, disabled);
    assert_eq!(
        after,
        ApiKey {
            key_hash: h2,
            prefix: "kg_rotatedAB".into(),
            previous_hash: Some(h1),
            previous_valid_until: Some(now + 60_000),
            rotated_at: Some(now + 20),
            updated_at: now + 20,
            tokens_valid_after: Some(now + 20),
            ..disabled.clone()
        },
        "disabled and renamed still"
    );
    assert_eq!(s.find_by_id(k.id).await.unwrap().unwrap().key, after);
    // Found by either hash, and disabled under both.
    for h in [h1, h2] {
        assert!(!s.find_by_hash(&h, now).await.unwrap().unwrap().key.enabled);
    }
    // updated_at never moves back, even for a rotation stamped earlier.
    let h3 = KeyHash::of("third secret");
    let later = s
        .rotate_key(k.id, &rotation(h3, now + 15, None))
        .await
        .unwrap()
        .unwrap()
        .after;
    assert_eq!(
        (later.updated_at, later.rotated_at, later.tokens_valid_after),
        (now + 20, Some(now + 15), Some(now + 21))
    );

    let (ghost, _) = key("acme", now);
    let h4 = KeyHash::of("ghost secret");
    assert_eq!(
        s.rotate_key(ghost.id, &rotation(h4, now, None))
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.find_by_hash(&h4, now).await.unwrap(), None);
    assert_eq!(s.find_by_id(ghost.id).await.unwrap(), None);
}

async fn delete_key_removes_it_everywhere(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k1, h1) = key("acme", now);
    let (k2, h2) = key("acme", now + 1);
    s.insert_client(&client("acme", "pro", now), &k1)
        .await
        .unwrap();
    s.insert_key(&k2, 2).await.unwrap();
    // k2 rotated with grace: both of its hashes must go with it.
    let h2b = KeyHash::of("rotated");
    let k2 = s
        .rotate_key(k2.id, &rotation(h2b, now, Some(now + 60_000)))
        .await
        .unwrap()
        .unwrap()
        .after;

    assert_eq!(s.delete_key(k2.id).await.unwrap(), Some(k2.clone()));
    assert_eq!(s.find_by_id(k2.id).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h2, now).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h2b, now).await.unwrap(), None);
    assert_eq!(
        s.list_keys(None, 1, 10).await.unwrap().items,
        vec![k1.clone()]
    );
    assert_eq!(s.list_keys(Some("acme"), 1, 10).await.unwrap().total, 1);
    assert_eq!(s.delete_key(k2.id).await.unwrap(), None, "already gone");
    let gone = KeyPatch {
        name: Some("x".into()),
        ..KeyPatch::default()
    };
    assert_eq!(s.patch_key(k2.id, &gone, now).await.unwrap(), None);
    // The slot is free again.
    s.insert_key(&key("acme", now + 2).0, 2).await.unwrap();
    assert!(s.find_by_hash(&h1, now).await.unwrap().is_some());
    assert_eq!(s.delete_key(Uuid::now_v7()).await.unwrap(), None);
}

async fn insert_client_conflicts_write_nothing(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k1, _) = key("acme", now);
    s.insert_client(&client("acme", "pro", now), &k1)
        .await
        .unwrap();
    let (k2, h2) = key("acme", now + 1);
    match s.insert_client(&client("acme", "free", now + 1), &k2).await {
        Err(StoreError::Conflict(Conflict::ClientExists)) => {}
        other => panic!("expected ClientExists, got {other:?}"),
    }
    assert_eq!(s.find_by_hash(&h2, now).await.unwrap(), None);
    assert_eq!(s.find_by_id(k2.id).await.unwrap(), None);
    assert_eq!(s.get_client("acme").await.unwrap().unwrap().license, "pro");
    assert_eq!(s.list_clients(1, 10).await.unwrap().total, 1);
    assert_eq!(s.list_keys(None, 1, 10).await.unwrap().items, vec![k1]);
}

async fn clients_get_list_patch_delete(s: Arc<dyn Store>) {
    let t = 1_700_000_000_000;
    let now = now_millis();
    let (ka, ha) = key("a", t);
    let (kb1, hb1) = key("b", t + 1);
    let (kb2, hb2) = key("b", t + 2);
    s.insert_client(&client("c", "free", t + 3), &key("c", t + 3).0)
        .await
        .unwrap();
    s.insert_client(&client("a", "free", t + 1), &ka)
        .await
        .unwrap();
    s.insert_client(&client("b", "pro", t + 2), &kb1)
        .await
        .unwrap();
    s.insert_key(&kb2, 0).await.unwrap();

    let ids = |p: &keygate::keys::store::Page<Client>| {
        p.items
            .iter()
            .map(|c| c.client_id.clone())
            .collect::<Vec<_>>()
    };
    let p = s.list_clients(1, 10).await.unwrap();
    assert_eq!(
        (ids(&p), p.total),
        (vec!["a".into(), "b".into(), "c".into()], 3)
    );
    let p = s.list_clients(2, 2).await.unwrap();
    assert_eq!((ids(&p), p.total), (vec!["c".to_string()], 3));
    let p = s.list_clients(3, 2).await.unwrap();
    assert_eq!((p.items.len(), p.total), (0, 3));

    // Patch: license and metadata; the license shows in key lookups at once.
    let both = ClientPatch {
        license: Some("pro".into()),
        metadata: Some(Some(serde_json::json!({"x": true}))),
    };
    let a = s.patch_client("a", &both).await.unwrap().expect("patched");
    assert_eq!(
        a,
        Client {
            license: "pro".into(),
            metadata: Some(serde_json::json!({"x": true})),
            ..client("a", "free", t + 1)
        }
    );
    assert_eq!(s.get_client("a").await.unwrap(), Some(a.clone()));
    assert_eq!(
        s.find_by_hash(&ha, now).await.unwrap().unwrap().license,
        "pro"
    );
    // Only what is named changes.
    let license_only = ClientPatch {
        license: Some("free".into()),
        metadata: None,
    };
    let a2 = s.patch_client("a", &license_only).await.unwrap().unwrap();
    assert_eq!((a2.license.as_str(), &a2.metadata), ("free", &a.metadata));
    let clear_metadata = ClientPatch {
        license: None,
        metadata: Some(None),
    };
    let a3 = s.patch_client("a", &clear_metadata).await.unwrap().unwrap();
    assert_eq!((a3.license.as_str(), a3.metadata), ("free", None));
    assert_eq!(s.get_client("a").await.unwrap().unwrap().metadata, None);
    assert_eq!(s.patch_client("nobody", &both).await.unwrap(), None);
    assert_eq!(s.get_client("nobody").await.unwrap(), None);

    // Delete: the client and its keys, returned in creation order.
    let d = s.delete_client("b").await.unwrap().expect("deleted");
    assert_eq!(d.client, client("b", "pro", t + 2));
    assert_eq!(d.keys, vec![kb1.clone(), kb2.clone()]);
    assert_eq!(s.get_client("b").await.unwrap(), None);
    for h in [hb1, hb2] {
        assert_eq!(s.find_by_hash(&h, now).await.unwrap(), None);
    }
    assert_eq!(s.find_by_id(kb1.id).await.unwrap(), None);
    assert_eq!(s.list_keys(Some("b"), 1, 10).await.unwrap().total, 0);
    assert_eq!(s.list_keys(None, 1, 10).await.unwrap().total, 2);
    let p = s.list_clients(1, 10).await.unwrap();
    assert_eq!((ids(&p), p.total), (vec!["a".into(), "c".into()], 2));
    assert_eq!(s.delete_client("b").await.unwrap(), None);
    // The id can be used again.
    s.insert_client(&client("b", "free", t + 9), &key("b", t + 9).0)
        .await
        .unwrap();
    assert_eq!(s.list_keys(Some("b"), 1, 10).await.unwrap().total, 1);
}

async fn disable_client_keys_disables_them_all(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k1, h1) = key("acme", now);
    let (k2, h2) = key("acme", now + 1);
    s.insert_client(&client("acme", "pro", now), &k1)
        .await
        .unwrap();
    s.insert_key(&k2, 0).await.unwrap();
    let (other, other_hash) = key("other", now);
    s.insert_client(&client("other", "pro", now), &other)
        .await
        .unwrap();

    // Every key of the client disabled, returned as it was; nothing else changes.
    let before = s.disable_client_keys("acme").await.unwrap();
    assert_eq!(before, vec![k1.clone(), k2.clone()]);
    for (k, h) in [(&k1, h1), (&k2, h2)] {
        let r = s
            .find_by_hash(&h, now)
            .await
            .unwrap()
            .expect("still stored");
        assert!(r.key.updated_at >= k.updated_at);
        assert!(r.key.tokens_valid_after.is_some());
        assert_eq!(
            r.key,
            ApiKey {
                enabled: false,
                disabled_by: Some(SetBy::Admin),
                updated_at: r.key.updated_at,
                tokens_valid_after: r.key.tokens_valid_after,
                ..k.clone()
            }
        );
    }
    assert!(
        s.find_by_hash(&other_hash, now)
            .await
            .unwrap()
            .unwrap()
            .key
            .enabled
    );
    // Again: the keys as they are now (disabled).
    let before = s.disable_client_keys("acme").await.unwrap();
    assert!(before.iter().all(|k| !k.enabled));
    assert!(matches!(
        s.disable_client_keys("nobody").await,
        Err(StoreError::NotFound)
    ));
}

async fn replace_client_keys_replaces_them_all(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k1, h1) = key("acme", now);
    let (k2, h2) = key("acme", now + 1);
    s.insert_client(&client("acme", "pro", now), &k1)
        .await
        .unwrap();
    s.insert_key(&k2, 0).await.unwrap();
    let (other, other_hash) = key("other", now);
    s.insert_client(&client("other", "pro", now), &other)
        .await
        .unwrap();

    // Every key of the client replaced by one new key.
    let (k3, h3) = key("acme", now + 2);
    let before = s.replace_client_keys("acme", &k3).await.unwrap();
    assert_eq!(before, vec![k1.clone(), k2.clone()]);
    assert_eq!(s.find_by_hash(&h1, now).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h2, now).await.unwrap(), None);
    assert_eq!(s.find_by_id(k1.id).await.unwrap(), None);
    assert_eq!(s.find_by_hash(&h3, now).await.unwrap().unwrap().key, k3);
    assert_eq!(
        s.list_keys(Some("acme"), 1, 10).await.unwrap().items,
        vec![k3.clone()]
    );
    assert_eq!(s.list_keys(None, 1, 10).await.unwrap().total, 2);
    assert!(s.find_by_hash(&other_hash, now).await.unwrap().is_some());

    // Unknown client: NotFound, and the new key is not written.
    let (k5, h5) = key("nobody", now);
    match s.replace_client_keys("nobody", &k5).await {
        Err(StoreError::NotFound) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(s.find_by_hash(&h5, now).await.unwrap(), None);
    assert_eq!(s.find_by_id(k5.id).await.unwrap(), None);
}

/// What the race test counts; every figure must stay 0.
#[derive(Debug, Default)]
struct Undone {
    /// The key was enabled again although nothing re-enabled it.
    disables: usize,
    /// The key's secret was not the rotated one, or an older secret was still attached.
    rotations: usize,
    /// The key's name was not one of the two acknowledged PATCHes' names.
    patches: usize,
    /// The rotated-away hash still found a key.
    rotated_away_found: usize,
    /// The rotated hash found the key enabled.
    disabled_found_enabled: usize,
}

impl Undone {
    fn total(&self) -> usize {
        self.disables
            + self.rotations
            + self.patches
            + self.rotated_away_found
            + self.disabled_found_enabled
    }
}

/// The lost update of the admin plane, on the store calls its handlers make. Each round, four
/// writes to one key are in flight at once: an admin's disable (`patch_key` naming `enabled`),
/// an admin's rotation without grace (`rotate_key`), and two harmless PATCHes (`patch_key`
/// naming `name`) such as a stolen `keys:manage` key would send in a loop. All four are
/// acknowledged, so afterwards the key must be disabled, hold the rotated secret and nothing
/// older, carry one of the two names; the rotated-away hash must find nothing and the new hash
/// a disabled key. The admin then re-enables the key, which must work again (so the checks are
/// not vacuous), and the next round starts.
async fn racing_disable_rotate_and_patch_never_undo_an_acknowledged_write(s: Arc<dyn Store>) {
    const RACES: usize = 1_000;
    let started = std::time::Instant::now();
    let t0 = now_millis();
    let (k, mut current) = key("acme", t0);
    s.insert_client(&client("acme", "pro", t0), &k)
        .await
        .unwrap();
    let id = k.id;
    let patch = |p: KeyPatch| {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.patch_key(id, &p, now_millis()).await })
    };
    let mut undone = Undone::default();
    let mut acknowledged = 0;
    for i in 0..RACES {
        let fresh = KeyHash::of(&format!("{id} secret {i}"));
        let rename = |n: u32| KeyPatch {
            name: Some(format!("renamed {i}.{n}")),
            ..KeyPatch::default()
        };
        let first = patch(rename(1));
        let disable = patch(KeyPatch {
            enabled: Some(false),
            ..KeyPatch::default()
        });
        let rotate = {
            let s = Arc::clone(&s);
            tokio::spawn(
                async move { s.rotate_key(id, &rotation(fresh, now_millis(), None)).await },
            )
        };
        let last = patch(rename(2));
        first.await.unwrap().unwrap().expect("PATCH acknowledged");
        last.await.unwrap().unwrap().expect("PATCH acknowledged");
        let disabled = disable
            .await
            .unwrap()
            .unwrap()
            .expect("disable acknowledged");
        assert!(!disabled.enabled, "the disable's own answer");
        let rotated = rotate
            .await
            .unwrap()
            .unwrap()
            .expect("rotation acknowledged");
        assert_eq!(rotated.after.key_hash, fresh, "the rotation's own answer");
        acknowledged += 4;

        let now = now_millis();
        let stored = s.find_by_id(id).await.unwrap().expect("stored").key;
        if stored.enabled {
            undone.disables += 1;
        }
        if stored.key_hash != fresh || stored.previous_hash.is_some() {
            undone.rotations += 1;
        }
        if ![rename(1).name, rename(2).name].contains(&Some(stored.name.clone())) {
            undone.patches += 1;
        }
        if s.find_by_hash(&current, now).await.unwrap().is_some() {
            undone.rotated_away_found += 1;
        }
        match s.find_by_hash(&fresh, now).await.unwrap() {
            Some(r) if r.key.enabled => undone.disabled_found_enabled += 1,
            Some(_) => {}
            None => undone.rotations += 1,
        }

        let enable = KeyPatch {
            enabled: Some(true),
            ..KeyPatch::default()
        };
        s.patch_key(id, &enable, now_millis())
            .await
            .unwrap()
            .unwrap();
        let back = s.find_by_hash(&fresh, now_millis()).await.unwrap();
        if back.is_some_and(|r| r.key.enabled) {
            current = fresh;
        } else {
            // Only when the rotation was undone: the old secret is still the current one.
            assert!(undone.rotations > 0);
        }
    }
    eprintln!(
        "{RACES} races of disable, rotate and two PATCHes: {acknowledged} acknowledged writes, \
         {} undone ({undone:?}), {:.1} s",
        undone.total(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(undone.total(), 0, "acknowledged writes undone: {undone:?}");
}

async fn usage_counts_add_up_per_day_and_die_with_the_key(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k1, _) = key("acme", now);
    let (k2, _) = key("acme", now);
    s.insert_client(&client("acme", "pro", now), &k1)
        .await
        .unwrap();
    s.insert_key(&k2, 0).await.unwrap();
    let day = now.div_euclid(86_400_000);
    let u = |id, at, day, requests| Usage {
        key_id: id,
        last_used_at: at,
        day,
        requests,
    };
    s.record_usage(&[]).await.unwrap();
    s.record_usage(&[
        u(k1.id, now, day - 1, 4),
        u(k2.id, now + 3, day, 1),
        u(Uuid::now_v7(), now, day, 9),
    ])
    .await
    .unwrap();
    s.record_usage(&[u(k1.id, now + 5, day, 2), u(k1.id, now + 1, day, 3)])
        .await
        .unwrap();
    assert_eq!(
        s.usage(k1.id, day - 7, day).await.unwrap(),
        vec![(day - 1, 4), (day, 5)]
    );
    assert_eq!(s.usage(k1.id, day, day).await.unwrap(), vec![(day, 5)]);
    assert_eq!(s.usage(k2.id, day - 7, day).await.unwrap(), vec![(day, 1)]);
    let last = s.find_by_id(k1.id).await.unwrap().unwrap().key.last_used_at;
    assert_eq!(last, Some(now + 5), "the latest time wins");
    // Deleting a key deletes its usage.
    s.delete_key(k1.id).await.unwrap();
    assert!(s.usage(k1.id, day - 7, day).await.unwrap().is_empty());
}

async fn ping_answers(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
    let now = now_millis();
    s.insert_client(&client("acme", "pro", now), &key("acme", now).0)
        .await
        .unwrap();
    s.ping().await.unwrap();
}

async fn client_patches_never_loosen_what_an_admin_set(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k, _) = key("acme", now);
    s.insert_client(&client("acme", "pro", now), &k)
        .await
        .unwrap();
    let by = |by: SetBy, p: KeyPatch| KeyPatch { by, ..p };
    let admin = |p: KeyPatch| by(SetBy::Admin, p);
    let client = |p: KeyPatch| by(SetBy::Client, p);
    let limit = RateLimit {
        per_second: Some(2),
        per_minute: None,
        per_hour: None,
        burst: 2,
    };
    let constrained = s
        .patch_key(
            k.id,
            &admin(KeyPatch {
                enabled: Some(false),
                expires_at: Some(Some(now + 10_000)),
                rate_limit: Some(Some(limit)),
                ..KeyPatch::default()
            }),
            now + 1,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            constrained.disabled_by,
            constrained.expires_set_by,
            constrained.rate_limit_set_by
        ),
        (Some(SetBy::Admin), Some(SetBy::Admin), Some(SetBy::Admin))
    );

    // Each loosening is refused whole: the name in the same patch is not written either.
    for (patch, constraint) in [
        (
            KeyPatch {
                enabled: Some(true),
                ..KeyPatch::default()
            },
            Constraint::Disabled,
        ),
        (
            KeyPatch {
                expires_at: Some(None),
                ..KeyPatch::default()
            },
            Constraint::Expiry,
        ),
        (
            KeyPatch {
                expires_at: Some(Some(now + 20_000)),
                ..KeyPatch::default()
            },
            Constraint::Expiry,
        ),
        (
            KeyPatch {
                rate_limit: Some(None),
                ..KeyPatch::default()
            },
            Constraint::RateLimit,
        ),
    ] {
        let patch = client(KeyPatch {
            name: Some("loosened".into()),
            ..patch
        });
        match s.patch_key(k.id, &patch, now + 2).await {
            Err(StoreError::Refused(c)) => assert_eq!(c, constraint, "{patch:?}"),
            other => panic!("{patch:?}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            s.find_by_id(k.id).await.unwrap().unwrap().key,
            constrained,
            "{patch:?} changed the key"
        );
    }

    // Tightening is allowed, and what it tightens stays the admin's: the client cannot then
    // lift its own tightening past what the admin set, nor at all.
    let tighter = s
        .patch_key(
            k.id,
            &client(KeyPatch {
                enabled: Some(false),
                expires_at: Some(Some(now + 5_000)),
                ..KeyPatch::default()
            }),
            now + 3,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tighter.expires_at, Some(now + 5_000));
    assert_eq!(
        (tighter.disabled_by, tighter.expires_set_by),
        (Some(SetBy::Admin), Some(SetBy::Admin))
    );
    let back = client(KeyPatch {
        expires_at: Some(Some(now + 8_000)),
        ..KeyPatch::default()
    });
    assert!(matches!(
        s.patch_key(k.id, &back, now + 4).await,
        Err(StoreError::Refused(Constraint::Expiry))
    ));

    // What the admin lifts, and what the client then sets, the client may lift.
    let lifted = s
        .patch_key(
            k.id,
            &admin(KeyPatch {
                enabled: Some(true),
                expires_at: Some(None),
                rate_limit: Some(None),
                ..KeyPatch::default()
            }),
            now + 5,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            lifted.disabled_by,
            lifted.expires_set_by,
            lifted.rate_limit_set_by
        ),
        (None, None, None)
    );
    let own = s
        .patch_key(
            k.id,
            &client(KeyPatch {
                enabled: Some(false),
                expires_at: Some(Some(now + 3_000)),
                ..KeyPatch::default()
            }),
            now + 6,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (own.disabled_by, own.expires_set_by),
        (Some(SetBy::Client), Some(SetBy::Client))
    );
    let freed = s
        .patch_key(
            k.id,
            &client(KeyPatch {
                enabled: Some(true),
                expires_at: Some(None),
                ..KeyPatch::default()
            }),
            now + 7,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(freed.enabled && freed.expires_at.is_none());

    // The Kixote revoke disables as an admin.
    s.disable_client_keys("acme").await.unwrap();
    let revoked = s.find_by_id(k.id).await.unwrap().unwrap().key;
    assert_eq!(revoked.disabled_by, Some(SetBy::Admin));
    let enable = client(KeyPatch {
        enabled: Some(true),
        ..KeyPatch::default()
    });
    assert!(matches!(
        s.patch_key(k.id, &enable, now + 8).await,
        Err(StoreError::Refused(Constraint::Disabled))
    ));

    // A key stored disabled with no setter recorded (as before setters were recorded) is an
    // admin's.
    let (mut old, _) = key("acme", now + 9);
    old.enabled = false;
    old.disabled_by = None;
    s.insert_key(&old, 0).await.unwrap();
    let read = s.find_by_id(old.id).await.unwrap().unwrap().key;
    assert_eq!(read.disabled_by, Some(SetBy::Admin));
    assert!(matches!(
        s.patch_key(old.id, &enable, now + 10).await,
        Err(StoreError::Refused(Constraint::Disabled))
    ));

    // An admin's disable racing a client's enable: whichever lands first, the key ends
    // disabled by the admin (an enable judged after the disable is refused).
    let (raced, _) = key("acme", now + 11);
    s.insert_key(&raced, 0).await.unwrap();
    let id = raced.id;
    for round in 0..200 {
        let setup = client(KeyPatch {
            enabled: Some(false),
            ..KeyPatch::default()
        });
        let reset = s
            .patch_key(
                id,
                &admin(KeyPatch {
                    enabled: Some(true),
                    ..KeyPatch::default()
                }),
                now_millis(),
            )
            .await
            .unwrap()
            .unwrap();
        assert!(reset.enabled);
        s.patch_key(id, &setup, now_millis()).await.unwrap();
        let (a, c) = (Arc::clone(&s), Arc::clone(&s));
        let disable = tokio::spawn(async move {
            let p = KeyPatch {
                enabled: Some(false),
                by: SetBy::Admin,
                ..KeyPatch::default()
            };
            a.patch_key(id, &p, now_millis()).await
        });
        let enable = tokio::spawn(async move {
            let p = KeyPatch {
                enabled: Some(true),
                by: SetBy::Client,
                ..KeyPatch::default()
            };
            c.patch_key(id, &p, now_millis()).await
        });
        disable.await.unwrap().unwrap().unwrap();
        match enable.await.unwrap() {
            Ok(_) | Err(StoreError::Refused(Constraint::Disabled)) => {}
            other => panic!("round {round}: {other:?}"),
        }
        let after = s.find_by_id(id).await.unwrap().unwrap().key;
        assert!(
            !after.enabled && after.disabled_by == Some(SetBy::Admin),
            "round {round}: the admin's disable was undone: {after:?}"
        );
    }
}

async fn disables_rotations_and_revokes_move_the_token_generation_on(s: Arc<dyn Store>) {
    let now = now_millis();
    let (k, _) = key("acme", now);
    s.insert_client(&client("acme", "pro", now), &k)
        .await
        .unwrap();
    assert_eq!(k.tokens_valid_after, None);
    let generation = |s: Arc<dyn Store>| async move {
        s.find_by_id(k.id)
            .await
            .unwrap()
            .unwrap()
            .key
            .tokens_valid_after
            .expect("a generation")
    };
    let patch = |p: KeyPatch, at: Millis| {
        let s = Arc::clone(&s);
        async move { s.patch_key(k.id, &p, at).await.unwrap().unwrap() }
    };
    let disable = KeyPatch {
        enabled: Some(false),
        ..KeyPatch::default()
    };

    // A disable: the write's time.
    let g1 = patch(disable.clone(), now + 10).await.tokens_valid_after;
    assert_eq!(g1, Some(now + 10));
    // Enabling, renaming, changing the expiry: unchanged.
    for p in [
        KeyPatch {
            enabled: Some(true),
            ..KeyPatch::default()
        },
        KeyPatch {
            name: Some("n".into()),
            expires_at: Some(Some(now + 99_000)),
            ..KeyPatch::default()
        },
    ] {
        assert_eq!(patch(p, now + 20).await.tokens_valid_after, g1);
    }
    // Always past the current generation, even for a write stamped earlier (another
    // instance's clock) or in the same millisecond.
    let g2 = patch(disable.clone(), now + 5).await.tokens_valid_after;
    assert_eq!(g2, Some(now + 11));
    let g3 = patch(disable, now + 5).await.tokens_valid_after;
    assert_eq!(g3, Some(now + 12));

    // A rotation, with a grace period or not.
    let r = s
        .rotate_key(
            k.id,
            &rotation(KeyHash::of("r1"), now + 30, Some(now + 60_000)),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.after.tokens_valid_after, Some(now + 30));
    let r = s
        .rotate_key(k.id, &rotation(KeyHash::of("r2"), now + 30, None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.after.tokens_valid_after, Some(now + 31));
    assert_eq!(generation(Arc::clone(&s)).await, now + 31);

    // The Kixote revoke (every key of the client), at the store's own time.
    s.disable_client_keys("acme").await.unwrap();
    let g = generation(Arc::clone(&s)).await;
    assert!(g >= now + 32, "{g}");

    // A key inserted with a generation keeps it.
    let (mut k2, _) = key("acme", now + 1);
    k2.tokens_valid_after = Some(now - 7);
    s.insert_key(&k2, 0).await.unwrap();
    assert_eq!(
        s.find_by_id(k2.id)
            .await
            .unwrap()
            .unwrap()
            .key
            .tokens_valid_after,
        Some(now - 7)
    );
}
