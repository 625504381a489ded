//! The OpenAPI document: valid 3.1 structure, every documented operation is served, and every
//! route is registered through the documented router.

use std::collections::HashSet;

use serde_json::{Value, json};

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
        ("post", "/v1/identity/rotate"),
        ("get", "/.well-known/jwks.json"),
        ("post", "/v1/webhooks"),
        ("get", "/v1/webhooks"),
        ("get", "/v1/webhooks/{id}"),
        ("patch", "/v1/webhooks/{id}"),
        ("delete", "/v1/webhooks/{id}"),
        ("get", "/v1/webhooks/{id}/deliveries"),
        ("post", "/v1/webhooks/{id}/rotate"),
        ("post", "/v1/api-keys/{id}/credits"),
        ("get", "/v1/clients/{client_id}/usage"),
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

/// The document as served by a gateway with one more plan than the harness's own.
async fn served_document() -> Value {
    let gw = Gateway::start_with("[plans.enterprise]\n").await;
    let r = gw.admin_as("GET", "/openapi.json", None, &[]).await;
    assert_eq!(r.status, 200);
    r.json()
}

/// `admin::webhooks::URL_PATTERN`, as the document must state it.
const WEBHOOK_URL_PATTERN: &str = "^https?://[A-Za-z0-9.-]+(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?(/([A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$";

/// Follows `$ref`s (to components) until a schema that is not a reference.
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        v = resolve(doc, r).unwrap_or_else(|| panic!("dangling {r}"));
    }
    v
}

fn has_type(schema: &Value, t: &str) -> bool {
    match &schema["type"] {
        Value::String(s) => s == t,
        Value::Array(ts) => ts.iter().any(|x| x == t),
        _ => false,
    }
}

