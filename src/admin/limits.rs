//! Credits and quotas on the admin API: `POST /v1/api-keys/{id}/credits` (`{"add": n}` or
//! `{"set": n}`), the credit terms given on create and PATCH ([`CreditsBody`]), and
//! `GET /v1/clients/{client_id}/usage` (the client's quota in the current period and the
//! credits of its keys). A client principal may read its own credits and quota, never change
//! them.

use axum::Json;
use axum::extract::{Extension, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{AdminError, ErrorResponses, FieldError, JsonBody, Path};
use super::keys::{audit, load};
use super::{AdminState, Caller, rfc3339};
use crate::keys::allowance::{Credits, CreditsWrite, CreditsWritten, MAX_CREDITS, Period, Refill};
use crate::keys::{ApiKey, Millis, now_millis};

/// A key's credits as shown: what is left now (a refill that is due counted), and the refill.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(examples(json!({
    "remaining": 9500,
    "refill": {"amount": 10000, "interval": "monthly", "day": 1},
    "next_refill_at": "2027-01-01T00:00:00.000Z"
})))]
pub struct CreditsView {
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    pub remaining: u64,
    pub refill: Option<Refill>,
    /// When the next refill sets `remaining` to `refill.amount` (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub next_refill_at: Option<String>,
}

impl CreditsView {
    pub fn of(c: Credits, now: Millis) -> Self {
        let c = c.at(now);
        CreditsView {
            remaining: c.remaining,
            refill: c.refill,
            next_refill_at: c.refill.map(|r| rfc3339(r.next_at(now))),
        }
    }
}

/// Credit terms on create or PATCH: `remaining` now and an optional refill.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsBody {
    /// 0–10^15.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    pub remaining: u64,
    pub refill: Option<Refill>,
}

impl CreditsBody {
    /// The write, or the problems of the body.
    pub fn write(&self, errs: &mut Vec<FieldError>) -> CreditsWrite {
        if self.remaining > MAX_CREDITS {
            errs.push(FieldError::new(
                "credits.remaining",
                "must be from 0 to 10^15",
            ));
        }
        if let Some(why) = self.refill.as_ref().and_then(Refill::problem) {
            errs.push(FieldError::new("credits.refill", why));
        }
        CreditsWrite::Set {
            remaining: self.remaining,
            refill: self.refill,
        }
    }
}

/// `{"add": n}` or `{"set": n}`: exactly one of the two, a number (never null).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1, max_properties = 1, examples(json!({"add": 5000})))]
pub struct CreditsChange {
    /// Credits to add to what is left (after any refill that is due), 0–10^15. The sum may not
    /// pass 10^15 (422, nothing changed): a rule on the stored value no schema keyword can state.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = u64, minimum = 0, maximum = 1_000_000_000_000_000_i64, examples(5000))]
    pub add: Option<u64>,
    /// What is left from now on, 0–10^15 (the refill, if any, is kept).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = u64, minimum = 0, maximum = 1_000_000_000_000_000_i64, examples(10000))]
    pub set: Option<u64>,
}

/// A field that may be absent but, when given, is a number: `null` is refused.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(d).map(Some)
}

/// Only an admin changes credits (a client principal gets 403, whatever the change).
pub fn admin_sets_credits(caller: &Caller) -> Result<(), AdminError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Client { .. } => Err(AdminError::Forbidden(
            "only an admin can set credits".into(),
        )),
    }
}

/// Writes a key's credits; the answer is what the key has now.
pub async fn write(
    state: &AdminState,
    key: &ApiKey,
    write: CreditsWrite,
) -> Result<Option<CreditsView>, AdminError> {
    let now = now_millis();
    match state.store.write_credits(key.id, &write, now).await? {
        CreditsWritten::Done(c) => {
            // New terms reach this instance's cache at once (the store tells the others).
            state.invalidate(std::slice::from_ref(key));
            Ok(c.map(|c| CreditsView::of(c, now)))
        }
        CreditsWritten::NoKey => Err(AdminError::NotFound("no API key with this id")),
        CreditsWritten::TooMany => Err(AdminError::Validation(vec![FieldError::new(
            "credits",
            "a key holds at most 10^15 credits; nothing was changed",
        )])),
    }
}

/// The credits of a key, as shown.
pub async fn view(state: &AdminState, key_id: Uuid) -> Result<Option<CreditsView>, AdminError> {
    let now = now_millis();
    Ok(state
        .store
        .credits(key_id)
        .await?
        .map(|c| CreditsView::of(c, now)))
}

