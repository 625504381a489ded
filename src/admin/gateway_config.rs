//! `GET /v1/config` (admin only): the plans and routes of the running configuration, so that
//! `keygate export` can write them and `keygate diff` / `apply` can tell when a state file
//! expects another configuration. Nothing secret is in it: no admin keys, no token or signing
//! secrets, and upstream URLs without any userinfo.
//!
//! A setting at its default is left out (a plan's `scope = "client"`, a route's `cost = 1`),
//! as a hand-written file leaves it out. Not described: a route's own CORS rules.

use axum::Json;
use axum::extract::{Extension, State};
use serde_json::{Value, json};

use super::error::{AdminError, ErrorResponses};
use super::{AdminState, Caller};
use crate::config::{Config, RouteAuth};
use crate::keys::allowance::Scope;

/// The description served, built once from the configuration.
pub fn describe(config: &Config) -> Value {
    let mut plans = serde_json::Map::new();
    let mut names: Vec<&String> = config.plans.keys().collect();
    names.sort();
    for name in names {
        let mut plan = serde_json::Map::new();
        if let Some(limit) = &config.plans[name] {
            plan.insert("rate_limit".into(), json!(limit));
        }
        if let Some(terms) = config.plan_terms.get(name) {
            if terms.scope == Scope::Key {
                plan.insert("scope".into(), json!("key"));
            }
            if let Some(q) = terms.quota {
                plan.insert(
                    "quota".into(),
                    json!({"requests": q.requests, "per": q.per}),
                );
            }
        }
        plans.insert(name.clone(), Value::Object(plan));
    }
    let routes: Vec<Value> = config
        .routes
        .iter()
        .map(|r| {
            let mut v = json!({
                "path": r.path,
                "upstream": redacted(&r.upstream),
                "permissions": r.permissions,
                "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "auth": match r.auth { RouteAuth::Required => "required", RouteAuth::None => "none" },
            });
            if let Some(limit) = &r.rate_limit {
                v["rate_limit"] = json!(limit);
            }
            if r.cost != 1 {
                v["cost"] = json!(r.cost);
            }
            if let Some(aud) = &r.audience {
                v["audience"] = json!(aud);
            }
            v
        })
        .collect();
    json!({ "plans": plans, "routes": routes })
}

/// `scheme://host[:port]/path` of an upstream, without userinfo.
fn redacted(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let path = if path == "/" { "" } else { path };
    format!("{scheme}://{host}{port}{path}")
}

/// Plans and routes of the running configuration; admin only.
#[utoipa::path(get, path = "/v1/config", operation_id = "gateway_config", tag = "service",
    responses((status = 200, description = "`{plans: {name: {rate_limit?, scope?, quota?}}, routes: [{path, upstream, permissions, methods, auth, rate_limit?, cost?, audience?}]}`",
        content_type = "application/json", body = Object,
        example = json!({"plans": {"free": {"rate_limit": {"per_minute": 60, "burst": 10}, "quota": {"requests": 100_000, "per": "month"}}, "pro": {}},
            "routes": [{"path": "/api", "upstream": "http://127.0.0.1:8080/api", "permissions": ["invoices:read"],
                "methods": ["GET", "POST"], "auth": "required"}]})), ErrorResponses))]
pub async fn show(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, AdminError> {
    caller.admin_only()?;
    Ok(Json(state.gateway_config.clone()))
}
