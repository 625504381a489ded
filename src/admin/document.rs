//! What the OpenAPI document states beyond what the types' own annotations can: rules that
//! depend on the configuration (the licenses are the configured plans; the header a client's
//! API key travels in), rules that join several fields (at most one way to set an expiry;
//! `roles` is an alias of `permissions`), and the credentials each operation accepts.
//!
//! Each field's own constraints (lengths, ranges, patterns, formats, examples) are on the types
//! in `admin/*.rs`; this module only completes the document built from them, once, when the
//! admin router is built.

use serde_json::{Value, json};

use super::AdminState;

/// Operations a client principal (a key or token holding the self-service permission) may
/// call, on its own keys; every other protected operation needs an admin key.
const CLIENT_OPERATIONS: &[&str] = &[
    "create_key",
    "list_keys",
    "get_key",
    "update_key",
    "delete_key",
    "rotate_key",
    "key_usage",
];

/// Request bodies whose `license` must name a configured plan.
const LICENSE_FIELDS: &[&str] = &["CreateClient", "UpdateClient", "KxCreateClient"];

/// Request bodies whose `permissions` may also be sent as `roles` (never both).
const ROLES_ALIAS: &[&str] = &["CreateKey", "UpdateKey", "CreateClient"];

/// Completes the document built from the handlers' annotations (see the module doc).
pub fn complete(doc: utoipa::openapi::OpenApi, state: &AdminState) -> utoipa::openapi::OpenApi {
    let mut v = serde_json::to_value(&doc).expect("the document serializes");
    let mut plans: Vec<&str> = state.plans.iter().map(String::as_str).collect();
    plans.sort_unstable();
    complete_value(&mut v, &plans, state.extractor.api_key_header.as_str());
    serde_json::from_value(v).expect("the completed document is an OpenAPI document")
}

fn complete_value(doc: &mut Value, plans: &[&str], api_key_header: &str) {
    let schemas = &mut doc["components"]["schemas"];
    for name in LICENSE_FIELDS {
        let license = &mut schemas[*name]["properties"]["license"];
        let nullable = license["type"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("null")));
        let mut values: Vec<Value> = plans.iter().map(|p| json!(p)).collect();
        if nullable {
            values.push(Value::Null);
        }
        license["enum"] = Value::Array(values);
        let list = plans.join(", ");
        license["description"] = json!(format!(
            "One of the configured plans (`[plans.<license>]`): {list}."
        ));
    }
    for name in ROLES_ALIAS {
        let body = &mut schemas[*name];
        let mut roles = body["properties"]["permissions"].clone();
        roles["description"] = json!("Alias of `permissions` (give one of the two).");
        roles["deprecated"] = json!(true);
        body["properties"]["roles"] = roles;
        push_not(body, both_given("permissions", "roles"));
    }
    // At most one of expires_at / expires_days / never_expire, each counted when not null.
    let create_key = &mut schemas["CreateKey"];
    create_key["properties"]["never_expire"]["not"] = json!({"const": false});
    for (a, b) in [
        ("expires_at", "expires_days"),
        ("expires_at", "never_expire"),
        ("expires_days", "never_expire"),
    ] {
        push_not(create_key, both_given(a, b));
    }

    let components = &mut doc["components"]["securitySchemes"];
    components["admin_key"] = json!({
        "type": "apiKey", "in": "header", "name": "X-ADMIN-KEY",
        "description": "One of `[admin] keys`: every client and key."
    });
    components["bearer"] = json!({
        "type": "http", "scheme": "bearer",
        "description": "An admin key as `Authorization: Bearer <admin key>`: every client and key."
    });
    components["client_key"] = json!({
        "type": "apiKey", "in": "header", "name": api_key_header,
        "description": "A client's API key holding the self-service permission (`[admin] self_service_permission`): that client's own keys only. It may also be sent as `Authorization: Bearer <key>`."
    });
    components["client_token"] = json!({
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "An access token from `POST /auth/login` for a key holding the self-service permission: that client's own keys only."
    });

    // A free-form object (`metadata`) says so, or generators read it as "no properties".
    free_form_objects(doc);

    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let id = op["operationId"].as_str().unwrap_or_default();
            if CLIENT_OPERATIONS.contains(&id) {
                op["security"] = json!([
                    {"admin_key": []}, {"bearer": []}, {"client_key": []}, {"client_token": []}
                ]);
            }
        }
    }
}