/// Adds to or sets a key's credits (an admin only). A key without credits gets credits
/// without refill.
#[utoipa::path(post, path = "/v1/api-keys/{id}/credits", operation_id = "change_credits", tag = "keys",
    request_body = CreditsChange,
    params(("id" = String, Path, format = Uuid, description = "Key id (a key of another client answers 404)", example = "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d")),
    responses((status = 200, description = "The key's credits after the change", body = CreditsView), ErrorResponses))]
pub async fn change(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreditsChange>,
) -> Result<Json<CreditsView>, AdminError> {
    admin_sets_credits(&caller)?;
    let w = match (body.add, body.set) {
        (Some(n), None) => CreditsWrite::Add(n),
        (None, Some(n)) => CreditsWrite::SetRemaining(n),
        _ => {
            return Err(AdminError::Validation(vec![FieldError::new(
                "add",
                "give exactly one of add and set",
            )]));
        }
    };
    if let CreditsWrite::Add(n) | CreditsWrite::SetRemaining(n) = w
        && n > MAX_CREDITS
    {
        return Err(AdminError::Validation(vec![FieldError::new(
            if body.add.is_some() { "add" } else { "set" },
            "must be from 0 to 10^15",
        )]));
    }
    let key = load(&state, &caller, &id).await?;
    let view = write(&state, &key, w)
        .await?
        .ok_or(AdminError::NotFound("no API key with this id"))?;
    audit("key.credits", &caller, &key);
    Ok(Json(view))
}

/// A quota's use in the current period.
#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({"requests": 100000, "per": "month", "used": 4200, "remaining": 95800,
    "period_start": "2026-12-01T00:00:00.000Z", "resets_at": "2027-01-01T00:00:00.000Z"})))]
pub struct QuotaView {
    pub requests: u64,
    pub per: Period,
    pub used: u64,
    pub remaining: u64,
    /// When the current period started and when the next one starts (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub period_start: String,
    #[schema(format = DateTime)]
    pub resets_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyCredits {
    #[schema(format = Uuid)]
    pub id: String,
    pub name: String,
    pub credits: CreditsView,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(examples(json!({
    "client_id": "acme",
    "license": "pro",
    "quota": {"requests": 100000, "per": "month", "used": 4200, "remaining": 95800,
        "period_start": "2026-12-01T00:00:00.000Z", "resets_at": "2027-01-01T00:00:00.000Z"},
    "credits": [{"id": "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d", "name": "billing backend",
        "credits": {"remaining": 9500, "refill": null, "next_refill_at": null}}]
})))]
pub struct ClientUsage {
    pub client_id: String,
    pub license: String,
    /// The plan's quota in the current period (null: the plan has none).
    pub quota: Option<QuotaView>,
    /// The client's keys that have credits.
    pub credits: Vec<KeyCredits>,
}

/// A client's quota use in the current period and the credits of its keys. A client
/// principal may read its own.
#[utoipa::path(get, path = "/v1/clients/{client_id}/usage", operation_id = "client_usage", tag = "clients",
    params(("client_id" = String, Path, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|[.][A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|[.][.][A-Za-z0-9._-]{1,62})$", example = "acme")),
    responses((status = 200, description = "The client's quota in the current period and the credits of its keys", body = ClientUsage), ErrorResponses))]
pub async fn client_usage(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(client_id): Path<String>,
) -> Result<Json<ClientUsage>, AdminError> {
    const NO_CLIENT: &str = "no client with this client_id";
    if let Caller::Client { client_id: own, .. } = &caller
        && *own != client_id
    {
        return Err(AdminError::NotFound(NO_CLIENT));
    }
    let client = state
        .store
        .get_client(&client_id)
        .await?
        .ok_or(AdminError::NotFound(NO_CLIENT))?;
    let now = now_millis();
    let quota = match state.auth.limits().quota(&client.license) {
        Some(q) => {
            let index = q.per.index(now);
            let used = state.store.quota_used(&client_id, q.per, index).await?;
            Some(QuotaView {
                requests: q.requests,
                per: q.per,
                used: used.min(q.requests),
                remaining: q.requests.saturating_sub(used),
                period_start: rfc3339(q.per.start(index)),
                resets_at: rfc3339(q.per.start(index + 1)),
            })
        }
        None => None,
    };
    let keys = super::all_keys_of(state.store.as_ref(), &client_id).await?;
    let mut credits = Vec::new();
    for k in keys {
        if let Some(c) = state.store.credits(k.id).await? {
            credits.push(KeyCredits {
                id: k.id.to_string(),
                name: k.name.clone(),
                credits: CreditsView::of(c, now),
            });
        }
    }
    Ok(Json(ClientUsage {
        client_id: client.client_id,
        license: client.license,
        quota,
        credits,
    }))
}
