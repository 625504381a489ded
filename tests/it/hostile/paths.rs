//! Path spellings against every protected route prefix, sent raw (no client normalises
//! them), judged against a deliberately lenient reading of the path — what an upstream that
//! decodes repeatedly, maps `\` and look-alike characters, strips `;` parameters, trims
//! trailing dots and spaces, drops dot-segments and ignores case would serve.
//!
//! Rule per request: never a 5xx; a 200 was forwarded byte for byte (the upstream's target is
//! the request's path and query, with no fragment and no scheme or authority); a caller lacking
//! a route's permission (or any key) never gets a 200 for a path that reads as inside that
//! route; a caller holding every permission is always forwarded by the route its path reads
//! as; no key gets a 200 outside the public route.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::harness::{self, Recorder};

/// (configured path, upstream label, permission)
const PROTECTED: [(&str, &str, &str); 3] = [
    ("/admin", "admin", "ADMIN"),
    ("/v1/extract", "extract", "DATA_EXTRACTION"),
    ("/internal/reports", "reports", "REPORTS"),
];

/// `p` with its last `/` replaced by `sep`.
fn last_sep(p: &str, sep: &str) -> String {
    let i = p.rfind('/').unwrap();
    format!("{}{sep}{}", &p[..i], &p[i + 1..])
}

/// `p` with the first letter of its last segment percent-encoded.
fn encode_letter(p: &str, upper_hex: bool) -> String {
    let i = p.rfind('/').unwrap() + 1;
    let c = p.as_bytes()[i];
    let enc = if upper_hex {
        format!("%{c:02X}")
    } else {
        format!("%{c:02x}")
    };
    format!("{}{enc}{}", &p[..i], &p[i + 1..])
}

