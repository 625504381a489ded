//! What the OpenAPI document states beyond what the types' own annotations can: rules that
//! depend on the configuration (the licenses are the configured plans; the header a client's
//! API key travels in), rules that join several fields (at most one way to set an expiry;
//! `roles` is an alias of `permissions`), stated with `dependentSchemas`, and the credentials each operation accepts.
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
    "client_usage",
];

/// Request bodies whose `license` must name a configured plan.
const LICENSE_FIELDS: &[&str] = &["CreateClient", "UpdateClient", "KxCreateClient"];

/// Request bodies whose `permissions` may also be sent as `roles` (never both).
const ROLES_ALIAS: &[&str] = &["CreateKey", "UpdateKey", "CreateClient"];

/// Completes the document built from the handlers' annotations (see the module doc). The
/// result stays JSON: utoipa's types would drop the keywords they do not model.
pub fn complete(doc: &utoipa::openapi::OpenApi, state: &AdminState) -> Value {
    let mut v = serde_json::to_value(doc).expect("the document serializes");
    let mut plans: Vec<&str> = state.plans.iter().map(String::as_str).collect();
    plans.sort_unstable();
    complete_value(&mut v, &plans, state.extractor.api_key_header.as_str());
    v
}

fn complete_value(doc: &mut Value, plans: &[&str], api_key_header: &str) {
    let schemas = &mut doc["components"]["schemas"];
    let list = plans.join(", ");
    schemas["License"] = json!({
        "type": "string",
        "enum": plans,
        "description": format!("A configured plan (`[plans.<license>]`): {list}."),
    });
    for name in LICENSE_FIELDS {
        let license = &mut schemas[*name]["properties"]["license"];
        let nullable = license["type"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("null")));
        let description = license["description"].clone();
        let one = json!({"$ref": "#/components/schemas/License"});
        *license = if nullable {
            json!({"oneOf": [one, {"type": "null"}]})
        } else {
            one
        };
        if description.is_string() {
            license["description"] = description;
        }
    }
    for name in ROLES_ALIAS {
        let body = &mut schemas[*name];
        let mut roles = body["properties"]["permissions"].clone();
        roles["description"] = json!("Alias of `permissions` (give one of the two).");
        roles["deprecated"] = json!(true);
        body["properties"]["roles"] = roles;
        // Both keys present (even one null) is a duplicate field.
        body["dependentSchemas"]["roles"] = json!({"not": {"required": ["permissions"]}});
    }
    // At most one of expires_at / expires_days / never_expire, each counted when not null.
    let create_key = &mut schemas["CreateKey"];
    create_key["properties"]["never_expire"]["not"] = json!({"const": false});
    for (field, others) in [
        ("expires_at", ["expires_days", "never_expire"]),
        ("expires_days", ["expires_at", "never_expire"]),
        ("never_expire", ["expires_at", "expires_days"]),
    ] {
        // When `field` is given and not null, the others are absent or null.
        create_key["dependentSchemas"][field] = json!({"anyOf": [
            {"properties": {field: {"type": "null"}}},
            {"properties": {others[0]: {"type": "null"}, others[1]: {"type": "null"}}}
        ]});
    }

    // A refill's `day` (when not null) is for a monthly refill only.
    schemas["Refill"]["dependentSchemas"]["day"] = json!({"anyOf": [
        {"properties": {"day": {"type": "null"}}},
        {"properties": {"interval": {"const": "monthly"}}}
    ]});

    // A webhook's list of event types: 1–10 of them.
    if let Some(one) = schemas["EventsInput"]["oneOf"].as_array_mut() {
        for s in one.iter_mut().filter(|s| s["type"] == "array") {
            s["minItems"] = json!(1);
            s["maxItems"] = json!(super::webhooks::MAX_EVENT_TYPES);
        }
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

    // A page of `X` (`PageView_X`) lists `X` by reference, so a generated client has one `X`
    // type, not a copy per page type.
    if let Some(all) = doc["components"]["schemas"].as_object_mut() {
        let names: Vec<String> = all.keys().cloned().collect();
        for name in &names {
            if let Some(item) = name.strip_prefix("PageView_")
                && names.iter().any(|n| n == item)
            {
                all[name]["properties"]["data"]["items"] =
                    json!({"$ref": format!("#/components/schemas/{item}")});
            }
        }
    }

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
                "UpdateKey": {"properties": {"permissions": {"type": ["array", "null"]}}},
                "KeyView": {"properties": {"id": {"type": "string"}}},
                "PageView_KeyView": {"properties": {"data": {"type": "array", "items": {"properties": {"id": {"type": "string"}}}}}}
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
        assert_eq!(s["License"]["enum"], json!(["free", "pro"]));
        let license = json!({"$ref": "#/components/schemas/License"});
        assert_eq!(s["CreateClient"]["properties"]["license"], license);
        assert_eq!(s["KxCreateClient"]["properties"]["license"], license);
        assert_eq!(
            s["UpdateClient"]["properties"]["license"]["oneOf"],
            json!([license, {"type": "null"}])
        );
    }

    #[test]
    fn cross_field_rules_and_client_security() {
        let mut d = doc();
        complete_value(&mut d, &["pro"], "x-api-key");
        let create_key = &d["components"]["schemas"]["CreateKey"];
        // roles/permissions and the three ways to set an expiry.
        let dependent = create_key["dependentSchemas"].as_object().unwrap();
        let mut keys: Vec<&str> = dependent.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["expires_at", "expires_days", "never_expire", "roles"]
        );
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
        // A page of keys lists `KeyView`s by reference.
        assert_eq!(
            d["components"]["schemas"]["PageView_KeyView"]["properties"]["data"]["items"],
            json!({"$ref": "#/components/schemas/KeyView"})
        );
        // Admin-only operations keep the document's default (admin credentials only).
        assert!(d["paths"]["/v1/clients"]["post"]["security"].is_null());
    }
}
