//! Structure choices on the request path, each beside the naive alternative:
//! - the key cache (sharded hash maps) vs a moka cache hashed with `DigestHasher` (first 8
//!   bytes of the SHA-256) vs moka with its default SipHash hasher;
//! - the key bucket (own GCRA) vs governor's direct limiter;
//! - `number_header` (a table of pre-made `HeaderValue`s) vs `HeaderValue::from(u64)`;
//! - in-place header rewriting with pre-encoded identity headers (with and without reserving
//!   room first) vs rebuilding the map and encoding identity values per request;
//! - from the client's head bytes to the upstream's head bytes: the fast path (fields parsed in
//!   place and classified in one walk, the forwarded head written into one reused buffer) vs
//!   what the hyper path does (a `HeaderMap` built from the parsed head, rewritten in place,
//!   then serialised).
//!
//! - the CORS fields of an answer: the origin matched against pre-made patterns and written as
//!   bytes into the head (the fast path) vs added to a `HeaderMap` (hyper), and the cost of a
//!   route without CORS (nothing to do).
//!
//! - a connection's buffers between requests: taken from and given back to the thread's spares
//!   (what the fast path does per request, so idle connections hold none; the output buffer
//!   with the two field lists) vs allocated per connection as before; and the one block the
//!   exchange's state is allocated in and moved into per request, at its size now and at its
//!   size before (a block of that many bytes: a model of the move, not the future itself).
//!
//! - a timeout around a read or write of the data plane: `tokio::time::timeout` (a clock read
//!   and a timer per operation, registered in the timer wheel and taken out again when the
//!   operation waits) vs `deadline::within` (polled once before any timer) and, for the head
//!   waits of a keep-alive connection, `deadline::on_timer` (one timer per connection, its
//!   deadline moved); and a whole wait on that timer, each deadline later than the last.
//!
//! Run: `cargo bench --bench structures`.

mod common;

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use keygate::clock::Clock;
use keygate::keys::cache::{Cached, DigestHasher, Entry};
use keygate::keys::{ApiKey, KeyFormat, KeyHash, Principal, now_millis};
use keygate::limit::KeyLimiter;
use keygate::proxy::error::number as number_header;
use keygate::proxy::headers;
use keygate::proxy::policy::{FieldRules, Strip};

const KEYS: usize = 10_000;

fn principal(i: usize) -> (KeyHash, Arc<Principal>) {
    let (record, new) = ApiKey::builder()
        .client(format!("client-{i}"))
        .name("bench")
        .permissions(&["read", "write"])
        .record("pro");
    let p = Principal::from_record(
        &record,
        &new.hash,
        Arc::new(KeyLimiter::new(common::UNLIMITED, Clock::real())),
    );
    (new.hash, p)
}

fn moka_hashers(c: &mut Criterion) {
    let entries: Vec<(KeyHash, Arc<Principal>)> = (0..KEYS).map(principal).collect();
    let fresh_until = now_millis() + 600_000;
    let digest: moka::sync::Cache<KeyHash, Entry, DigestHasher> = moka::sync::Cache::builder()
        .max_capacity(1_000_000)
        .build_with_hasher(DigestHasher::default());
    let default: moka::sync::Cache<KeyHash, Entry> =
        moka::sync::Cache::builder().max_capacity(1_000_000).build();
    for (h, p) in &entries {
        let e = Entry {
            value: Cached::Found(Arc::clone(p)),
            fresh_until,
        };
        digest.insert(*h, e.clone());
        default.insert(*h, e);
    }
    digest.run_pending_tasks();
    default.run_pending_tasks();
    let ours = keygate::keys::cache::KeyCache::new(
        &keygate::keys::cache::CacheSettings {
            capacity: 1_000_000,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(600),
            stale_if_error: Duration::from_secs(600),
        },
        Clock::real(),
    );
    for (h, p) in &entries {
        ours.insert(
            *h,
            Cached::Found(Arc::clone(p)),
            ours.clock().now_millis(),
            ours.epoch(),
        );
    }
    let now = ours.clock().now_millis();
    let probe = entries[KEYS / 2].0;
    let mut g = c.benchmark_group("key_cache_structure");
    g.bench_function("sharded_maps", |b| {
        b.iter(|| ours.get_at(black_box(&probe), now).unwrap())
    });
    let mut i = 0;
    g.bench_function("sharded_maps_rotating_10k", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            ours.get_at(black_box(&entries[i].0), now).unwrap()
        })
    });
    g.bench_function("moka_digest_hasher", |b| {
        b.iter(|| digest.get(black_box(&probe)).unwrap())
    });
    g.bench_function("moka_default_siphash", |b| {
        b.iter(|| default.get(black_box(&probe)).unwrap())
    });
    let mut i = 0;
    g.bench_function("moka_digest_hasher_rotating_10k", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            digest.get(black_box(&entries[i].0)).unwrap()
        })
    });
    g.bench_function("moka_default_siphash_rotating_10k", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            default.get(black_box(&entries[i].0)).unwrap()
        })
    });
    g.finish();
}

