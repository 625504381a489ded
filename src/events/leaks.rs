//! Leaked-key reports in GitHub's secret scanning partner format, on the proxy listener at
//! [`crate::config::events::SECRET_SCANNING_PATH`] when `[secret_scanning] enabled = true`.
//!
//! A report is a JSON list of `{token, type, url, source}`, signed by GitHub: the header
//! `Github-Public-Key-Identifier` names one of GitHub's public keys (read at start from
//! `[secret_scanning] github_keys_file`, in the format GitHub publishes them:
//! `{"public_keys": [{"key_identifier", "key" (PEM), "is_current"}]}`), and
//! `Github-Public-Key-Signature` is the base64 of a DER ECDSA P-256 / SHA-256 signature over the
//! raw body. A report that is unsigned, names an unknown key, or whose signature does not verify
//! is refused (401) before anything else is read.
//!
//! Each token that is a keygate key known to the store is a true positive: with `action =
//! "revoke"` an enabled key is disabled at once, as an admin would (the store's write and its
//! invalidation reach every instance), and in every case `key.leaked` is written to the outbox
//! and an audit line is logged, with the key's id and the report's `url`, never the token.
//! Anything else is labelled a false positive. The answer lists every token, by SHA-256 only.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Events;
use crate::config::events::{GithubKey, LeakAction, github_keys};
use crate::keys::cache::KeyCache;
use crate::keys::outbox::{EventType, NewEvent};
use crate::keys::store::{KeyPatch, Store, StoreError};
use crate::keys::{ApiKey, KeyFormat, KeyHash, SetBy, now_millis};

/// Largest report body read (GitHub sends up to 1,000 tokens per request).
pub const MAX_BODY: usize = 1 << 20;
#[derive(Deserialize)]
struct Reported {
    token: String,
    #[serde(rename = "type", default)]
    token_type: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Serialize)]
struct Label {
    token_hash: String,
    token_type: String,
    label: &'static str,
}

