//! `[[webhooks]]`, `[events]` and `[secret_scanning]`: where events are delivered, how
//! deliveries are retried, and how leaked-key reports are handled.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

/// Event type names a webhook may subscribe to (`"*"`: all of them).
pub const EVENT_TYPES: [&str; 9] = [
    "key.created",
    "key.updated",
    "key.rotated",
    "key.revoked",
    "key.expiring",
    "key.leaked",
    "client.created",
    "client.deleted",
    "quota.threshold",
];

/// The path of the leaked-key report endpoint on the proxy listener.
pub const SECRET_SCANNING_PATH: &str = "/_keygate/secret-scanning/github";

/// `events = "*"` or a list of names.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum RawEventList {
    One(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    #[serde(default = "d_all")]
    pub events: RawEventList,
    /// `whsec_` + base64 of 24 to 64 bytes.
    pub secret: String,
    /// The secret `secret` replaces, signed with beside it for as long as it is here (a
    /// rotation: receivers move to the new one, then this line goes).
    pub previous_secret: Option<String>,
}

fn d_all() -> RawEventList {
    RawEventList::One("*".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvents {
    /// How often the outbox is looked at for due deliveries.
    #[serde(default = "d_poll")]
    pub poll_interval_ms: u64,
    /// The first retry waits this long; each next one twice as long as the one before.
    #[serde(default = "d_retry_base")]
    pub retry_base_ms: u64,
    /// The longest wait between two attempts.
    #[serde(default = "d_retry_max")]
    pub retry_max_ms: u64,
    /// An event not delivered this long after it happened is given up (marked failed).
    #[serde(default = "d_give_up")]
    pub give_up_after_secs: u64,
    /// Time allowed for one attempt (connect, send, response head).
    #[serde(default = "d_timeout")]
    pub request_timeout_ms: u64,
    /// How often keys are checked for an expiry 7 days or 1 day away.
    #[serde(default = "d_expiry_check")]
    pub expiry_check_interval_ms: u64,
    /// PEM CA bundle that replaces the webpki roots for `https://` webhooks.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn d_poll() -> u64 {
    1_000
}
fn d_retry_base() -> u64 {
    5_000
}
fn d_retry_max() -> u64 {
    3_600_000
}
fn d_give_up() -> u64 {
    86_400
}
fn d_timeout() -> u64 {
    10_000
}
fn d_expiry_check() -> u64 {
    3_600_000
}

impl Default for RawEvents {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretScanning {
    #[serde(default)]
    pub enabled: bool,
    /// GitHub's public keys, in the JSON format of
    /// `https://api.github.com/meta/public_keys/secret_scanning`.
    #[serde(default)]
    pub github_keys_file: Option<PathBuf>,
    #[serde(default)]
    pub action: LeakAction,
}

impl Default for RawSecretScanning {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// What a report of a live key does.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LeakAction {
    /// Disable the key at once (as an admin would), then notify.
    #[default]
    Revoke,
    /// Notify only (`key.leaked`, the audit line); the key keeps working.
    Notify,
}

impl LeakAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakAction::Revoke => "revoke",
            LeakAction::Notify => "notify",
        }
    }
}

/// A webhook from the configuration file.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    pub previous_secret: Option<String>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"***")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    pub poll_interval: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub give_up_after: Duration,
    pub request_timeout: Duration,
    pub expiry_check_interval: Duration,
    /// `None`: webhooks are verified against the webpki roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretScanning {
    /// `None`: the endpoint is off.
    pub github_keys_file: Option<PathBuf>,
    pub action: LeakAction,
}

/// Why `url` cannot receive webhooks, if it cannot.
pub fn url_problem(url: &str) -> Option<&'static str> {
    if url.len() > 2048 {
        return Some("is longer than 2048 characters");
    }
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Some("is not a URL");
    };
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Some("must be an http:// or https:// URL"),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Some("has no host");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some("must not carry credentials (user:password@)");
    }
    None
}

/// Whether two event lists name the same event types, in any order and however often.
fn same_events(a: &[String], b: &[String]) -> bool {
    fn set(l: &[String]) -> Vec<&str> {
        let mut l: Vec<&str> = l.iter().map(String::as_str).collect();
        l.sort_unstable();
        l.dedup();
        l
    }
    set(a) == set(b)
}

/// The event list, or why it is not one.
pub fn event_list(raw: &RawEventList) -> Result<Vec<String>, String> {
    let list = match raw {
        RawEventList::One(s) => vec![s.clone()],
        RawEventList::List(l) => l.clone(),
    };
    if list.is_empty() {
        return Err("must name at least one event type, or be \"*\"".into());
    }
    for e in &list {
        if e != "*" && !EVENT_TYPES.contains(&e.as_str()) {
            return Err(format!(
                "{e:?} is not an event type; use \"*\" or some of {}",
                EVENT_TYPES.join(", ")
            ));
        }
    }
    Ok(list)
}