/// Marks every object schema with no properties as any JSON object.
fn free_form_objects(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let is_object = match m.get("type") {
                Some(Value::String(t)) => t == "object",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
                _ => false,
            };
            if is_object && !m.contains_key("properties") && !m.contains_key("additionalProperties")
            {
                m.insert("additionalProperties".into(), json!(true));
            }
            m.values_mut().for_each(free_form_objects);
        }
        Value::Array(a) => a.iter_mut().for_each(free_form_objects),
        _ => {}
    }
}

/// A schema that matches when both `a` and `b` are given and not null.
fn both_given(a: &str, b: &str) -> Value {
    json!({
        "required": [a, b],
        "properties": { a: {"not": {"type": "null"}}, b: {"not": {"type": "null"}} }
    })
}

/// Adds `rule` to the schemas `body` must not match.
fn push_not(body: &mut Value, rule: Value) {
    let not = &mut body["not"];
    if not.is_null() {
        *not = json!({"anyOf": []});
    }
    if let Some(any) = not["anyOf"].as_array_mut() {
        any.push(rule);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        json!({
            "components": {"schemas": {
                "CreateClient": {"properties": {"license": {"type": "string"}, "permissions": {"type": ["array", "null"]}}},
                "UpdateClient": {"properties": {"license": {"type": ["string", "null"]}}},
                "KxCreateClient": {"properties": {"license": {"type": "string"}}},
                "CreateKey": {"properties": {"permissions": {"type": ["array", "null"]}, "never_expire": {"type": ["boolean", "null"]}}},
                "UpdateKey": {"properties": {"permissions": {"type": ["array", "null"]}}}
            }},
            "paths": {"/v1/api-keys": {"post": {"operationId": "create_key"}},
                      "/v1/clients": {"post": {"operationId": "create_client"}}}
        })
    }

    #[test]
    fn licenses_are_the_configured_plans_and_null_stays_where_it_was_allowed() {
        let mut d = doc();
        complete_value(&mut d, &["free", "pro"], "x-api-key");
        let s = &d["components"]["schemas"];
        assert_eq!(
            s["CreateClient"]["properties"]["license"]["enum"],
            json!(["free", "pro"])
        );
        assert_eq!(
            s["KxCreateClient"]["properties"]["license"]["enum"],
            json!(["free", "pro"])
        );
        assert_eq!(
            s["UpdateClient"]["properties"]["license"]["enum"],
            json!(["free", "pro", null])
        );
    }

    #[test]
    fn cross_field_rules_and_client_security() {
        let mut d = doc();
        complete_value(&mut d, &["pro"], "x-api-key");
        let create_key = &d["components"]["schemas"]["CreateKey"];
        // roles/permissions and the three expiry pairs.
        assert_eq!(create_key["not"]["anyOf"].as_array().unwrap().len(), 4);
        assert_eq!(create_key["properties"]["roles"]["deprecated"], json!(true));
        assert_eq!(
            create_key["properties"]["never_expire"]["not"],
            json!({"const": false})
        );
        assert_eq!(
            d["components"]["securitySchemes"]["client_key"]["name"],
            json!("x-api-key")
        );
        let key_security = &d["paths"]["/v1/api-keys"]["post"]["security"];
        assert!(
            key_security
                .as_array()
                .unwrap()
                .contains(&json!({"client_token": []}))
        );
        // Admin-only operations keep the document's default (admin credentials only).
        assert!(d["paths"]["/v1/clients"]["post"]["security"].is_null());
    }
}
