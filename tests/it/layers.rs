//! The layering of `src/`, read from the code's own `use crate::…`, `use super::…` and
//! `crate::…` paths: no import circles between modules, and no edge the architecture forbids
//! (README "Architecture"). Test modules (`#[cfg(test)]`) are left out: they may reach for
//! fixtures anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// (from, to): `from` and its submodules never import `to` or its submodules.
const FORBIDDEN: &[(&str, &str)] = &[
    ("keys", "proxy"),
    ("keys", "admin"),
    ("keys", "auth"),
    ("keys", "limit"),
    ("keys", "config"),
    ("keys", "route"),
    ("keys", "server"),
    ("clock", "keys"),
    ("limit", "proxy"),
    ("limit", "admin"),
    ("limit", "auth"),
    ("limit", "config"),
    ("paths", "config"),
    ("paths", "route"),
    ("cors", "proxy"),
    ("cors", "config"),
    ("cors", "admin"),
    ("route", "proxy"),
    ("route", "auth"),
    ("route", "admin"),
    ("auth", "proxy"),
    ("auth", "admin"),
    ("auth", "server"),
    ("config", "proxy"),
    ("config", "admin"),
    ("config", "server"),
    ("config", "auth"),
    ("proxy", "admin"),
    ("admin", "proxy"),
    ("admin", "server"),
    ("telemetry", "proxy"),
    ("telemetry", "admin"),
    ("telemetry", "keys"),
    ("telemetry", "config"),
    ("telemetry", "auth"),
    // The command line is an admin-API client: no store, no data plane, no server internals.
    ("cli", "admin"),
    ("cli", "proxy"),
    ("cli", "server"),
    ("cli", "auth"),
    ("cli", "limit"),
];

/// Modules with no crate imports at all.
const LEAVES: &[&str] = &["clock", "paths"];

/// Modules that may not use the `http` crate.
const NO_HTTP: &[&str] = &["keys", "clock", "limit", "paths"];

type Module = Vec<String>;

/// `src/a/b.rs` → `a::b`; `src/lib.rs` → the crate root (empty).
fn module_of(rel: &Path) -> Option<Module> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    match stem {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => return None,
        "mod" => {}
        s => parts.push(s.to_owned()),
    }
    Some(parts)
}

/// The code of a file without its test module and comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or("").trim().to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                prefix.to_owned()
            } else {
                format!("{prefix}::{p}")
            }
        })
        .collect()
}

/// Every crate path a file names, resolved to absolute segments.
fn paths(module: &Module, code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    // `use` declarations (groups expanded), then inline `crate::` paths.
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        for p in expand(&rest[..end]) {
            found.push(p);
        }
    }
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            found.push(rest[..end].trim_end_matches(':').to_owned());
        }
        rest = &rest[end.max(1)..];
    }
    found
        .into_iter()
        .filter_map(|p| {
            let segs: Vec<&str> = p.split("::").map(str::trim).collect();
            let mut abs: Vec<String> = match segs.first().copied() {
                Some("crate") => Vec::new(),
                Some("super") => {
                    let mut m = module.clone();
                    m.pop()?;
                    m
                }
                Some("self") => module.clone(),
                _ => return None,
            };
            let mut segs = segs.into_iter().skip(1).peekable();
            while segs.peek() == Some(&"super") {
                abs.pop()?;
                segs.next();
            }
            abs.extend(segs.map(str::to_owned));
            Some(abs)
        })
        .collect()
}