/// `list` as the admin API keeps it: each name once, in the order given; `*` beside names is
/// every type, so it stands alone. (A configured list is kept as written: its webhook's id is
/// made from it.)
pub fn each_once(list: Vec<String>) -> Vec<String> {
    if list.iter().any(|e| e == "*") {
        return vec!["*".into()];
    }
    let mut seen = Vec::with_capacity(list.len());
    for e in list {
        if !seen.contains(&e) {
            seen.push(e);
        }
    }
    seen
}

pub(super) fn webhooks(raw: Vec<RawWebhook>, errors: &mut Vec<String>) -> Vec<WebhookConfig> {
    let mut out = Vec::new();
    for (i, w) in raw.into_iter().enumerate() {
        let mut ok = true;
        if let Some(why) = url_problem(&w.url) {
            errors.push(format!("webhooks[{i}].url {why}"));
            ok = false;
        }
        let events = match event_list(&w.events) {
            Ok(e) => e,
            Err(why) => {
                errors.push(format!("webhooks[{i}].events {why}"));
                ok = false;
                Vec::new()
            }
        };
        let is_secret = |s: &str| {
            s.strip_prefix("whsec_")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .is_some_and(|k| (24..=64).contains(&k.len()))
        };
        let given = [
            ("secret", Some(w.secret.as_str())),
            ("previous_secret", w.previous_secret.as_deref()),
        ];
        for (field, secret) in given {
            if secret.is_some_and(|s| !is_secret(s)) {
                errors.push(format!(
                    "webhooks[{i}].{field} must be \"whsec_\" + standard base64 of 24 to 64 random bytes (e.g. `echo whsec_$(openssl rand -base64 32)`)"
                ));
                ok = false;
            }
        }
        if w.previous_secret.as_ref() == Some(&w.secret) {
            errors.push(format!(
                "webhooks[{i}].previous_secret is the same as secret; give the new secret as secret"
            ));
            ok = false;
        }
        if ok
            && out
                .iter()
                .any(|o: &WebhookConfig| o.url == w.url && same_events(&o.events, &events))
        {
            errors.push(format!(
                "webhooks[{i}] repeats an earlier webhook (same url and events); remove one"
            ));
            ok = false;
        }
        if ok {
            out.push(WebhookConfig {
                url: w.url,
                events,
                secret: w.secret,
                previous_secret: w.previous_secret,
            });
        }
    }
    out
}

pub(super) fn events(raw: &RawEvents, errors: &mut Vec<String>) -> EventsConfig {
    for (name, v) in [
        ("poll_interval_ms", raw.poll_interval_ms),
        ("retry_base_ms", raw.retry_base_ms),
        ("retry_max_ms", raw.retry_max_ms),
        ("request_timeout_ms", raw.request_timeout_ms),
        ("expiry_check_interval_ms", raw.expiry_check_interval_ms),
        ("give_up_after_secs", raw.give_up_after_secs),
    ] {
        if v == 0 {
            errors.push(format!("events.{name} must be greater than 0"));
        }
    }
    // Upper bounds where a larger value would overflow a time in milliseconds.
    for (name, v, most) in [
        ("retry_max_ms", raw.retry_max_ms, 86_400_000),
        ("give_up_after_secs", raw.give_up_after_secs, 30 * 86_400),
    ] {
        if v > most {
            errors.push(format!("events.{name} must be at most {most}"));
        }
    }
    if raw.retry_max_ms < raw.retry_base_ms {
        errors.push("events.retry_max_ms must not be below events.retry_base_ms".into());
    }
    if let Some(path) = &raw.ca_file {
        if let Err(e) = std::fs::metadata(path) {
            errors.push(format!("events.ca_file {}: {e}", path.display()));
        } else if let Err(e) = crate::tls::client_config(Some(path)) {
            errors.push(format!("events.ca_file: {e}"));
        }
    }
    EventsConfig {
        ca_file: raw.ca_file.clone(),
        poll_interval: Duration::from_millis(raw.poll_interval_ms.max(1)),
        retry_base: Duration::from_millis(raw.retry_base_ms.max(1)),
        retry_max: Duration::from_millis(raw.retry_max_ms.max(1)),
        give_up_after: Duration::from_secs(raw.give_up_after_secs.max(1)),
        request_timeout: Duration::from_millis(raw.request_timeout_ms.max(1)),
        expiry_check_interval: Duration::from_millis(raw.expiry_check_interval_ms.max(1)),
    }
}