/// The key bucket: our GCRA (three words) vs governor's direct limiter with the state
/// middleware (what the bucket was before), both never refusing.
fn limiters(c: &mut Criterion) {
    let ours = KeyLimiter::new(common::UNLIMITED, Clock::real());
    let theirs = governor::RateLimiter::direct(keygate::limit::quota(&common::UNLIMITED))
        .with_middleware::<governor::middleware::StateInformationMiddleware>();
    let mut g = c.benchmark_group("key_limiter");
    g.bench_function("own_gcra", |b| b.iter(|| ours.check().unwrap()));
    g.bench_function("governor_direct", |b| {
        b.iter(|| theirs.check().unwrap().remaining_burst_capacity())
    });
    g.finish();
}

fn number_headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("number_header");
    g.bench_function("table", |b| {
        b.iter(|| {
            (
                number_header(black_box(1_000)),
                number_header(black_box(999)),
                number_header(black_box(1)),
            )
        })
    });
    g.bench_function("header_value_from_u64", |b| {
        b.iter(|| {
            (
                HeaderValue::from(black_box(1_000u64)),
                HeaderValue::from(black_box(999u64)),
                HeaderValue::from(black_box(1u64)),
            )
        })
    });
    g.finish();
}

/// The request head wrk sends through keygate, plus the credential.
fn wrk_request(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert("x-api-key", HeaderValue::from_str(key).unwrap());
    h
}

