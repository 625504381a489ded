//! Declarative state: `keygate export > state.toml`, `keygate diff state.toml`,
//! `keygate apply state.toml`.
//!
//! The file lists `[[clients]]` and `[[keys]]` (never a secret or a hash: keys are described by
//! their attributes), and, for reference, the `[plans.*]` the clients use and the `[[routes]]`
//! of the running configuration. `apply` makes the gateway's clients and keys exactly what the
//! file says, through the admin API:
//! - a client in the file and not on the gateway is created; one on the gateway and not in the
//!   file is deleted with its keys; a different license or metadata is updated;
//! - a key is matched by `id` when the file gives one that exists on the gateway, else by its
//!   `name` within its client (so a state exported from one gateway converges another; two
//!   keys of one client with the same name cannot be matched by name: give their ids);
//!   an unmatched key in the file is created (its new secret is printed once, as
//!   `CLIENT/NAME: KEY`), an unmatched key on the gateway is deleted, a matched one gets the
//!   file's name, permissions, enabled, expires_at, rate_limit, metadata and credits (a key's
//!   `credits = { remaining, refill }`: the refill terms and whether the key has credits are
//!   compared; `remaining` is the balance a key is made with or given when it gets credits,
//!   never compared, as it moves with every request; new refill terms keep the balance);
//! - a client created by apply gets the first key the admin API gives every new client; it
//!   becomes the client's first new key in the file (or is deleted when the file has none), so
//!   a second apply finds nothing to do.
//!
//! Plans and routes are configuration, not state the admin API can change: when the file has
//! `[plans]` or `[[routes]]` and they differ from the running configuration (a plan's rate
//! limit, scope and quota; a route's path, upstream, permissions, methods, auth, rate limit,
//! cost and audience; a route's own CORS rules are not compared), `diff` lists that
//! and `apply` refuses before changing anything (edit the config file, or drop those sections
//! from the state file). Metadata is written as a JSON string (`metadata = '{"tier":2}'`), so
//! every JSON value survives the trip through TOML.
//!
//! Webhooks made through `/v1/webhooks` are written as `[[webhooks]]` (`id`, `url`, `events`;
//! never the signing secret). When the file has a `webhooks` list (an export always writes
//! one), apply makes the API's webhooks exactly that list: a webhook is matched by `id`, else
//! by `url`; an unmatched one in the file is created and its new signing secret printed once,
//! as `webhook URL ID: whsec_…` (it cannot be read again: give it to the receiver then); an
//! unmatched one on the gateway is deleted; a matched one gets the file's URL and events.
//! A file without `webhooks` leaves them alone. The configuration file's `[[webhooks]]` are
//! not the API's: they are neither exported nor changed.
//!
//! `diff` prints nothing and exits 0 when nothing would change, else lists the changes and
//! exits 3. `apply` prints each change it makes (nothing with `--quiet`, except new secrets).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use ::http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::{Admin, segment};
use super::{CliError, Global, emit};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Required, like `keys`: `apply` deletes what the file does not list, so a file without
    /// them (an empty one, left by an export that failed) is refused rather than read as
    /// "no clients". An export writes `clients = []` / `keys = []` when there are none.
    pub clients: Vec<ClientState>,
    pub keys: Vec<KeyState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plans: Option<BTreeMap<String, toml::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<toml::Value>>,
    /// The webhooks made through `/v1/webhooks` (never their secrets). Absent: apply leaves
    /// webhooks alone; present (even empty): apply makes them exactly this list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Vec<WebhookState>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub url: String,
    /// Event types, or `["*"]` for all.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientState {
    pub client_id: String,
    pub license: String,
    /// A JSON object, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub client_id: String,
    pub name: String,
    #[serde(default)]
    pub permissions: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<toml::Value>,
    /// A JSON object, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// The key's credits; absent: not limited by credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsState>,
}

/// A key's credits: the refill terms are compared and applied; `remaining` is a balance the
/// key is made with (or given when it gets credits), never compared (it moves with every
/// request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsState {
    /// Default: the refill's amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// `{ amount, interval = "daily" | "monthly", day }`, as the admin API takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<toml::Value>,
}