/// Each rule a handler enforces, at the place in the document that must state it. A rule
/// dropped from the document (or changed without changing this list) fails here.
#[tokio::test]
async fn every_rule_the_handlers_enforce_is_stated_in_the_document() {
    let doc = served_document().await;
    let s = &doc["components"]["schemas"];
    let prop = |schema: &str, field: &str| -> &Value {
        let p = &s[schema]["properties"][field];
        assert!(!p.is_null(), "{schema}.{field} is not documented");
        p
    };
    let client_id_pattern = json!(keygate::keys::CLIENT_ID_PATTERN);
    let name_pattern = json!("^[^\\u0000-\\u001F\\u007F-\\u009F]*$");

    // Bodies that refuse unknown fields say so; the Kixote bodies and login accept extras.
    for body in [
        "CreateKey",
        "UpdateKey",
        "RotateKey",
        "RotateWebhookSecret",
        "CreateClient",
        "UpdateClient",
        "RateLimit",
    ] {
        assert_eq!(s[body]["additionalProperties"], json!(false), "{body}");
    }
    for body in ["KxCreateClient", "KxClientRef", "LoginRequest"] {
        assert_ne!(s[body]["additionalProperties"], json!(false), "{body}");
    }

    // POST /v1/api-keys
    let required = s["CreateKey"]["required"].as_array().unwrap();
    assert!(required.contains(&json!("name")) && required.contains(&json!("client_id")));
    for body in ["CreateKey", "UpdateKey"] {
        let name = prop(body, "name");
        assert_eq!(name["minLength"], 1, "{body}.name");
        assert_eq!(name["maxLength"], 100, "{body}.name");
        assert_eq!(name["pattern"], name_pattern, "{body}.name");
        for field in ["permissions", "roles"] {
            let p = prop(body, field);
            assert_eq!(p["maxItems"], 100, "{body}.{field}");
            let item = deref(&doc, &p["items"]);
            assert_eq!(item["minLength"], 1);
            assert_eq!(item["maxLength"], 100);
            assert_eq!(item["pattern"], json!("^[\\x21-\\x2B\\x2D-\\x7E]+$"));
        }
        assert_eq!(prop(body, "expires_at")["format"], "date-time", "{body}");
        assert_eq!(
            s[body]["dependentSchemas"]["roles"],
            json!({"not": {"required": ["permissions"]}}),
            "{body}: roles and permissions together"
        );
    }
    assert_eq!(prop("CreateKey", "client_id")["pattern"], client_id_pattern);
    assert_eq!(prop("CreateKey", "client_id")["type"], "string");
    assert_eq!(prop("CreateKey", "name")["type"], "string");
    let days = prop("CreateKey", "expires_days");
    assert_eq!(
        (&days["minimum"], &days["maximum"]),
        (&json!(1), &json!(36500))
    );
    assert_eq!(
        prop("CreateKey", "never_expire")["not"],
        json!({"const": false})
    );
    let dependent = &s["CreateKey"]["dependentSchemas"];
    for field in ["expires_at", "expires_days", "never_expire"] {
        assert!(
            dependent[field]["anyOf"].is_array(),
            "at most one way to set an expiry: {field}"
        );
    }

    // Rate limits: exactly one rate (maxProperties with burst required), each at least 1.
    let limit = &s["RateLimit"];
    assert_eq!(limit["required"], json!(["burst"]));
    assert_eq!(
        (&limit["minProperties"], &limit["maxProperties"]),
        (&json!(2), &json!(2))
    );
    for rate in ["per_second", "per_minute", "per_hour", "burst"] {
        assert_eq!(limit["properties"][rate]["minimum"], 1, "{rate}");
        assert_eq!(limit["properties"][rate]["maximum"], u32::MAX, "{rate}");
        assert_eq!(
            limit["properties"][rate]["type"], "integer",
            "{rate}: never null"
        );
    }

    // Rotation grace periods (keys and webhook secrets).
    for body in ["RotateKey", "RotateWebhookSecret"] {
        let grace = prop(body, "grace_period_seconds");
        assert_eq!(
            (&grace["minimum"], &grace["maximum"]),
            (&json!(0), &json!(604800)),
            "{body}"
        );
    }

    // Licenses are the configured plans, wherever a license is given.
    assert_eq!(s["License"]["enum"], json!(["enterprise", "free", "pro"]));
    for body in ["CreateClient", "KxCreateClient"] {
        assert_eq!(
            prop(body, "license")["$ref"],
            "#/components/schemas/License"
        );
        assert_eq!(
            prop(body, "client_id")["pattern"],
            client_id_pattern,
            "{body}"
        );
        let required = s[body]["required"].as_array().unwrap();
        assert!(required.contains(&json!("client_id")) && required.contains(&json!("license")));
    }
    assert_eq!(
        prop("UpdateClient", "license")["oneOf"],
        json!([{"$ref": "#/components/schemas/License"}, {"type": "null"}])
    );
    assert_eq!(
        prop("KxClientRef", "client_id")["pattern"],
        client_id_pattern
    );
    assert_eq!(s["KxClientRef"]["required"], json!(["client_id"]));

    // Answers: formats of ids and times.
    assert_eq!(prop("KeyView", "id")["format"], "uuid");
    for t in [
        "created_at",
        "updated_at",
        "expires_at",
        "last_used_at",
        "previous_key_valid_until",
    ] {
        assert_eq!(prop("KeyView", t)["format"], "date-time", "KeyView.{t}");
    }
    assert_eq!(prop("ClientView", "created_at")["format"], "date-time");
    assert_eq!(prop("UsageView", "key_id")["format"], "uuid");
    assert_eq!(
        prop("KxClient", "created_at")["pattern"],
        "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$"
    );

    // Query and path parameters.
    let param = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path}: no parameter {name}"))["schema"]
            .clone()
    };
    for path in ["/v1/api-keys", "/v1/clients"] {
        let per_page = param(path, "get", "per_page");
        assert_eq!(
            (&per_page["minimum"], &per_page["maximum"]),
            (&json!(1), &json!(1000))
        );
        assert_eq!(param(path, "get", "page")["minimum"], 1);
    }
    let days = param("/v1/api-keys/{id}/usage", "get", "days");
    assert_eq!(
        (&days["minimum"], &days["maximum"]),
        (&json!(1), &json!(366))
    );
    assert_eq!(param("/v1/api-keys/{id}", "get", "id")["format"], "uuid");
    assert_eq!(
        param("/v1/clients/{client_id}", "get", "client_id")["pattern"],
        client_id_pattern
    );

    // Webhooks: the URL rule (the handler's own regular expression), 1–10 event types.
    for body in [
        "CreateWebhook",
        "UpdateWebhook",
        "CreditsChange",
        "CreditsBody",
        "Refill",
        "ImportRequest",
        "RotateSigningKey",
    ] {
        assert_eq!(s[body]["additionalProperties"], json!(false), "{body}");
    }
    assert_eq!(s["CreateWebhook"]["required"], json!(["url"]));
    for body in ["CreateWebhook", "UpdateWebhook"] {
        let url = prop(body, "url");
        assert_eq!(url["maxLength"], 2048, "{body}.url");
        assert_eq!(url["pattern"], WEBHOOK_URL_PATTERN, "{body}.url");
        assert_eq!(
            prop(body, "events")["oneOf"][0]["$ref"],
            "#/components/schemas/EventsInput",
            "{body}.events"
        );
    }
    let lists: Vec<&Value> = s["EventsInput"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "array")
        .collect();
    assert_eq!(lists.len(), 1, "{}", s["EventsInput"]);
    assert_eq!(
        (&lists[0]["minItems"], &lists[0]["maxItems"]),
        (&json!(1), &json!(10))
    );
    let names = deref(&doc, &lists[0]["items"])["enum"].clone();
    assert_eq!(names.as_array().unwrap().len(), 10, "{names}");
    let webhook_id = json!("^wh_(cfg_[0-9a-f]{16}|[0-9a-f]{32})$");
    for (path, method) in [
        ("/v1/webhooks/{id}", "get"),
        ("/v1/webhooks/{id}", "patch"),
        ("/v1/webhooks/{id}", "delete"),
        ("/v1/webhooks/{id}/deliveries", "get"),
        ("/v1/webhooks/{id}/rotate", "post"),
    ] {
        assert_eq!(
            param(path, method, "id")["pattern"],
            webhook_id,
            "{method} {path}"
        );
    }
    let limit = param("/v1/webhooks/{id}/deliveries", "get", "limit");
    assert_eq!(
        (&limit["minimum"], &limit["maximum"]),
        (&json!(1), &json!(1000))
    );
    assert_eq!(prop("WebhookView", "created_at")["format"], "date-time");

    // Credits: exactly one of add / set, each a number 0–10^15 (never null); a refill's day
    // only for a monthly refill.
    let change = &s["CreditsChange"];
    assert_eq!(
        (&change["minProperties"], &change["maxProperties"]),
        (&json!(1), &json!(1))
    );
    for field in ["add", "set"] {
        let p = prop("CreditsChange", field);
        assert_eq!(p["type"], "integer", "{field}: never null");
        assert_eq!(
            (&p["minimum"], &p["maximum"]),
            (&json!(0), &json!(1_000_000_000_000_000_u64))
        );
    }
    let remaining = prop("CreditsBody", "remaining");
    assert_eq!(
        (&remaining["minimum"], &remaining["maximum"]),
        (&json!(0), &json!(1_000_000_000_000_000_u64))
    );
    assert_eq!(s["CreditsBody"]["required"], json!(["remaining"]));
    let amount = prop("Refill", "amount");
    assert_eq!(
        (&amount["minimum"], &amount["maximum"]),
        (&json!(0), &json!(1_000_000_000_000_000_u64))
    );
    let day = prop("Refill", "day");
    assert_eq!((&day["minimum"], &day["maximum"]), (&json!(1), &json!(28)));
    assert_eq!(
        s["Refill"]["dependentSchemas"]["day"]["anyOf"],
        json!([{"properties": {"day": {"type": "null"}}}, {"properties": {"interval": {"const": "monthly"}}}])
    );
    assert_eq!(
        param("/v1/api-keys/{id}/credits", "post", "id")["format"],
        "uuid"
    );
    assert_eq!(
        param("/v1/clients/{client_id}/usage", "get", "client_id")["pattern"],
        client_id_pattern
    );

    // Import: at most 10000 keys; each item is judged on its own (any JSON value).
    assert_eq!(prop("ImportRequest", "keys")["maxItems"], 10000);
    assert_eq!(s["ImportRequest"]["required"], json!(["keys"]));

    // Problem codes: every code the admin API answers.
    let codes = deref(&doc, &s["Problem"]["properties"]["code"])["enum"].clone();
    for code in [
        "bad_request",
        "unauthorized",
        "invalid_api_key",
        "forbidden",
        "not_found",
        "conflict",
        "validation_failed",
        "request_timeout",
        "payload_too_large",
        "rate_limited",
        "store_unavailable",
    ] {
        assert!(codes.as_array().unwrap().contains(&json!(code)), "{code}");
    }

    // Credentials: admin key (header and bearer), a client's key or token on the key calls.
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["admin_key"]["name"], "X-ADMIN-KEY");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["client_key"]["name"], "x-api-key");
    assert_eq!(schemes["client_token"]["bearerFormat"], "JWT");
    // On the calls a client principal makes on its own keys and usage.
    for path in ["/v1/api-keys", "/v1/clients/{client_id}/usage"] {
        let on_own = &doc["paths"][path]["get"]["security"];
        for scheme in ["admin_key", "bearer", "client_key", "client_token"] {
            assert!(
                on_own
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s.get(scheme).is_some()),
                "{path}: {scheme}"
            );
        }
    }
    assert!(
        doc["paths"]["/v1/clients"]["get"]["security"].is_null(),
        "admin only"
    );
    assert_eq!(doc["security"], json!([{"admin_key": []}, {"bearer": []}]));
}