/// The leak endpoint: GitHub's keys, the action, and what it acts on.
pub struct LeakReports {
    keys: Vec<GithubKey>,
    action: LeakAction,
    format: KeyFormat,
    store: Arc<dyn Store>,
    cache: KeyCache,
    events: Option<Arc<Events>>,
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response<Bytes> {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut res = Response::new(Bytes::from(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

/// The answer to a report body larger than [`MAX_BODY`].
pub fn too_large() -> Response<Bytes> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "a report body is at most 1 MiB",
    )
}

impl LeakReports {
    /// Reads GitHub's keys from `keys_file`.
    pub fn load(
        keys_file: &std::path::Path,
        action: LeakAction,
        format: KeyFormat,
        store: Arc<dyn Store>,
        cache: KeyCache,
        events: Option<Arc<Events>>,
    ) -> Result<Self, String> {
        let text = std::fs::read(keys_file).map_err(|e| {
            format!(
                "secret_scanning.github_keys_file {}: {e}",
                keys_file.display()
            )
        })?;
        let keys = github_keys(&text).map_err(|e| {
            format!(
                "secret_scanning.github_keys_file {}: {e}",
                keys_file.display()
            )
        })?;
        Ok(Self {
            keys,
            action,
            format,
            store,
            cache,
            events,
        })
    }

    /// True when the report carries a valid signature of one of GitHub's keys.
    fn verified(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let (Some(id), Some(sig)) = (
            headers.get("github-public-key-identifier"),
            headers.get("github-public-key-signature"),
        ) else {
            return false;
        };
        let Some(key) = self
            .keys
            .iter()
            .find(|k| k.identifier.as_bytes() == id.as_bytes())
        else {
            return false;
        };
        let Ok(sig) = STANDARD.decode(sig.as_bytes()) else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &key.point,
        )
        .verify(body, &sig)
        .is_ok()
    }

    /// Answers one report.
    pub async fn handle(&self, headers: &HeaderMap, body: &[u8]) -> Response<Bytes> {
        if body.len() > MAX_BODY {
            return too_large();
        }
        if !self.verified(headers, body) {
            // Audited by the caller, which counts it as a failed authentication.
            return problem(
                StatusCode::UNAUTHORIZED,
                "invalid_signature",
                "the report must be signed with one of GitHub's secret scanning keys",
            );
        }
        let Ok(reports) = serde_json::from_slice::<Vec<Reported>>(body) else {
            return problem(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected a JSON list of {\"token\", \"type\", \"url\", \"source\"}",
            );
        };
        let mut labels = Vec::with_capacity(reports.len());
        let mut seen = std::collections::HashSet::new();
        for r in &reports {
            let hash = KeyHash::of(&r.token);
            let live = if self.format.check(&r.token) {
                match self.act(&hash, r, !seen.insert(hash.0)).await {
                    Ok(known) => known,
                    Err(e) => {
                        tracing::error!(error = %e, "leaked-key report: the store failed; answered 503 for GitHub to send it again");
                        let mut res = problem(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "store_unavailable",
                            "the store is unavailable; send the report again",
                        );
                        res.headers_mut()
                            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
                        return res;
                    }
                }
            } else {
                false
            };
            labels.push(Label {
                token_hash: hex::encode(hash.0),
                token_type: r.token_type.clone(),
                label: if live {
                    "true_positive"
                } else {
                    "false_positive"
                },
            });
        }
        let mut res = Response::new(Bytes::from(
            serde_json::to_vec(&labels).expect("serializable"),
        ));
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res
    }

    /// Applies the action to the key with this hash, if there is one; true when there is.
    /// `repeat`: the same token came earlier in this report (labelled again, acted on once).
    async fn act(&self, hash: &KeyHash, r: &Reported, repeat: bool) -> Result<bool, StoreError> {
        let now = now_millis();
        let Some(record) = self.store.find_by_hash(hash, now).await? else {
            return Ok(false);
        };
        if repeat {
            return Ok(true);
        }
        let mut key = record.key;
        let report = json!({"url": r.url, "source": r.source, "token_type": r.token_type});
        // A revoke writes `key.leaked` in the same atomic step as the disable (`KeyPatch::leak`):
        // a store failure leaves neither, and GitHub's resend finds the key still enabled.
        let mut written = false;
        // A key its client disabled is disabled again by the admin: a client may enable its own
        // disable, never a leak's.
        let admin_disabled =
            !key.enabled && key.clone().with_setters_known().disabled_by == Some(SetBy::Admin);
        let taken = match self.action {
            LeakAction::Revoke if !admin_disabled => {
                let patch = KeyPatch {
                    enabled: Some(false),
                    by: SetBy::Admin,
                    leak: Some(report.clone()),
                    ..KeyPatch::default()
                };
                let after = self.store.patch_key(key.id, &patch, now).await?;
                // The secrets read above and those the write found (a rotation in between).
                for h in key.hashes().chain(after.iter().flat_map(ApiKey::hashes)) {
                    self.cache.invalidate(&h);
                }
                self.cache.invalidate_id(&key.id);
                match after {
                    // The event's `action` is what the write found (`already_disabled` when
                    // the key was disabled before: by its client, or by another writer since
                    // it was read above).
                    Some(after) => {
                        written = true;
                        let taken = if key.enabled {
                            "revoked"
                        } else {
                            "already_disabled"
                        };
                        key = after;
                        taken
                    }
                    // Deleted in the meantime: nothing left to revoke.
                    None => "already_deleted",
                }
            }
            LeakAction::Revoke => "already_disabled",
            LeakAction::Notify => "notified",
        };
        if written {
            if let Some(events) = &self.events {
                events.wake();
            }
        } else {
            let mut data = report;
            data["action"] = taken.into();
            let event = NewEvent::key(EventType::KeyLeaked, &key, now, data);
            match &self.events {
                Some(events) => events.emit(&[event]).await?,
                None => {
                    if let Some(o) = self.store.outbox() {
                        o.emit(&[event]).await?;
                    }
                }
            }
        }
        tracing::warn!(
            target: "keygate::audit",
            action = "key.leaked",
            key_id = %key.id,
            client_id = %key.client_id,
            url = r.url.as_deref().unwrap_or(""),
            source = r.source.as_deref().unwrap_or(""),
            outcome = taken,
            "a key was reported as leaked"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_key_files_are_parsed_and_bad_ones_refused() {
        // A P-256 key made for this test (openssl ecparam -name prime256v1 -genkey).
        let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2Es6jA3H/6TCwJhI0VM012pb6oG/\nvQzjnbtmy8bTfOvYm0MyeFc6v00/zm5SisOyzS/eszzEqWIDsEBJR04rRQ==\n-----END PUBLIC KEY-----\n";
        let json =
            json!({"public_keys": [{"key_identifier": "abc", "key": pem, "is_current": true}]});
        let keys = github_keys(json.to_string().as_bytes()).unwrap();
        assert_eq!(keys[0].identifier, "abc");
        assert_eq!(keys[0].point.len(), 65);
        assert!(github_keys(b"{}").is_err());
        assert!(github_keys(br#"{"public_keys": []}"#).is_err());
        let bad = json!({"public_keys": [{"key_identifier": "x", "key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}]});
        assert!(github_keys(bad.to_string().as_bytes()).is_err());
    }
}