impl CreditsState {
    /// The refill as the admin API shows it (`day = 1`, the default, left out), or null.
    fn refill_json(&self) -> Value {
        self.refill
            .as_ref()
            .map(|r| without_default(toml_to_json(r), "day", json!(1)))
            .unwrap_or(Value::Null)
    }

    /// The admin API's credits body, `remaining` given or the refill's amount.
    fn body(&self, label: &str, remaining: Option<u64>) -> Result<Value, CliError> {
        let refill = self.refill_json();
        let remaining = remaining
            .or(self.remaining)
            .or_else(|| refill["amount"].as_u64())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "key {label}: credits need `remaining` or a `refill` with an `amount`"
                ))
            })?;
        let mut body = json!({ "remaining": remaining });
        if !refill.is_null() {
            body["refill"] = refill;
        }
        Ok(body)
    }
}

fn yes() -> bool {
    true
}

/// What the gateway holds now.
struct Live {
    clients: Vec<Value>,
    keys: Vec<Value>,
    config: Value,
    /// The webhooks made through the API (`source = "api"`); `None` when the gateway's store
    /// keeps no event outbox (no webhooks at all).
    webhooks: Option<Vec<Value>>,
}

async fn live(admin: &Admin) -> Result<Live, CliError> {
    let webhooks = match admin.get("/v1/webhooks").await {
        Ok(v) => Some(
            v["data"]
                .as_array()
                .map(|a| a.iter().filter(|w| w["source"] == "api").cloned().collect())
                .unwrap_or_default(),
        ),
        Err(CliError::Refused { status: 404, .. }) => None,
        Err(e) => return Err(e),
    };
    Ok(Live {
        clients: admin.all("/v1/clients").await?,
        keys: admin.all("/v1/api-keys").await?,
        config: admin.get("/v1/config").await?,
        webhooks,
    })
}

/// Event types as a set, so order and repeats do not count as a change.
fn event_set(v: &[String]) -> std::collections::BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

fn live_events(w: &Value) -> Vec<String> {
    serde_json::from_value(w["events"].clone()).unwrap_or_default()
}

fn json_to_toml(v: &Value) -> Option<toml::Value> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(a.iter().filter_map(json_to_toml).collect()),
        Value::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), json_to_toml(v)?)))
                .collect(),
        ),
    })
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn meta_string(v: &Value) -> Option<String> {
    (!v.is_null()).then(|| v.to_string())
}

fn parse_meta(what: &str, s: &Option<String>) -> Result<Value, CliError> {
    match s {
        None => Ok(Value::Null),
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(CliError::Usage(format!(
                "{what}: metadata must be a JSON object written as a string"
            ))),
        },
    }
}

fn millis(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A key `apply` would create, or give this expiry, with an `expires_at` already past: the
/// gateway takes none, so the file is refused before anything is changed (an export keeps
/// keys that have expired since; applied elsewhere, each would stop `apply` halfway).
fn refuse_past(label: &str, k: &KeyState) -> Result<(), CliError> {
    let Some(t) = &k.expires_at else {
        return Ok(());
    };
    let at = millis(t).ok_or_else(|| {
        CliError::Usage(format!("key {label}: expires_at is not an RFC 3339 time"))
    })?;
    if at <= chrono::Utc::now().timestamp_millis() {
        return Err(CliError::Usage(format!(
            "key {label}: expires_at {t} has passed, and the gateway makes or moves no key to an \
             expiry in the past; remove the key from the file or give it a later expires_at \
             (nothing was changed)"
        )));
    }
    Ok(())
}

/// `keygate export`: the state as TOML on stdout.
pub async fn export(admin: &Admin) -> Result<(), CliError> {
    let live = live(admin).await?;
    let mut state = State::default();
    let mut licenses = HashSet::new();
    for c in &live.clients {
        licenses.insert(c["license"].as_str().unwrap_or_default().to_owned());
        state.clients.push(ClientState {
            client_id: c["client_id"].as_str().unwrap_or_default().into(),
            license: c["license"].as_str().unwrap_or_default().into(),
            metadata: meta_string(&c["metadata"]),
        });
    }
    state.clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    for k in &live.keys {
        state.keys.push(KeyState {
            id: k["id"].as_str().map(str::to_owned),
            client_id: k["client_id"].as_str().unwrap_or_default().into(),
            name: k["name"].as_str().unwrap_or_default().into(),
            permissions: serde_json::from_value(k["permissions"].clone()).unwrap_or_default(),
            enabled: k["enabled"].as_bool().unwrap_or(true),
            expires_at: k["expires_at"].as_str().map(str::to_owned),
            rate_limit: json_to_toml(&k["rate_limit"]),
            metadata: meta_string(&k["metadata"]),
            credits: k["credits"].is_object().then(|| CreditsState {
                remaining: k["credits"]["remaining"].as_u64(),
                refill: json_to_toml(&k["credits"]["refill"]),
            }),
        });
    }
    // Stable order: by client, then as the gateway lists them (creation order).
    state.keys.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let plans: BTreeMap<String, toml::Value> = live.config["plans"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(name, _)| licenses.contains(*name))
                .filter_map(|(name, p)| Some((name.clone(), json_to_toml(p)?)))
                .collect()
        })
        .unwrap_or_default();
    state.plans = Some(plans);
    state.routes = Some(
        live.config["routes"]
            .as_array()
            .map(|a| a.iter().filter_map(json_to_toml).collect())
            .unwrap_or_default(),
    );
    state.webhooks = live.webhooks.as_ref().map(|ws| {
        ws.iter()
            .map(|w| WebhookState {
                id: w["id"].as_str().map(str::to_owned),
                url: s(&w["url"]),
                events: live_events(w),
            })
            .collect()
    });
    let text = toml::to_string(&state)
        .map_err(|e| CliError::Transport(format!("cannot write the state as TOML: {e}")))?;
    emit(format_args!(
        "# keygate state: clients, keys (attributes only, never secrets), plans in use, routes,\n\
         # webhooks made through the admin API (never their secrets).\n\
         # `keygate diff FILE` shows what `keygate apply FILE` would change.\n\n{text}"
    ))
}