/// Rules every operation follows, so that a new endpoint without them fails here: a summary,
/// examples for its request body and its 2xx answers, every error answer a problem+json with
/// an example whose `code` is a known one and whose `status` is the answer's, and every field
/// of a request body or query bounded (strings by length, pattern, enum or format; integers by
/// a minimum and a maximum; arrays by maxItems).
#[tokio::test]
async fn every_operation_has_examples_problem_answers_and_bounded_inputs() {
    let doc = served_document().await;
    let codes = deref(
        &doc,
        &doc["components"]["schemas"]["Problem"]["properties"]["code"],
    )["enum"]
        .as_array()
        .unwrap()
        .clone();
    // Inputs with no bound by design: any string is a well-formed guess at a key (a wrong one
    // answers 401), and a client filter that matches nothing lists nothing.
    let unbounded: &[&str] = &[
        "LoginRequest.api_key",
        "list_keys?client_id",
        "list_clients?client_id",
    ];

    // On the media type, or on the schema (the first of a `oneOf` with null: an optional body).
    let has_example = |media: &Value| {
        let schema = media["schema"]["oneOf"].get(0).unwrap_or(&media["schema"]);
        media.get("example").is_some()
            || media.get("examples").is_some()
            || deref(&doc, schema).get("examples").is_some()
    };
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}"));
            assert!(op["summary"].is_string(), "{id}: no summary");
            if let Some(body) = op.get("requestBody") {
                let media = &body["content"]["application/json"];
                assert!(media.is_object(), "{id}: request body is not JSON");
                assert!(has_example(media), "{id}: no request example");
                let mut schema = deref(&doc, &media["schema"]);
                if let Some(one) = schema["oneOf"].as_array() {
                    schema = deref(&doc, &one[0]);
                }
                let name = media["schema"]["$ref"]
                    .as_str()
                    .or(schema.get("title").and_then(Value::as_str))
                    .map_or(id.to_owned(), |r| r.rsplit('/').next().unwrap().to_owned());
                // A body without fields (e.g. a rotation's `{}`) has nothing to bound.
                for (field, p) in schema["properties"].as_object().into_iter().flatten() {
                    let label = format!("{name}.{field}");
                    assert_bounded(&doc, p, &label, unbounded);
                }
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                let label = format!("{id}?{}", p["name"].as_str().unwrap());
                assert_bounded(&doc, &p["schema"], &label, unbounded);
            }
            for (status, answer) in op["responses"].as_object().unwrap() {
                assert!(
                    answer["description"].is_string(),
                    "{id} {status}: no description"
                );
                if status.starts_with('2') {
                    if let Some(media) = answer["content"].get("application/json") {
                        assert!(has_example(media), "{id} {status}: no example");
                    }
                    continue;
                }
                if (id, status.as_str()) == ("readyz", "503") {
                    // A probe's state, not an error: the same `Status` body as its 200.
                    continue;
                }
                let media = &answer["content"]["application/problem+json"];
                assert_eq!(
                    media["schema"]["$ref"], "#/components/schemas/Problem",
                    "{id} {status}: not problem+json"
                );
                let example = &media["example"];
                assert_eq!(example["status"].to_string(), *status, "{id} {status}");
                assert!(
                    codes.contains(&example["code"]),
                    "{id} {status}: unknown code"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 22, "{checked} operations");
}

