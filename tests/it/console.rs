//! `/console` as served: a strict Content-Security-Policy on every file, nothing from
//! another origin, no HTML built from strings, the key kept out of every browser storage.
//! (The console's behaviour is tested in a real browser: scripts/browser-test.sh.)

use crate::support::Gateway;

#[tokio::test]
async fn console_files_carry_a_strict_policy_and_load_nothing_from_elsewhere() {
    let gw = Gateway::start().await;
    let mut texts = Vec::new();
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.css", "text/css"),
        ("/console/console.js", "text/javascript"),
    ] {
        let r = gw.admin_as("GET", path, None, &[]).await;
        assert_eq!(r.status, 200, "{path}");
        let h = |n: &str| r.headers[n].to_str().unwrap().to_owned();
        assert!(h("content-type").starts_with(kind));
        let csp = h("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(h("x-content-type-options"), "nosniff");
        assert_eq!(h("cache-control"), "no-store");
        texts.push(String::from_utf8(r.body.to_vec()).unwrap());
    }
    let all = texts.join("\n");
    // Only the SVG namespace name looks like a URL; nothing is fetched from another origin.
    let urls: Vec<&str> = all
        .match_indices("http")
        .map(|(i, _)| &all[i..(i + 30).min(all.len())])
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .collect();
    assert!(
        urls.iter()
            .all(|u| u.starts_with("http://www.w3.org/2000/svg")),
        "{urls:?}"
    );
    for banned in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "localStorage",
        "sessionStorage",
        "document.cookie",
        "<script>",
        " style=",
        " onclick",
    ] {
        assert!(!all.contains(banned), "{banned} in the console");
    }
}