/// The module graph of a tree of files (relative path → text): edges between modules that are
/// not ancestor and descendant of each other.
fn graph(files: &BTreeMap<String, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules: BTreeMap<Module, &String> = files
        .iter()
        .filter_map(|(rel, text)| Some((module_of(Path::new(rel))?, text)))
        .collect();
    let known: BTreeSet<&Module> = modules.keys().collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, text) in &modules {
        edges.entry(m.clone()).or_default();
        for p in paths(m, &code(text)) {
            // The deepest known module the path names.
            let target = (0..=p.len())
                .rev()
                .map(|n| p[..n].to_vec())
                .find(|t| known.contains(t))
                .unwrap_or_default();
            let related = target.starts_with(m) || m.starts_with(&target);
            if !related {
                edges.entry(m.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// One circle of `edges`, if any.
fn circle<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        n: &N,
        edges: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, u8>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for next in edges.get(n).into_iter().flatten() {
            match state.get(next).copied() {
                Some(1) => {
                    let at = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(next.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if !state.contains_key(n)
            && let Some(c) = visit(n, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// Every rule the tree breaks, as sentences.
fn problems(files: &BTreeMap<String, String>) -> Vec<String> {
    let edges = graph(files);
    let mut out = Vec::new();
    if let Some(c) = circle(&edges) {
        let names: Vec<String> = c.iter().map(name).collect();
        out.push(format!("import circle: {}", names.join(" -> ")));
    }
    // The same at the level of top-level modules.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &edges {
        let Some(f) = from.first() else { continue };
        for to in tos {
            if let Some(t) = to.first()
                && t != f
            {
                top.entry(f.clone()).or_default().insert(t.clone());
            }
        }
    }
    if let Some(c) = circle(&top) {
        out.push(format!("import circle between modules: {}", c.join(" -> ")));
    }
    for (from, tos) in &edges {
        for to in tos {
            let (f, t) = (from.first(), to.first());
            if FORBIDDEN
                .iter()
                .any(|(a, b)| f.is_some_and(|f| f == a) && t.is_some_and(|t| t == b))
            {
                out.push(format!("forbidden edge: {} -> {}", name(from), name(to)));
            }
            if f.is_some_and(|f| LEAVES.contains(&f.as_str())) {
                out.push(format!(
                    "leaf module imports: {} -> {}",
                    name(from),
                    name(to)
                ));
            }
        }
    }
    for (rel, text) in files {
        let Some(m) = module_of(Path::new(rel)) else {
            continue;
        };
        let code = code(text);
        if m.first().is_some_and(|f| NO_HTTP.contains(&f.as_str())) && names_crate(&code, "http") {
            out.push(format!("{} uses the http crate", name(&m)));
        }
    }
    out
}

/// True when `code` names the external crate `krate` (`krate::…` not inside a longer path).
fn names_crate(code: &str, krate: &str) -> bool {
    let needle = format!("{krate}::");
    code.match_indices(&needle).any(|(i, _)| {
        let before = code[..i].chars().last();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

fn src_tree() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    files
}

#[test]
fn the_source_tree_keeps_its_layers() {
    let files = src_tree();
    assert!(files.len() > 20, "read {} files", files.len());
    let edges = graph(&files);
    // The graph is really read: known edges are there.
    let has = |a: &str, b: &str| {
        edges
            .get(&a.split("::").map(str::to_owned).collect::<Vec<_>>())
            .is_some_and(|t| t.iter().any(|m| name(m) == b))
    };
    assert!(has("proxy::h1", "proxy::policy"), "{edges:?}");
    assert!(has("auth", "keys"));
    let problems = problems(&files);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn tree(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

#[test]
fn a_forbidden_edge_or_circle_is_caught() {
    let ok = tree(&[
        ("lib.rs", "pub mod keys; pub mod proxy;"),
        ("keys.rs", "use crate::clock::Millis;"),
        ("clock.rs", ""),
        (
            "proxy.rs",
            "use crate::keys::{self, Principal};\nuse super::keys;",
        ),
    ]);
    assert_eq!(problems(&ok), Vec::<String>::new());

    let back = tree(&[
        (
            "keys.rs",
            "fn f() { let _ = crate::proxy::Gateway::new(); }",
        ),
        ("proxy.rs", "use crate::keys::Principal;"),
    ]);
    let p = problems(&back);
    assert!(
        p.iter()
            .any(|l| l.contains("forbidden edge: keys -> proxy")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.contains("import circle")), "{p:?}");

    let siblings = tree(&[
        ("proxy.rs", "pub mod h1; pub mod hyper;"),
        ("proxy/h1.rs", "use super::hyper::Body;"),
        (
            "proxy/hyper.rs",
            "use crate::proxy::{h1::{self, Head}, Gateway};",
        ),
    ]);
    let p = problems(&siblings);
    assert!(
        p.iter()
            .any(|l| l.contains("proxy::h1") && l.contains("proxy::hyper")),
        "{p:?}"
    );

    let http = tree(&[("keys.rs", "use http::HeaderValue;")]);
    assert!(
        problems(&http)
            .iter()
            .any(|l| l.contains("keys uses the http crate"))
    );

    // Test modules may import anything.
    let tests = tree(&[(
        "keys.rs",
        "#[cfg(test)]\nmod tests { use crate::proxy::X; }",
    )]);
    assert!(problems(&tests).is_empty());
}
