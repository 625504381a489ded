//! The OpenAPI document: valid 3.1 structure, every documented operation is served, and every
//! route is registered through the documented router.

use std::collections::HashSet;

use serde_json::Value;

use crate::support::Gateway;

fn resolve<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    let path = r.strip_prefix("#/")?;
    path.split('/').try_fold(doc, |v, seg| v.get(seg))
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_valid_and_covers_every_route() {
    let gw = Gateway::start().await;
    let r = gw.admin_as("GET", "/openapi.json", None, &[]).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string());

    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for r in &refs {
        assert!(resolve(&doc, r).is_some(), "dangling $ref {r}");
    }

    let expected: HashSet<(&str, &str)> = [
        ("post", "/v1/api-keys"),
        ("get", "/v1/api-keys"),
        ("get", "/v1/api-keys/{id}"),
        ("patch", "/v1/api-keys/{id}"),
        ("delete", "/v1/api-keys/{id}"),
        ("post", "/v1/api-keys/{id}/rotate"),
        ("get", "/v1/api-keys/{id}/usage"),
        ("get", "/metrics"),
        ("post", "/v1/clients"),
        ("get", "/v1/clients"),
        ("get", "/v1/clients/{client_id}"),
        ("patch", "/v1/clients/{client_id}"),
        ("delete", "/v1/clients/{client_id}"),
        ("post", "/auth/create_client"),
        ("get", "/auth/list_clients"),
        ("post", "/auth/revoke_client_key"),
        ("post", "/auth/create_client_key"),
        ("delete", "/auth/delete_client"),
        ("post", "/auth/login"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/openapi.json"),
        ("post", "/v1/api-keys/import"),
        ("get", "/v1/config"),
        ("get", "/console"),
        ("get", "/console/console.css"),
        ("get", "/console/console.js"),
    ]
    .into_iter()
    .collect();

    let mut documented = HashSet::new();
    let mut op_ids = HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}: no responses"
            );
            if let Some(id) = op["operationId"].as_str() {
                assert!(op_ids.insert(id.to_owned()), "duplicate operationId {id}");
            }
            documented.insert((method.clone(), path.clone()));

            // Every documented operation is served: not the router's fallback (404 with
            // "no such admin endpoint") and not 405.
            let concrete = path
                .replace("{id}", "00000000-0000-7000-8000-000000000000")
                .replace("{client_id}", "nobody");
            let r = gw
                .admin(
                    &method.to_uppercase(),
                    &concrete,
                    Some(serde_json::json!({})),
                )
                .await;
            assert_ne!(r.status, 405, "{method} {path}");
            assert!(
                !String::from_utf8_lossy(&r.body).contains("no such admin endpoint"),
                "{method} {path} is documented but not served"
            );
        }
    }
    for (m, p) in &expected {
        assert!(
            documented.contains(&(m.to_string(), p.to_string())),
            "{m} {p} not documented"
        );
    }
    assert_eq!(
        documented.len(),
        expected.len(),
        "undocumented extras: {documented:?}"
    );

    // The secret-bearing field exists only on the answers that create a key.
    let key_view = &doc["components"]["schemas"]["KeyView"]["properties"];
    assert!(key_view.get("key").is_some());
}

/// Routes registered with plain `.route(...)` would be served without an operation in the
/// document; every admin route must go through `routes!`.
#[test]
fn every_admin_route_goes_through_the_documented_router() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/admin");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.push(concat!(env!("CARGO_MANIFEST_DIR"), "/src/admin.rs").into());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for needle in [".route(", ".nest(", ".route_service("] {
            assert!(!text.contains(needle), "{} uses {needle}", f.display());
        }
    }
}