pub(super) fn secret_scanning(raw: RawSecretScanning, errors: &mut Vec<String>) -> SecretScanning {
    if !raw.enabled {
        return SecretScanning {
            github_keys_file: None,
            action: raw.action,
        };
    }
    match raw.github_keys_file {
        None => {
            errors.push(
                "secret_scanning.github_keys_file is required when secret_scanning.enabled = true (GitHub's public keys, saved from https://api.github.com/meta/public_keys/secret_scanning)"
                    .into(),
            );
            SecretScanning {
                github_keys_file: None,
                action: raw.action,
            }
        }
        Some(path) => {
            // Read and parsed as `serve` does, so a file it would refuse is refused here.
            if let Err(e) = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| github_keys(&text).map(|_| ()))
            {
                errors.push(format!(
                    "secret_scanning.github_keys_file {}: {e}",
                    path.display()
                ));
            }
            SecretScanning {
                github_keys_file: Some(path),
                action: raw.action,
            }
        }
    }
}

/// DER prefix of a SubjectPublicKeyInfo of an uncompressed P-256 point (id-ecPublicKey,
/// prime256v1, a 66-byte BIT STRING).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// One of GitHub's public keys (secret scanning).
#[derive(Clone)]
pub struct GithubKey {
    pub identifier: String,
    /// The uncompressed point (65 bytes).
    pub point: Vec<u8>,
}

#[derive(Deserialize)]
struct KeysFile {
    public_keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
struct KeyEntry {
    key_identifier: String,
    key: String,
}

/// The uncompressed P-256 point of a PEM `PUBLIC KEY`.
fn p256_point(pem: &str) -> Result<Vec<u8>, String> {
    let b64: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| format!("not PEM: {e}"))?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        _ => Err("not an ECDSA P-256 public key".into()),
    }
}

/// Parses GitHub's published key list (`[secret_scanning] github_keys_file`).
pub fn github_keys(json: &[u8]) -> Result<Vec<GithubKey>, String> {
    let file: KeysFile = serde_json::from_slice(json).map_err(|e| {
        format!("expected {{\"public_keys\": [{{\"key_identifier\", \"key\"}}]}}: {e}")
    })?;
    if file.public_keys.is_empty() {
        return Err("public_keys is empty".into());
    }
    file.public_keys
        .into_iter()
        .map(|k| {
            Ok(GithubKey {
                point: p256_point(&k.key)
                    .map_err(|e| format!("key {:?}: {e}", k.key_identifier))?,
                identifier: k.key_identifier,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(l: &[&str]) -> RawEventList {
        RawEventList::List(l.iter().map(|s| (*s).to_owned()).collect())
    }

    /// A webhook's secret and previous secret: each `whsec_` + base64 of 24 to 64 bytes, and
    /// not the same.
    #[test]
    fn webhook_secrets_and_previous_secrets_are_checked() {
        const A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        const B: &str = "whsec_c2Vjb25kIHNlY3JldCBvZiB0aGlydHkgdHdvIGJ5dGVz";
        let raw = |secret: &str, previous: Option<&str>| RawWebhook {
            url: "https://hooks.example.com/a".into(),
            events: d_all(),
            secret: secret.into(),
            previous_secret: previous.map(Into::into),
        };
        let mut errors = Vec::new();
        let mut other = raw(B, None);
        other.url = "https://hooks.example.com/b".into();
        let taken = webhooks(vec![raw(A, Some(B)), other], &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            taken
                .iter()
                .map(|w| w.previous_secret.as_deref())
                .collect::<Vec<_>>(),
            [Some(B), None]
        );
        for (w, expected) in [
            (
                raw(A, Some("whsec_c2hvcnQ=")),
                "webhooks[0].previous_secret must be \"whsec_\"",
            ),
            (
                raw(A, Some(&A[6..])),
                "webhooks[0].previous_secret must be \"whsec_\"",
            ),
            (
                raw("whsec_not base64", None),
                "webhooks[0].secret must be \"whsec_\"",
            ),
            (
                raw(A, Some(A)),
                "webhooks[0].previous_secret is the same as secret",
            ),
        ] {
            let mut errors = Vec::new();
            assert!(webhooks(vec![w], &mut errors).is_empty());
            assert!(errors.iter().any(|e| e.contains(expected)), "{errors:?}");
            assert!(!errors.iter().any(|e| e.contains(&A[6..])), "{errors:?}");
        }
    }

    #[test]
    fn an_api_event_list_names_each_type_once_and_star_alone() {
        let api = |l: &[&str]| event_list(&list(l)).map(each_once);
        assert_eq!(
            api(&["key.revoked", "key.created", "key.revoked"]).unwrap(),
            ["key.revoked", "key.created"]
        );
        assert_eq!(api(&["key.created", "*", "key.created"]).unwrap(), ["*"]);
        assert_eq!(api(&["*"]).unwrap(), ["*"]);
        assert!(api(&[]).is_err());
        assert!(api(&["*", "key.gone"]).is_err());
        // The configuration's list as written (its webhook id depends on it).
        assert_eq!(
            event_list(&list(&["key.created", "key.created"])).unwrap(),
            ["key.created", "key.created"]
        );
    }
}