fn assert_bounded(doc: &Value, schema: &Value, label: &str, unbounded: &[&str]) {
    if unbounded.contains(&label) {
        return;
    }
    let mut schema = schema;
    if let Some(one) = schema["oneOf"].as_array() {
        schema = &one[0];
    }
    if schema.get("$ref").is_some() {
        return;
    }
    let schema = deref(doc, schema);
    let any = |keys: &[&str]| keys.iter().any(|k| schema.get(*k).is_some());
    if has_type(schema, "string") {
        assert!(
            any(&["maxLength", "pattern", "enum", "format"]),
            "{label}: an unbounded string"
        );
    } else if has_type(schema, "integer") {
        assert!(
            any(&["minimum"]) && any(&["maximum"]),
            "{label}: an unbounded integer"
        );
    } else if has_type(schema, "array") {
        assert!(any(&["maxItems"]), "{label}: an unbounded list");
    }
}

/// What the document says about inputs, the server does: a query parameter given twice is a
/// problem+json 400 (not a bare text answer); an integer written with a zero fraction is that
/// integer (JSON Schema's `integer`), a fraction is refused; a rate is a number or absent,
/// never null; a PATCH without a body changes nothing; metadata is stored as sent.
#[tokio::test]
async fn inputs_are_read_as_the_document_states_them() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;

    let r = gw
        .admin("GET", "/v1/api-keys?per_page=1&per_page=2", None)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.code(), "bad_request");

    let key = gw.key("acme", json!({"metadata": {"ratio": 1.0}})).await;
    let id = key["id"].as_str().unwrap();
    assert!(
        key["metadata"]["ratio"].is_f64(),
        "metadata kept as sent: {key}"
    );

    let before = chrono::Utc::now();
    let r = gw
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({"grace_period_seconds": 3600.0})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let until: chrono::DateTime<chrono::Utc> = r.json()["previous_key_valid_until"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = (until - before).num_seconds();
    assert!((3599..=3601).contains(&grace), "{grace}");
    let r = gw
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({"grace_period_seconds": 1.5})),
        )
        .await;
    assert_eq!(r.status, 422);

    for limit in [
        json!({"per_second": null, "per_minute": 5, "burst": 1}),
        json!({"per_minute": 5, "burst": null}),
    ] {
        let r = gw
            .admin(
                "PATCH",
                &format!("/v1/api-keys/{id}"),
                Some(json!({"rate_limit": limit})),
            )
            .await;
        assert_eq!(r.status, 422, "{limit}");
    }
    let r = gw
        .admin(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(json!({"rate_limit": {"per_minute": 5.0, "burst": 2}})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["rate_limit"], json!({"per_minute": 5, "burst": 2}));

    let req = http::Request::patch(format!("http://{}/v1/api-keys/{id}", gw.admin))
        .header("x-admin-key", crate::support::ADMIN_KEY)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["rate_limit"], json!({"per_minute": 5, "burst": 2}));
}