/// A browser-like request head (more fields to walk).
fn browser_request(key: &str) -> HeaderMap {
    let mut h = wrk_request(key);
    for (k, v) in [
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("cookie", "session=abcdef0123456789; theme=dark"),
        ("x-request-id", "5d2c7f2e-9a1b-4c1e-8f00-0123456789ab"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// What keygate does for hyper-util's client: keep the forwarded fields by the policy's rules,
/// reserve room once when `reserve` is set, insert pre-encoded values.
fn rewrite_in_place(
    h: &mut HeaderMap,
    p: &Principal,
    peer: &HeaderValue,
    upstream: &HeaderValue,
    reserve: bool,
) {
    let api_key = HeaderName::from_static("x-api-key");
    let inbound = headers::retain_forwarded(h, Strip::API_KEY, &FieldRules::new(api_key, false));
    if reserve {
        h.reserve(8);
    }
    headers::add_identity(h, &p.headers);
    headers::add_forwarded(h, inbound, peer, "http", upstream);
}

/// The naive version: a new map, names and values made per request.
fn rewrite_rebuild(h: &HeaderMap, p: &Principal, peer: &str, upstream: &str) -> HeaderMap {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ];
    let mut out = HeaderMap::new();
    for (k, v) in h {
        let n = k.as_str();
        if n.starts_with("x-keygate-") || n == "x-api-key" || n == "host" || HOP.contains(&n) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    let name = |s: &str| HeaderName::from_bytes(s.as_bytes()).unwrap();
    let value = |s: &str| HeaderValue::from_str(s).unwrap();
    out.insert(name("x-keygate-client-id"), value(p.client_id()));
    out.insert(name("x-keygate-key-id"), value(&p.key_id.to_string()));
    out.insert(
        name("x-keygate-permissions"),
        value(&p.permission_list().join(",")),
    );
    out.insert(name("x-keygate-license"), value(p.license()));
    out.insert(name("x-forwarded-for"), value(peer));
    out.insert(name("x-forwarded-proto"), value("http"));
    if let Some(host) = h.get(header::HOST) {
        out.insert(name("x-forwarded-host"), host.clone());
    }
    out.insert(header::HOST, value(upstream));
    out
}

fn header_rewriting(c: &mut Criterion) {
    let (_, p) = principal(0);
    let key = KeyFormat::new("kg_").generate().plaintext;
    let peer = HeaderValue::from_static("127.0.0.1");
    let upstream = HeaderValue::from_static("127.0.0.1:9000");
    let mut g = c.benchmark_group("header_rewrite");
    for (name, make) in [
        ("wrk", wrk_request as fn(&str) -> HeaderMap),
        ("browser", browser_request),
    ] {
        let base = make(key.expose());
        g.bench_function(format!("{name}_in_place"), |b| {
            b.iter_batched_ref(
                || base.clone(),
                |h| rewrite_in_place(h, &p, &peer, &upstream, true),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("{name}_in_place_growing"), |b| {
            b.iter_batched_ref(
                || base.clone(),
                |h| rewrite_in_place(h, &p, &peer, &upstream, false),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("{name}_rebuild"), |b| {
            b.iter_batched_ref(
                || base.clone(),
                |h| rewrite_rebuild(h, &p, "127.0.0.1", "127.0.0.1:9000"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The raw head of a request: wrk's, or a browser's with the same credential.
fn raw_head(key: &str, browser: bool) -> Vec<u8> {
    let mut h =
        format!("GET /v1/items?limit=10 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-API-Key: {key}\r\n");
    if browser {
        h.push_str(
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0\r\n\
             Accept: application/json, text/plain, */*\r\nAccept-Language: en-US,en;q=0.5\r\n\
             Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n\
             Cookie: session=abcdef0123456789; theme=dark\r\n\
             X-Request-Id: 5d2c7f2e-9a1b-4c1e-8f00-0123456789ab\r\n",
        );
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// Client head bytes → upstream head bytes, the fast path's way.
fn fast_path_head(
    raw: &[u8],
    p: &Principal,
    fields: &mut Vec<keygate::proxy::codec::head::Field>,
    out: &mut Vec<u8>,
) {
    let head = parse_fast(raw, fields);
    upstream_head(raw, &head, fields, p, out);
}

fn parse_fast(
    raw: &[u8],
    fields: &mut Vec<keygate::proxy::codec::head::Field>,
) -> keygate::proxy::codec::head::RequestHead {
    use keygate::proxy::codec::head::{Parsed, parse_request};
    let rules = keygate::proxy::policy::FieldRules::default();
    let Parsed::Complete(head) = parse_request(raw, &rules, 100, fields) else {
        panic!("not taken");
    };
    head
}

/// The upstream head of a parsed client head: the request line, the client's fields kept,
/// the gateway's own.
fn upstream_head(
    raw: &[u8],
    head: &keygate::proxy::codec::head::RequestHead,
    fields: &[keygate::proxy::codec::head::Field],
    p: &Principal,
    out: &mut Vec<u8>,
) {
    use keygate::proxy::codec::wire::{BodyOut, Upstream, request_head, spans};
    out.clear();
    request_head(
        out,
        spans(raw, fields),
        &Upstream {
            method: head.method.as_str().as_bytes(),
            target: head.target.get(raw),
            strip: Strip::API_KEY,
            identity: Some(&p.headers),
            assertion: None,
            xff: head.xff.map(|s| s.get(raw)),
            client_host: head.host.map(|s| s.get(raw)),
            peer_ip: b"127.0.0.1",
            proto: b"http",
            host: b"127.0.0.1:9000",
            body: head.content_length.map_or(BodyOut::None, BodyOut::Length),
        },
    );
}

/// Client head bytes → upstream head bytes the way the hyper path goes: parse, build a
/// `HeaderMap` (one `HeaderName` and one `HeaderValue` per field, as hyper does), rewrite it in
/// place, serialise it.
fn header_map_head(
    raw: &[u8],
    p: &Principal,
    peer: &HeaderValue,
    upstream: &HeaderValue,
    out: &mut Vec<u8>,
) {
    let raw = bytes::Bytes::copy_from_slice(raw);
    let mut hs = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut hs);
    let httparse::Status::Complete(_) = req.parse(&raw).unwrap() else {
        panic!("partial");
    };
    let mut h = HeaderMap::with_capacity(req.headers.len());
    for f in req.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes()).unwrap();
        let start = f.value.as_ptr() as usize - raw.as_ptr() as usize;
        let value =
            HeaderValue::from_maybe_shared(raw.slice(start..start + f.value.len())).unwrap();
        h.append(name, value);
    }
    let path = req.path.unwrap().to_owned();
    rewrite_in_place(&mut h, p, peer, upstream, true);
    out.clear();
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in &h {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn head_to_upstream(c: &mut Criterion) {
    let (_, p) = principal(0);
    let key = KeyFormat::new("kg_").generate().plaintext;
    let peer = HeaderValue::from_static("127.0.0.1");
    let upstream = HeaderValue::from_static("127.0.0.1:9000");
    let mut g = c.benchmark_group("head_to_upstream");
    for (name, browser) in [("wrk", false), ("browser", true)] {
        let raw = raw_head(key.expose(), browser);
        let mut fields = Vec::with_capacity(16);
        let mut out = Vec::with_capacity(4096);
        g.bench_function(format!("{name}_fast_path"), |b| {
            b.iter(|| fast_path_head(black_box(&raw), &p, &mut fields, &mut out))
        });
        // The write alone, the head parsed once.
        let head = parse_fast(&raw, &mut fields);
        g.bench_function(format!("{name}_fast_path_write"), |b| {
            b.iter(|| upstream_head(black_box(&raw), &head, &fields, &p, &mut out))
        });
        g.bench_function(format!("{name}_header_map"), |b| {
            b.iter(|| header_map_head(black_box(&raw), &p, &peer, &upstream, &mut out))
        });
    }
    g.finish();
}

/// The identity fields of a request going upstream: rendered once per principal and
/// appended with one copy, vs written field by field (name, `: `, value, CRLF) per request.
fn identity_fields(c: &mut Criterion) {
    use keygate::keys::IDENTITY_FIELDS;
    let (_, p) = principal(0);
    let h = &p.headers;
    let mut out = Vec::with_capacity(4096);
    let mut g = c.benchmark_group("identity_fields");
    g.bench_function("rendered_once", |b| {
        b.iter(|| {
            out.clear();
            black_box(h).write(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("field_by_field", |b| {
        b.iter(|| {
            out.clear();
            let h = black_box(h);
            for (i, name) in IDENTITY_FIELDS.iter().enumerate() {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value(i));
                out.extend_from_slice(b"\r\n");
            }
            black_box(out.len())
        })
    });
    g.finish();
}

/// The response head of the load tests' upstream (nginx, `return 200`) relayed to the client
/// the fast path's way: its fields, then the rate-limit fields and the framing.
fn relayed_response_head(c: &mut Criterion) {
    use keygate::limit::RateInfo;
    use keygate::proxy::codec::head::parse_response;
    use keygate::proxy::codec::wire::{Out, response_head};
    use keygate::proxy::policy::CachePolicy;
    let raw = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 22:00:00 GMT\r\n\
                Content-Type: application/octet-stream\r\nContent-Length: 3\r\n\
                Connection: keep-alive\r\n\r\n";
    let mut fields = Vec::new();
    let head = parse_response(raw, false, &mut fields).unwrap().unwrap();
    let rate = RateInfo {
        limit: 1000,
        remaining: 999,
        reset_secs: 1,
        credits: None,
        quota: None,
    };
    let cache = CachePolicy::new(&HeaderName::from_static("x-api-key"), true, true);
    let clock = Clock::real();
    let mut out = Vec::with_capacity(4096);
    c.bench_function("relayed_response_head", |b| {
        b.iter(|| {
            out.clear();
            response_head(
                &mut out,
                black_box(raw),
                &head,
                &fields,
                Some((&rate, &cache)),
                Out::AsIs,
                false,
                &clock,
                None,
            );
            black_box(out.len())
        })
    });
}

fn cors_fields(c: &mut Criterion) {
    use keygate::cors::{Allowed, Cors, OriginPattern, Settings};
    let cors = Cors::new(&Settings {
        origins: ["https://app.example.com", "https://*.example.org"]
            .iter()
            .map(|o| OriginPattern::parse(o).unwrap())
            .collect(),
        methods: Allowed::Any,
        headers: Allowed::Any,
        expose_headers: Vec::new(),
        max_age: 600,
        credentials: true,
    });
    let none: Option<&Cors> = None;
    let mut g = c.benchmark_group("cors_fields");
    for (name, origin) in [
        ("exact", "https://app.example.com"),
        ("wildcard", "https://a.b.example.org"),
        ("refused", "https://evil.example.net"),
    ] {
        let mut out = Vec::with_capacity(1024);
        g.bench_function(format!("{name}_head_bytes"), |b| {
            b.iter(|| {
                out.clear();
                let grant = cors.grant(Some(black_box(origin.as_bytes())));
                cors.write(&mut out, grant, origin.as_bytes());
                out.len()
            })
        });
        let value = HeaderValue::from_static(origin);
        g.bench_function(format!("{name}_header_map"), |b| {
            b.iter_batched_ref(
                HeaderMap::new,
                |h| {
                    let grant = cors.grant(Some(black_box(value.as_bytes())));
                    cors.replace(h, grant, Some(value.clone()));
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.bench_function("route_without_cors", |b| {
        b.iter(|| black_box(none).map(|c| c.grant(Some(b"https://app.example.com"))))
    });
    g.finish();
}

/// Size of the fast path's exchange state, allocated once per request since idle connections
/// keep no state beyond a few hundred bytes (`-Zprint-type-sizes` of a release build): 1,872
/// bytes since a store lookup and a retry's connect are boxed apart, the verify answer is
/// awaited past the routing's match, and the credential and the head are borrowed; 3,048 before.
const EXCHANGE_STATE: usize = 1872;
const EXCHANGE_STATE_BEFORE: usize = 3048;

/// What `Box::pin(exchange)` does per request: a block of the state's size allocated, the whole
/// state moved in (a future is copied at its full size, whatever of it is set), and freed.
fn boxed_state<const N: usize>() {
    let state = black_box(std::mem::MaybeUninit::<[u8; N]>::uninit());
    drop(black_box(Box::new(state)));
}

fn connection_buffers(c: &mut Criterion) {
    use keygate::proxy::h1::spare;
    let mut g = c.benchmark_group("connection_buffers");
    // Warm the spares as a loaded server has them.
    spare::give_read(spare::take_read());
    spare::give_work(spare::take_work());
    // The read buffer, and the output buffer with the two field lists (the request head's,
    // the upstream response's).
    g.bench_function("spares_take_and_give_back", |b| {
        b.iter(|| {
            let r = black_box(spare::take_read());
            let w = black_box(spare::take_work());
            spare::give_read(r);
            spare::give_work(w);
        })
    });
    g.bench_function("allocated_and_freed", |b| {
        b.iter(|| {
            let r: Vec<u8> = black_box(vec![0; 8 * 1024]);
            let o: Vec<u8> = black_box(Vec::with_capacity(4096));
            drop((r, o));
        })
    });
    g.bench_function("exchange_state_boxed", |b| {
        b.iter(boxed_state::<EXCHANGE_STATE>)
    });
    g.bench_function("exchange_state_boxed_before", |b| {
        b.iter(boxed_state::<EXCHANGE_STATE_BEFORE>)
    });
    g.finish();
}

/// `n` awaits of `op()` on a current-thread runtime, timed inside it.
fn awaited<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    n: u64,
    mut op: impl FnMut() -> F,
) -> Duration {
    rt.block_on(async {
        let started = std::time::Instant::now();
        for _ in 0..n {
            black_box(op().await);
        }
        started.elapsed()
    })
}

fn timeouts(c: &mut Criterion) {
    use keygate::proxy::deadline;
    const LIMIT: Duration = Duration::from_secs(30);
    let rt = common::runtime();
    let mut g = c.benchmark_group("timeouts");
    // An operation that finishes on its first poll (a write with room, a read with bytes).
    g.bench_function("ready_tokio_timeout", |b| {
        b.iter_custom(|n| {
            awaited(&rt, n, || {
                tokio::time::timeout(LIMIT, std::future::ready(1u8))
            })
        })
    });
    g.bench_function("ready_within", |b| {
        b.iter_custom(|n| awaited(&rt, n, || deadline::within(LIMIT, std::future::ready(1u8))))
    });
    // The timer of an operation that waits (a read before its bytes arrive): a new timer
    // armed (registered in the wheel on its first poll) and dropped (taken out) per wait, vs the
    // connection's one timer, its deadline moved later and polled.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    g.bench_function("waiting_timer_per_wait", |b| {
        let _rt = rt.enter();
        b.iter(|| {
            let mut sleep = std::pin::pin!(tokio::time::sleep(LIMIT));
            black_box(sleep.as_mut().poll(&mut cx).is_pending());
        })
    });
    g.bench_function("waiting_one_timer_moved", |b| {
        let _rt = rt.enter();
        let mut timer = std::pin::pin!(deadline::timer());
        b.iter(|| {
            timer.as_mut().reset(tokio::time::Instant::now() + LIMIT);
            black_box(timer.as_mut().poll(&mut cx).is_pending());
        })
    });
    // A wait on the connection's timer as `deadline::on_timer` makes it: the operation pending
    // on its first poll, done on the next (its bytes arrived), each wait's deadline later than
    // the one before (a keep-alive connection's next request head).
    g.bench_function("wait_on_connection_timer", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let mut timer = std::pin::pin!(deadline::timer());
                let started = std::time::Instant::now();
                for _ in 0..n {
                    let waited = deadline::on_timer(
                        timer.as_mut(),
                        || tokio::time::Instant::now() + LIMIT,
                        PendingOnce(false),
                    );
                    black_box(waited.await.is_ok());
                }
                started.elapsed()
            })
        })
    });
    g.finish();
}

/// An idle connection's look for the listener's drain, once per request whose next head has
/// not arrived: a `changed()` made, polled (its waiter registered with the channel) and
/// dropped (taken out again) per wait, vs the connection's one [`DrainWait`], registered on its
/// first poll and only looking at the channel's version after that.
fn drain_waits(c: &mut Criterion) {
    use keygate::proxy::drain::{self, DrainWait};
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut g = c.benchmark_group("drain_wait");
    g.bench_function("changed_per_wait", |b| {
        let mut rx = rx.clone();
        b.iter(|| {
            let mut changed = std::pin::pin!(rx.changed());
            black_box(changed.as_mut().poll(&mut cx).is_pending());
        })
    });
    g.bench_function("registered_once", |b| {
        let changed = std::pin::pin!(drain::changed(&rx));
        let mut wait = DrainWait::new(changed);
        b.iter(|| black_box(wait.poll(&mut cx, &rx).is_pending()))
    });
    g.finish();
}

/// Pending on its first poll (waking itself), ready on the next.
struct PendingOnce(bool);

impl Future for PendingOnce {
    type Output = u8;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<u8> {
        if self.0 {
            return std::task::Poll::Ready(1);
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

criterion_group! {
    name = structures;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = moka_hashers, limiters, number_headers, header_rewriting, head_to_upstream, identity_fields,
        relayed_response_head, cors_fields,
        connection_buffers, timeouts, drain_waits
}
criterion_main!(structures);