type Spelling = (&'static str, fn(&str) -> Vec<u8>);

fn spellings() -> Vec<Spelling> {
    vec![
        ("exact", |p| p.into()),
        ("trailing slash", |p| format!("{p}/").into()),
        ("sub-path", |p| format!("{p}/x").into()),
        ("query", |p| format!("{p}?x=/../y").into()),
        ("double slash", |p| format!("/{p}").into()),
        ("dot segment", |p| format!("/.{p}").into()),
        ("dot-dot", |p| format!("/x/..{p}").into()),
        ("encoded dot-dot", |p| format!("/x/%2e%2e{p}").into()),
        ("mixed encoded dot", |p| format!("/x/.%2E{p}").into()),
        ("encoded slash inside", |p| last_sep(p, "%2f").into()),
        ("encoded slash after", |p| format!("{p}%2F").into()),
        ("backslash", |p| format!("/x\\..\\{}", &p[1..]).into()),
        ("encoded backslash", |p| {
            format!("/x%5c..%5c{}", &p[1..]).into()
        }),
        ("double-encoded dot-dot", |p| {
            format!("/x/%252e%252e{p}").into()
        }),
        ("double-encoded slash", |p| last_sep(p, "%252f").into()),
        ("double-encoded letter", |p| {
            let e = encode_letter(p, false);
            e.replacen('%', "%25", 1).into()
        }),
        ("semicolon", |p| format!("{p};x").into()),
        ("semicolon segment", |p| {
            format!("{p};jsessionid=1/x").into()
        }),
        ("upper case", |p| p.to_ascii_uppercase().into()),
        ("trailing dot", |p| format!("{p}.").into()),
        ("trailing dot segment", |p| format!("{p}/.").into()),
        ("encoded NUL", |p| format!("{p}%00").into()),
        ("raw NUL", |p| format!("{p}\0").into()),
        ("encoded tab", |p| format!("{p}%09").into()),
        ("trailing %20", |p| format!("{p}%20").into()),
        ("%20 segment", |p| format!("{p}%20/x").into()),
        ("fragment", |p| format!("{p}#x").into()),
        ("fragment hiding dot-dot", |p| format!("/x#/..{p}").into()),
        ("absolute-form", |p| {
            format!("http://other.example{p}").into()
        }),
        ("absolute-form double slash", |p| {
            format!("http://other.example/{p}").into()
        }),
        ("encoded letter", |p| encode_letter(p, false).into()),
        ("encoded letter, upper hex", |p| {
            encode_letter(p, true).to_ascii_uppercase().into()
        }),
        ("overlong UTF-8 dots", |p| {
            format!("/x/%c0%ae%c0%ae{p}").into()
        }),
        ("overlong UTF-8 slash", |p| last_sep(p, "%c0%af").into()),
        ("full-width dots", |p| {
            format!("/x/%ef%bc%8e%ef%bc%8e{p}").into()
        }),
        ("full-width solidus", |p| last_sep(p, "%ef%bc%8f").into()),
        ("raw full-width dots", |p| {
            let mut v = b"/x/\xef\xbc\x8e\xef\xbc\x8e".to_vec();
            v.extend_from_slice(p.as_bytes());
            v
        }),
        ("raw overlong UTF-8 dots", |p| {
            let mut v = b"/x/\xc0\xae\xc0\xae".to_vec();
            v.extend_from_slice(p.as_bytes());
            v
        }),
        ("one-dot leader", |p| format!("{p}%e2%80%a4").into()),
        ("two-dot leader segment", |p| {
            format!("/x/%e2%80%a5{p}").into()
        }),
    ]
}

fn pct_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (hex(b[i + 1]), b.get(i + 2).copied().and_then(hex))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn replace_seq(v: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

/// The path a lenient upstream would serve for a raw request target.
fn lenient_reading(target: &[u8]) -> String {
    let mut t = target;
    if let Some(i) = t.windows(3).position(|w| w == b"://") {
        let rest = &t[i + 3..];
        t = &rest[rest.iter().position(|&b| b == b'/').unwrap_or(rest.len())..];
    }
    let end = t
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(t.len());
    let mut b = t[..end].to_vec();
    for _ in 0..3 {
        b = pct_decode(&b);
    }
    if let Some(i) = b.iter().position(|&c| c == 0) {
        b.truncate(i);
    }
    for (from, to) in [
        (&[0xc0, 0xae][..], &b"."[..]),
        (&[0xc0, 0xaf], b"/"),
        (&[0xc1, 0x9c], b"\\"),
        (&[0xe0, 0x80, 0xae], b"."),
    ] {
        b = replace_seq(&b, from, to);
    }
    let s: String = String::from_utf8_lossy(&b)
        .chars()
        .flat_map(|c| match c {
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' => ".".chars().collect::<Vec<_>>(),
            '\u{2025}' => "..".chars().collect(),
            '\u{FF0F}' | '\\' | '\u{FF3C}' | '\u{FE68}' => "/".chars().collect(),
            '\u{FF1B}' => ";".chars().collect(),
            c => vec![c],
        })
        .collect();
    let mut stack: Vec<String> = Vec::new();
    for seg in s.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        let seg = if seg == "." || seg == ".." {
            seg
        } else {
            seg.trim_end_matches(['.', ' ', '\t'])
        };
        match seg {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s.to_lowercase()),
        }
    }
    format!("/{}", stack.join("/"))
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// What the upstream must see for a request target: path and query, no fragment, origin-form.
fn forwarded_form(target: &[u8]) -> Vec<u8> {
    let mut t = target;
    if let Some(i) = t.windows(3).position(|w| w == b"://") {
        let rest = &t[i + 3..];
        t = &rest[rest.iter().position(|&b| b == b'/').unwrap_or(rest.len())..];
    }
    let end = t.iter().position(|&b| b == b'#').unwrap_or(t.len());
    t[..end].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_is_refused_or_forwarded_as_checked() {
    let rec = Recorder::default();
    let mut routes = String::new();
    let root = harness::raw_upstream(&rec, "root").await;
    for (path, label, perm) in PROTECTED {
        let up = harness::raw_upstream(&rec, label).await;
        routes.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nupstream = \"http://{up}\"\npermissions = [\"{perm}\"]\n"
        ));
    }
    let public = harness::raw_upstream(&rec, "public").await;
    routes.push_str(&format!(
        "[[routes]]\npath = \"/public\"\nupstream = \"http://{public}\"\nauth = \"none\"\n[[routes]]\npath = \"/\"\nupstream = \"http://{root}\"\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let text = harness::config(&format!("http://{root}"), dir.path(), &routes);
    let mut gw = harness::keygate(&text, dir.path()).spawn();
    let (weak, _) = harness::make_key(gw.admin, "paths", &[]).await;
    let perms: Vec<&str> = PROTECTED.iter().map(|p| p.2).collect();
    let (strong, _) = harness::make_key(gw.admin, "paths", &perms).await;

    // (probe id, spelling, prefix, credential name, raw target)
    let mut probes: Vec<(usize, &str, &str, &str, Vec<u8>)> = Vec::new();
    let spellings = spellings();
    for (name, f) in &spellings {
        for (prefix, _, _) in PROTECTED {
            for cred in ["none", "weak", "strong"] {
                probes.push((probes.len(), name, prefix, cred, f(prefix)));
            }
        }
    }
    let probes = Arc::new(probes);
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..probes.len() {
        let (probes, sem) = (Arc::clone(&probes), Arc::clone(&sem));
        let auth = match probes[i].3 {
            "weak" => format!("Authorization: Bearer {weak}\r\n"),
            "strong" => format!("Authorization: Bearer {strong}\r\n"),
            _ => String::new(),
        };
        let proxy = gw.proxy;
        tasks.push(tokio::spawn(async move {
            let _slot = sem.acquire().await.unwrap();
            let (id, _, _, _, target) = &probes[i];
            let bytes = [
                b"GET ".as_slice(),
                target,
                format!(
                    " HTTP/1.1\r\nHost: gw\r\nX-Probe: {id}\r\n{auth}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            ]
            .concat();
            harness::exchange(
                proxy,
                &[&bytes],
                Duration::ZERO,
                Duration::from_secs(2),
                Duration::from_secs(5),
            )
            .await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = rec.seen();

    let mut failures = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut bypasses = 0;
    for ((id, spelling, prefix, cred, target), ans) in probes.iter().zip(&answers) {
        let status = ans.finals().first().copied().unwrap_or(0);
        *outcomes.entry(status.to_string()).or_default() += 1;
        let shown = String::from_utf8_lossy(target).escape_debug().to_string();
        let fwd: Vec<_> = seen
            .iter()
            .filter(|s| s.header("x-probe") == Some(id.to_string().as_bytes()))
            .collect();
        let reading = lenient_reading(target);
        let mut bad = Vec::new();
        if status == 0 || status >= 500 {
            bad.push(format!("answer {:?}", ans.statuses));
        }
        if status == 200 {
            match fwd.as_slice() {
                [one] => {
                    if one.target != forwarded_form(target) {
                        bad.push(format!("forwarded as {:?}", one.target_str()));
                    }
                    let readers: Vec<_> = PROTECTED
                        .iter()
                        .filter(|(p, _, _)| under(&reading, p))
                        .collect();
                    match *cred {
                        "none" if one.label != "public" => {
                            bypasses += 1;
                            bad.push(format!("no key, forwarded by {}", one.label));
                        }
                        "weak" if !readers.is_empty() => {
                            bypasses += 1;
                            bad.push(format!(
                                "permission bypass: reads as {reading}, forwarded by {}",
                                one.label
                            ));
                        }
                        "strong" if readers.iter().any(|(_, l, _)| *l != one.label) => {
                            bad.push(format!("reads as {reading} but routed to {}", one.label));
                        }
                        _ => {}
                    }
                }
                other => bad.push(format!("200 with {} upstream requests", other.len())),
            }
        } else if !fwd.is_empty() {
            bad.push(format!("answered {status} but the upstream saw it"));
        }
        if !bad.is_empty() {
            failures.push(format!(
                "{spelling} {prefix} [{cred}] {shown:?}: {}",
                bad.join("; ")
            ));
        }
    }
    // Controls: the exact prefix is enforced and served.
    for ((_, spelling, prefix, cred, _), ans) in probes.iter().zip(&answers) {
        if *spelling == "exact" {
            let want = match *cred {
                "none" => 401,
                "weak" => 403,
                _ => 200,
            };
            if ans.finals().first() != Some(&want) {
                failures.push(format!("control {prefix} [{cred}]: {:?}", ans.statuses));
            }
        }
    }

    let alive = gw.alive();
    let text = format!(
        "spellings: {} × protected prefixes: {} × credentials (none, key without the permission, key with all): 3 = {} requests\n\
         answers: {outcomes:?}\n\
         permission or authentication bypasses: {bypasses}\n\
         failures: {}\n",
        spellings.len(),
        PROTECTED.len(),
        probes.len(),
        failures.len(),
    );
    harness::report("paths", &text);
    for f in &failures {
        eprintln!("FAIL {f}");
    }
    assert!(alive && gw.panics().is_empty(), "keygate crashed");
    assert!(spellings.len() >= 25);
    assert!(failures.is_empty(), "{} failures", failures.len());
}