/// The webhook URL rule the document states is the one the handler applies: URLs the pattern
/// refuses are refused (422, nothing made), URLs it allows are made; a list of more than ten
/// event types and a null credit change are refused as the document says.
#[tokio::test]
async fn webhook_urls_and_credit_changes_are_judged_as_the_document_states() {
    let rx = crate::events::Receiver::start().await;
    let gw = Gateway::start_with(&crate::events::events_config(&rx.url("/hook"))).await;
    let pattern = pattern_matches;
    for bad in [
        "http://127.0.0.1:65536/x",
        "http://[::1]:8080/x",
        "http://hooks.example.com?x=1",
        "http://user:pw@hooks.example.com/x",
        "http://hooks.example.com/a%zz",
        "http://hooks.example.com/a b",
        "http://hooks.example.com/x#frag",
        "ftp://hooks.example.com/x",
        "HTTP://hooks.example.com/x",
    ] {
        assert!(!pattern(bad), "{bad}");
        let r = gw
            .admin("POST", "/v1/webhooks", Some(json!({"url": bad})))
            .await;
        assert_eq!(r.status, 422, "{bad}");
        assert_eq!(r.code(), "validation_failed");
    }
    let before = gw.admin("GET", "/v1/webhooks", None).await.json()["data"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, 1, "only the configured webhook");
    for good in [
        "http://127.0.0.1:65535/x?a=b&c=%2F",
        "https://hooks.example.com",
        "https://hooks.example.com/k/@v1;x=(1)*~",
    ] {
        assert!(pattern(good), "{good}");
        let r = gw
            .admin(
                "POST",
                "/v1/webhooks",
                Some(json!({"url": good, "events": ["key.created"]})),
            )
            .await;
        assert_eq!(
            r.status,
            201,
            "{good}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let id = r.json()["id"].as_str().unwrap().to_owned();
        let r = gw
            .admin("DELETE", &format!("/v1/webhooks/{id}"), None)
            .await;
        assert_eq!(r.status, 200);
    }
    let eleven: Vec<&str> = std::iter::repeat_n("key.created", 11).collect();
    let r = gw
        .admin(
            "POST",
            "/v1/webhooks",
            Some(json!({"url": "https://h.example.com/x", "events": eleven})),
        )
        .await;
    assert_eq!(r.status, 422);
    let ten: Vec<&str> = std::iter::repeat_n("key.created", 10).collect();
    let r = gw
        .admin(
            "POST",
            "/v1/webhooks",
            Some(json!({"url": "https://h.example.com/x", "events": ten})),
        )
        .await;
    assert_eq!(r.status, 201);

    gw.client("acme", "pro").await;
    let key = gw.key("acme", json!({"credits": {"remaining": 10}})).await;
    let id = key["id"].as_str().unwrap();
    for body in [
        json!({"add": null, "set": 5}),
        json!({"add": null}),
        json!({}),
        json!({"add": 1, "set": 1}),
    ] {
        let r = gw
            .admin(
                "POST",
                &format!("/v1/api-keys/{id}/credits"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, 422, "{body}");
    }
    let r = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.json()["credits"]["remaining"], 10, "nothing changed");
    let r = gw
        .admin(
            "POST",
            &format!("/v1/api-keys/{id}/credits"),
            Some(json!({"set": 5})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["remaining"], 5);
}

/// The document's webhook URL pattern, read by the same engine as the handler's.
fn pattern_matches(url: &str) -> bool {
    regex::Regex::new(WEBHOOK_URL_PATTERN)
        .unwrap()
        .is_match(url)
}