pub fn read(path: &Path) -> Result<State, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let hint = if e.message().starts_with("missing field `clients`")
            || e.message().starts_with("missing field `keys`")
        {
            " (apply deletes what the file does not list: a state file names `clients` and \
             `keys`, as an export does; write `clients = []` and `keys = []` to mean none)"
        } else {
            ""
        };
        CliError::Usage(format!(
            "{}:{}{hint}",
            path.display(),
            crate::config::toml_error(&text, &e)
        ))
    })
}

/// One change `apply` makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    CreateClient {
        client_id: String,
        license: String,
        metadata: Value,
    },
    UpdateClient {
        client_id: String,
        body: Value,
        what: Vec<String>,
    },
    DeleteClient {
        client_id: String,
    },
    CreateKey {
        key: KeyState,
    },
    UpdateKey {
        id: String,
        label: String,
        body: Value,
        what: Vec<String>,
    },
    DeleteKey {
        id: String,
        label: String,
    },
    CreateWebhook {
        url: String,
        events: Vec<String>,
    },
    UpdateWebhook {
        id: String,
        url: String,
        body: Value,
        what: Vec<String>,
    },
    DeleteWebhook {
        id: String,
        url: String,
    },
    /// Plans or routes differ from the running configuration (apply cannot change them).
    Config {
        what: String,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::CreateClient {
                client_id, license, ..
            } => write!(f, "+ client {client_id} (license {license})"),
            Change::UpdateClient {
                client_id, what, ..
            } => write!(f, "~ client {client_id}: {}", what.join(", ")),
            Change::DeleteClient { client_id } => {
                write!(f, "- client {client_id} (and all its keys)")
            }
            Change::CreateKey { key } => write!(f, "+ key {}/{}", key.client_id, key.name),
            Change::UpdateKey {
                id, label, what, ..
            } => write!(f, "~ key {label} ({id}): {}", what.join(", ")),
            Change::DeleteKey { id, label } => write!(f, "- key {label} ({id})"),
            Change::CreateWebhook { url, events } => {
                write!(f, "+ webhook {url} ({})", events.join(", "))
            }
            Change::UpdateWebhook { id, url, what, .. } => {
                write!(f, "~ webhook {url} ({id}): {}", what.join(", "))
            }
            Change::DeleteWebhook { id, url } => write!(f, "- webhook {url} ({id})"),
            Change::Config { what } => write!(
                f,
                "! {what} differ from the running configuration (change the config file; \
                 apply does not)"
            ),
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        v => v.to_string(),
    }
}

/// `v` without `field` when it holds the default (`GET /v1/config` leaves defaults out).
fn without_default(mut v: Value, field: &str, default: Value) -> Value {
    if let Some(o) = v.as_object_mut()
        && o.get(field) == Some(&default)
    {
        o.remove(field);
    }
    v
}

/// The changes that make `live` what `want` says, in the order they must be made: clients
/// created and updated, keys deleted, updated and created, clients deleted.
fn plan(want: &State, live: &Live) -> Result<Vec<Change>, CliError> {
    let mut out = Vec::new();
    if let Some(plans) = &want.plans {
        let running = live.config["plans"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let same = plans.iter().all(|(name, p)| {
            running
                .get(name)
                .is_some_and(|r| *r == without_default(toml_to_json(p), "scope", json!("client")))
        });
        if !same {
            out.push(Change::Config {
                what: "[plans]".into(),
            });
        }
    }
    if let Some(routes) = &want.routes {
        let running = live.config["routes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let theirs: Vec<Value> = routes
            .iter()
            .map(|r| without_default(toml_to_json(r), "cost", json!(1)))
            .collect();
        // Compare with the running routes as the export wrote them (nulls dropped).
        let ours: Vec<Value> = running
            .iter()
            .filter_map(json_to_toml)
            .map(|t| toml_to_json(&t))
            .collect();
        if theirs != ours {
            out.push(Change::Config {
                what: "[[routes]]".into(),
            });
        }
    }

    // Clients.
    let mut seen = HashSet::new();
    let live_clients: HashMap<&str, &Value> = live
        .clients
        .iter()
        .map(|c| (c["client_id"].as_str().unwrap_or_default(), c))
        .collect();
    for c in &want.clients {
        if !seen.insert(c.client_id.as_str()) {
            return Err(CliError::Usage(format!(
                "client {} is listed twice",
                c.client_id
            )));
        }
        let meta = parse_meta(&format!("client {}", c.client_id), &c.metadata)?;
        // A license the gateway has no plan for is refused by it; here, before anything is made.
        // A client that already holds it keeps it (its plan left the config: it is served at
        // the default limit), so only a new client or a change of license is judged.
        let unchanged = live_clients
            .get(c.client_id.as_str())
            .is_some_and(|l| l["license"] == c.license.as_str());
        if let Some(running) = live.config["plans"].as_object()
            && !running.contains_key(&c.license)
            && !unchanged
        {
            let mut names: Vec<&str> = running.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(CliError::Usage(format!(
                "client {}: license {:?} is not a plan of this gateway ({}); nothing was changed",
                c.client_id,
                c.license,
                names.join(", ")
            )));
        }
        match live_clients.get(c.client_id.as_str()) {
            None => out.push(Change::CreateClient {
                client_id: c.client_id.clone(),
                license: c.license.clone(),
                metadata: meta,
            }),
            Some(l) => {
                let mut body = json!({});
                let mut what = Vec::new();
                if l["license"] != c.license.as_str() {
                    what.push(format!("license {} → {}", s(&l["license"]), c.license));
                    body["license"] = json!(c.license);
                }
                if l["metadata"] != meta {
                    what.push(format!("metadata {} → {}", s(&l["metadata"]), s(&meta)));
                    body["metadata"] = meta;
                }
                if !what.is_empty() {
                    out.push(Change::UpdateClient {
                        client_id: c.client_id.clone(),
                        body,
                        what,
                    });
                }
            }
        }
    }
    let deleted: Vec<&str> = live_clients
        .keys()
        .copied()
        .filter(|id| !seen.contains(id))
        .collect();

    // Keys: by id first, then by name within the client.
    for k in &want.keys {
        if !seen.contains(k.client_id.as_str()) {
            return Err(CliError::Usage(format!(
                "key {}/{}: its client is not in the file",
                k.client_id, k.name
            )));
        }
    }
    let mut matched: HashMap<usize, &Value> = HashMap::new();
    let mut taken = HashSet::new();
    for (i, k) in want.keys.iter().enumerate() {
        let Some(id) = &k.id else { continue };
        let Some(l) = live.keys.iter().find(|l| l["id"] == id.as_str()) else {
            continue;
        };
        if l["client_id"] != k.client_id.as_str() {
            return Err(CliError::Usage(format!(
                "key {id} belongs to client {} on the gateway, not {} (keys cannot move \
                 between clients)",
                s(&l["client_id"]),
                k.client_id
            )));
        }
        if !taken.insert(id.as_str()) {
            return Err(CliError::Usage(format!("key {id} is listed twice")));
        }
        matched.insert(i, l);
    }
    for (i, k) in want.keys.iter().enumerate() {
        if matched.contains_key(&i) {
            continue;
        }
        let same_name = |l: &&Value| {
            l["client_id"] == k.client_id.as_str()
                && l["name"] == k.name.as_str()
                && !taken.contains(l["id"].as_str().unwrap_or_default())
        };
        let candidates: Vec<&Value> = live.keys.iter().filter(same_name).collect();
        let twins = want
            .keys
            .iter()
            .enumerate()
            .filter(|(j, o)| {
                !matched.contains_key(j) && o.client_id == k.client_id && o.name == k.name
            })
            .count();
        if candidates.len() > 1 || twins > 1 {
            return Err(CliError::Usage(format!(
                "key {}/{}: more than one key of this client has this name; give each its id",
                k.client_id, k.name
            )));
        }
        if let Some(l) = candidates.first() {
            taken.insert(l["id"].as_str().unwrap_or_default());
            matched.insert(i, l);
        }
    }
    // Credits a key could not be made with are refused for every key alike.
    for k in &want.keys {
        if let Some(c) = &k.credits {
            c.body(&format!("{}/{}", k.client_id, k.name), None)?;
        }
    }
    let deleted_set: HashSet<&str> = deleted.iter().copied().collect();
    for l in &live.keys {
        let id = l["id"].as_str().unwrap_or_default();
        let client = l["client_id"].as_str().unwrap_or_default();
        if !taken.contains(id) && !deleted_set.contains(client) {
            out.push(Change::DeleteKey {
                id: id.into(),
                label: format!("{client}/{}", s(&l["name"])),
            });
        }
    }
    for (i, k) in want.keys.iter().enumerate() {
        let Some(l) = matched.get(&i) else { continue };
        let label = format!("{}/{}", k.client_id, k.name);
        let meta = parse_meta(&format!("key {label}"), &k.metadata)?;
        let mut body = json!({});
        let mut what = Vec::new();
        if l["name"] != k.name.as_str() {
            what.push(format!("name {} → {}", s(&l["name"]), k.name));
            body["name"] = json!(k.name);
        }
        if l["permissions"] != json!(k.permissions) {
            what.push(format!(
                "permissions {} → {}",
                l["permissions"],
                json!(k.permissions)
            ));
            body["permissions"] = json!(k.permissions);
        }
        if l["enabled"] != k.enabled {
            what.push(format!("enabled {} → {}", l["enabled"], k.enabled));
            body["enabled"] = json!(k.enabled);
        }
        let live_exp = l["expires_at"].as_str().and_then(millis);
        let want_exp = match &k.expires_at {
            None => None,
            Some(t) => Some(millis(t).ok_or_else(|| {
                CliError::Usage(format!("key {label}: expires_at is not an RFC 3339 time"))
            })?),
        };
        if live_exp != want_exp {
            refuse_past(&label, k)?;
            what.push(format!(
                "expires_at {} → {}",
                s(&l["expires_at"]),
                k.expires_at.as_deref().unwrap_or("never")
            ));
            body["expires_at"] = json!(k.expires_at);
        }
        let want_limit = k
            .rate_limit
            .as_ref()
            .map(toml_to_json)
            .unwrap_or(Value::Null);
        if l["rate_limit"] != want_limit {
            what.push(format!(
                "rate_limit {} → {}",
                s(&l["rate_limit"]),
                s(&want_limit)
            ));
            body["rate_limit"] = want_limit;
        }
        if l["metadata"] != meta {
            what.push(format!("metadata {} → {}", s(&l["metadata"]), s(&meta)));
            body["metadata"] = meta;
        }
        let live_credits = &l["credits"];
        match (&k.credits, live_credits.is_object()) {
            (None, false) => {}
            (None, true) => {
                what.push("credits → none (unlimited)".into());
                body["credits"] = Value::Null;
            }
            (Some(c), false) => {
                let credits = c.body(&label, None)?;
                what.push(format!("credits none → {credits}"));
                body["credits"] = credits;
            }
            (Some(c), true) => {
                let live_refill = without_default(live_credits["refill"].clone(), "day", json!(1));
                if live_refill != c.refill_json() {
                    // New terms keep the balance read at the start of the run.
                    let credits = c.body(&label, live_credits["remaining"].as_u64())?;
                    what.push(format!(
                        "credits.refill {} → {}",
                        s(&live_refill),
                        s(&c.refill_json())
                    ));
                    body["credits"] = credits;
                }
            }
        }
        if !what.is_empty() {
            out.push(Change::UpdateKey {
                id: s(&l["id"]),
                label,
                body,
                what,
            });
        }
    }
    for (i, k) in want.keys.iter().enumerate() {
        if !matched.contains_key(&i) {
            let label = format!("{}/{}", k.client_id, k.name);
            parse_meta(&format!("key {label}"), &k.metadata)?;
            refuse_past(&label, k)?;
            out.push(Change::CreateKey { key: k.clone() });
        }
    }
    if let Some(hooks) = &want.webhooks {
        plan_webhooks(hooks, live, &mut out)?;
    }
    let mut deleted: Vec<&str> = deleted;
    deleted.sort();
    out.extend(deleted.into_iter().map(|c| Change::DeleteClient {
        client_id: c.into(),
    }));
    Ok(out)
}

/// Webhooks: matched by `id` when the file gives one that exists on the gateway, else by URL;
/// an unmatched one in the file is created, an unmatched one on the gateway deleted, a matched
/// one gets the file's URL and events. Webhooks of the configuration file are not touched.
fn plan_webhooks(
    want: &[WebhookState],
    live: &Live,
    out: &mut Vec<Change>,
) -> Result<(), CliError> {
    let Some(hooks) = &live.webhooks else {
        if want.is_empty() {
            return Ok(());
        }
        return Err(CliError::Usage(
            "the file lists webhooks, but this gateway's store keeps no event outbox (no \
             webhooks)"
                .into(),
        ));
    };
    for w in want {
        if w.events.is_empty() {
            return Err(CliError::Usage(format!(
                "webhook {}: events must name at least one event type, or be [\"*\"]",
                w.url
            )));
        }
    }
    let mut matched: HashMap<usize, &Value> = HashMap::new();
    let mut taken: HashSet<&str> = HashSet::new();
    for (i, w) in want.iter().enumerate() {
        let Some(id) = &w.id else { continue };
        let Some(l) = hooks.iter().find(|l| l["id"] == id.as_str()) else {
            continue;
        };
        if !taken.insert(id.as_str()) {
            return Err(CliError::Usage(format!("webhook {id} is listed twice")));
        }
        matched.insert(i, l);
    }
    for (i, w) in want.iter().enumerate() {
        if matched.contains_key(&i) {
            continue;
        }
        let candidates: Vec<&Value> = hooks
            .iter()
            .filter(|l| {
                l["url"] == w.url.as_str() && !taken.contains(l["id"].as_str().unwrap_or_default())
            })
            .collect();
        let twins = want
            .iter()
            .enumerate()
            .filter(|(j, o)| !matched.contains_key(j) && o.url == w.url)
            .count();
        if candidates.len() > 1 || twins > 1 {
            return Err(CliError::Usage(format!(
                "webhook {}: more than one webhook has this URL; give each its id",
                w.url
            )));
        }
        if let Some(l) = candidates.first() {
            taken.insert(l["id"].as_str().unwrap_or_default());
            matched.insert(i, l);
        }
    }
    for l in hooks {
        let id = l["id"].as_str().unwrap_or_default();
        if !taken.contains(id) {
            out.push(Change::DeleteWebhook {
                id: id.into(),
                url: s(&l["url"]),
            });
        }
    }
    for (i, w) in want.iter().enumerate() {
        let Some(l) = matched.get(&i) else {
            out.push(Change::CreateWebhook {
                url: w.url.clone(),
                events: w.events.clone(),
            });
            continue;
        };
        let mut body = json!({});
        let mut what = Vec::new();
        if l["url"] != w.url.as_str() {
            what.push(format!("url {} → {}", s(&l["url"]), w.url));
            body["url"] = json!(w.url);
        }
        let have = live_events(l);
        if event_set(&have) != event_set(&w.events) {
            what.push(format!(
                "events {} → {}",
                have.join(", "),
                w.events.join(", ")
            ));
            body["events"] = json!(w.events);
        }
        if !what.is_empty() {
            out.push(Change::UpdateWebhook {
                id: s(&l["id"]),
                url: w.url.clone(),
                body,
                what,
            });
        }
    }
    Ok(())
}

/// `keygate diff FILE`: exit 0 and nothing printed when nothing would change; else the
/// changes and exit 3.
pub async fn diff(admin: &Admin, path: &Path) -> Result<bool, CliError> {
    let want = read(path)?;
    let live = live(admin).await?;
    let changes = plan(&want, &live)?;
    for c in &changes {
        emit(c)?;
    }
    Ok(changes.is_empty())
}

fn key_body(k: &KeyState) -> Result<Value, CliError> {
    let mut body = json!({
        "client_id": k.client_id,
        "name": k.name,
        "permissions": k.permissions,
        "enabled": k.enabled,
    });
    if let Some(t) = &k.expires_at {
        body["expires_at"] = json!(t);
    }
    if let Some(r) = &k.rate_limit {
        body["rate_limit"] = toml_to_json(r);
    }
    let label = format!("{}/{}", k.client_id, k.name);
    let meta = parse_meta(&format!("key {label}"), &k.metadata)?;
    if !meta.is_null() {
        body["metadata"] = meta;
    }
    if let Some(c) = &k.credits {
        body["credits"] = c.body(&label, None)?;
    }
    Ok(body)
}

/// `keygate apply FILE`.
pub async fn apply(g: &Global, admin: &Admin, path: &Path) -> Result<(), CliError> {
    let want = read(path)?;
    let live = live(admin).await?;
    let changes = plan(&want, &live)?;
    if let Some(c) = changes.iter().find(|c| matches!(c, Change::Config { .. })) {
        return Err(CliError::Usage(format!(
            "{c}; nothing was changed (remove [plans] and [[routes]] from the file to apply \
             its clients and keys)"
        )));
    }
    // The first key the admin API gives each client apply creates, until a new key of the
    // file takes it over.
    let mut first_keys: HashMap<String, Value> = HashMap::new();
    let say = |c: &Change| if g.quiet { Ok(()) } else { emit(c) };
    let mut at = 0;
    let made = async {
        for (i, c) in changes.iter().enumerate() {
            at = i;
            match c {
                Change::CreateClient {
                    client_id,
                    license,
                    metadata,
                } => {
                    let mut body = json!({"client_id": client_id, "license": license});
                    if !metadata.is_null() {
                        body["metadata"] = metadata.clone();
                    }
                    let v = admin.send(Method::POST, "/v1/clients", &body).await?;
                    first_keys.insert(client_id.clone(), v["api_key"].clone());
                }
                Change::UpdateClient {
                    client_id, body, ..
                } => {
                    admin
                        .send(
                            Method::PATCH,
                            &format!("/v1/clients/{}", segment(client_id)),
                            body,
                        )
                        .await?;
                }
                Change::DeleteClient { client_id } => {
                    admin
                        .call(
                            Method::DELETE,
                            &format!("/v1/clients/{}", segment(client_id)),
                            None,
                        )
                        .await?;
                }
                Change::CreateKey { key } => {
                    let body = key_body(key)?;
                    let (v, secret) = match first_keys.get(&key.client_id).cloned() {
                        Some(first) => {
                            let id = s(&first["id"]);
                            let mut patch = body.clone();
                            if let Some(o) = patch.as_object_mut() {
                                o.remove("client_id");
                            }
                            if key.expires_at.is_none() {
                                patch["expires_at"] = Value::Null;
                            }
                            let v = admin
                                .send(
                                    Method::PATCH,
                                    &format!("/v1/api-keys/{}", segment(&id)),
                                    &patch,
                                )
                                .await?;
                            // Taken over: no longer the client's leftover first key.
                            first_keys.remove(&key.client_id);
                            (v, s(&first["key"]))
                        }
                        None => {
                            let v = admin.send(Method::POST, "/v1/api-keys", &body).await?;
                            let secret = s(&v["key"]);
                            (v, secret)
                        }
                    };
                    // The new secret, once, for whoever holds the key; a key whose secret
                    // cannot be shown is deleted again, so a rerun makes it anew.
                    if let Err(e) = say(c).and_then(|()| {
                        emit(format_args!(
                            "{}/{} {}: {secret}",
                            key.client_id,
                            key.name,
                            s(&v["id"])
                        ))
                    }) {
                        let what = format!("key {}/{}", key.client_id, key.name);
                        undo(
                            admin,
                            &what,
                            &format!("/v1/api-keys/{}", segment(&s(&v["id"]))),
                        )
                        .await;
                        return Err(e);
                    }
                    at = i + 1;
                    continue;
                }
                Change::UpdateKey { id, body, .. } => {
                    admin
                        .send(
                            Method::PATCH,
                            &format!("/v1/api-keys/{}", segment(id)),
                            body,
                        )
                        .await?;
                }
                Change::DeleteKey { id, .. } => {
                    admin
                        .call(
                            Method::DELETE,
                            &format!("/v1/api-keys/{}", segment(id)),
                            None,
                        )
                        .await?;
                }
                Change::CreateWebhook { url, events } => {
                    let v = admin
                        .send(
                            Method::POST,
                            "/v1/webhooks",
                            &json!({"url": url, "events": events}),
                        )
                        .await?;
                    // The new signing secret, once (like a new key's secret): the receiver
                    // needs it; a webhook whose secret cannot be shown is deleted again.
                    if let Err(e) = say(c).and_then(|()| {
                        emit(format_args!(
                            "webhook {url} {}: {}",
                            s(&v["id"]),
                            s(&v["secret"])
                        ))
                    }) {
                        let what = format!("webhook {url}");
                        undo(
                            admin,
                            &what,
                            &format!("/v1/webhooks/{}", segment(&s(&v["id"]))),
                        )
                        .await;
                        return Err(e);
                    }
                    at = i + 1;
                    continue;
                }
                Change::UpdateWebhook { id, body, .. } => {
                    admin
                        .send(
                            Method::PATCH,
                            &format!("/v1/webhooks/{}", segment(id)),
                            body,
                        )
                        .await?;
                }
                Change::DeleteWebhook { id, .. } => {
                    admin
                        .call(
                            Method::DELETE,
                            &format!("/v1/webhooks/{}", segment(id)),
                            None,
                        )
                        .await?;
                }
                Change::Config { .. } => {}
            }
            // Made: a failure to say so stops after it.
            at = i + 1;
            say(c)?;
        }
        Ok::<(), CliError>(())
    }
    .await;
    if let Err(e) = made {
        // The first keys made with clients this run and not yet taken over: gone, so a rerun
        // makes the file's keys anew and shows their secrets.
        for (client, first) in first_keys.drain() {
            let id = s(&first["id"]);
            let path = format!("/v1/api-keys/{}", segment(&id));
            match admin.call(Method::DELETE, &path, None).await {
                Ok(_) => eprintln!(
                    "keygate: - key {client}/{} (created with the client; removed, as apply stopped)",
                    s(&first["name"])
                ),
                Err(_) => eprintln!(
                    "keygate: key {client}/{} {id} (created with the client) could not be removed; delete it",
                    s(&first["name"])
                ),
            }
        }
        match changes.get(at) {
            Some(next) => eprintln!(
                "keygate: apply stopped at change {} of {} ({next}); the {at} before it stand; \
                 `keygate diff FILE` shows what is left",
                at + 1,
                changes.len(),
            ),
            None => eprintln!("keygate: apply stopped after its last change; all {at} stand"),
        }
        return Err(e);
    }
    // New clients the file gives no key: their automatic first key goes.
    for (client, first) in first_keys {
        admin
            .call(
                Method::DELETE,
                &format!("/v1/api-keys/{}", segment(&s(&first["id"]))),
                None,
            )
            .await?;
        if !g.quiet {
            emit(format_args!(
                "- key {client}/{} (created with the client)",
                s(&first["name"])
            ))?;
        }
    }
    Ok(())
}

/// Deletes what apply just made and could not show the secret of (`what` at `path`), saying so.
async fn undo(admin: &Admin, what: &str, path: &str) {
    match admin.call(Method::DELETE, path, None).await {
        Ok(_) => eprintln!("keygate: - {what} (its secret could not be shown; removed)"),
        Err(_) => eprintln!(
            "keygate: {what} was made but its secret could not be shown nor the {what} \
             removed; delete it"
        ),
    }
}
