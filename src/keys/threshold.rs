//! `quota.threshold`: the event a charge writes when it takes a client's quota or a key's
//! credits across 80 % and across 100 % of their amount.
//!
//! When it fires (every store applies these same rules inside the charge's own transaction or
//! script, so the event exists exactly when the charge does):
//! - **Quota** (per client and calendar period): the amount is the plan's `requests`; the
//!   request that takes the period's count from below `ceil(80 % × requests)` to it fires
//!   threshold 80, the one that reaches `requests` fires 100. A period's count only grows, so
//!   each fires at most once per period. (A quota lowered mid-period below what was already
//!   used fires nothing more for that period.)
//! - **Credits** (per key): the amount is the refill's `amount` for credits with a refill, and
//!   for credits without a refill the balance right after the admin's last set or add. A
//!   threshold fires when the credits used (`amount − remaining`) reach it and it has not fired
//!   yet since the last refill (with a refill) or since the last set/add of the credits (without
//!   one); an admin's add to refilled credits does not fire it again in the same period.
//!   One charge may fire both thresholds.
//!
//! A charge that crosses nothing writes nothing and costs no more than before.

use serde_json::json;

use super::Millis;
use super::allowance::{Period, Refill};
use super::outbox::{EventType, NewEvent};

/// The thresholds, in percent of the amount, in the order they are reached.
pub const THRESHOLDS: [u8; 2] = [80, 100];

/// The used count at which `percent` of `limit` is reached: `ceil(limit × percent / 100)`,
/// computed without overflow (the Redis scripts compute it the same way, exact in doubles).
pub fn mark(limit: u64, percent: u8) -> u64 {
    let p = u64::from(percent);
    p * (limit / 100) + (p * (limit % 100)).div_ceil(100)
}

/// The thresholds a quota count crosses going from `before` to `after` requests used.
pub fn quota_crossed(limit: u64, before: u64, after: u64) -> impl Iterator<Item = u8> {
    THRESHOLDS.into_iter().filter(move |&t| {
        let m = mark(limit, t);
        limit > 0 && before < m && m <= after
    })
}

/// The thresholds credits fire at `used` of `limit`, given the highest one already fired
/// since the last refill or set/add (`alerted`, 0 for none).
pub fn credits_crossed(limit: u64, used: u64, alerted: u8) -> impl Iterator<Item = u8> {
    THRESHOLDS
        .into_iter()
        .filter(move |&t| limit > 0 && t > alerted && used >= mark(limit, t))
}

/// What a crossing was of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Of<'a> {
    /// A plan quota in calendar period `index` of `per`.
    Quota { per: Period, index: i64 },
    /// A key's credits, with their refill if any.
    Credits {
        key_id: &'a str,
        refill: Option<Refill>,
    },
}

/// One threshold crossed by a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing<'a> {
    pub of: Of<'a>,
    pub client_id: &'a str,
    /// 80 or 100.
    pub threshold: u8,
    /// The amount the percentages are of.
    pub limit: u64,
    /// Used after the charge.
    pub used: u64,
}

impl Crossing<'_> {
    /// The event, ordered with the client's events (quota) or the key's (credits). Its data:
    /// `kind` (`"quota"` | `"credits"`), `client_id`, `key_id` (credits; `null` for a quota),
    /// `threshold`, `limit`, `used`, `remaining`, `period` (`"hour"|"day"|"month"` for a
    /// quota, the refill interval `"daily"|"monthly"` for credits, `null` without refill),
    /// `period_start` (a quota's period) and `resets_at` (the next period or refill; `null`
    /// for credits without refill). Ids and numbers only.
    pub fn event(&self, at: Millis) -> NewEvent {
        let remaining = self.limit.saturating_sub(self.used);
        let ts = |ms: Millis| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let (kind, key_id, period, start, resets, okey) = match self.of {
            Of::Quota { per, index } => (
                "quota",
                None,
                Some(per.as_str()),
                Some(ts(per.start(index))),
                Some(ts(per.start(index + 1))),
                self.client_id,
            ),
            Of::Credits { key_id, refill } => (
                "credits",
                Some(key_id),
                refill.map(|r| r.interval.as_str()),
                None,
                refill.map(|r| ts(r.next_at(at))),
                key_id,
            ),
        };
        NewEvent::new(
            EventType::QuotaThreshold,
            okey,
            at,
            json!({
                "kind": kind,
                "client_id": self.client_id,
                "key_id": key_id,
                "threshold": self.threshold,
                "limit": self.limit,
                "used": self.used,
                "remaining": remaining,
                "period": period,
                "period_start": start,
                "resets_at": resets,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_up_and_never_overflow() {
        assert_eq!(mark(10, 80), 8);
        assert_eq!(mark(10, 100), 10);
        assert_eq!(mark(7, 80), 6); // 5.6 → 6
        assert_eq!(mark(1, 80), 1);
        assert_eq!(mark(0, 80), 0);
        assert_eq!(
            mark(super::super::allowance::MAX_CREDITS, 80),
            800_000_000_000_000
        );
        assert_eq!(mark(u64::MAX, 100), u64::MAX);
    }

    #[test]
    fn a_quota_crosses_each_threshold_on_one_request_only() {
        let fired: Vec<(u64, u8)> = (0..12)
            .flat_map(|u| quota_crossed(10, u, u + 1).map(move |t| (u + 1, t)))
            .collect();
        assert_eq!(fired, vec![(8, 80), (10, 100)]);
        assert_eq!(quota_crossed(0, 0, 1).count(), 0);
    }

    #[test]
    fn credits_fire_once_until_reset() {
        assert_eq!(
            credits_crossed(10, 7, 0).collect::<Vec<_>>(),
            Vec::<u8>::new()
        );
        assert_eq!(credits_crossed(10, 8, 0).collect::<Vec<_>>(), vec![80]);
        assert_eq!(credits_crossed(10, 9, 80).count(), 0);
        assert_eq!(credits_crossed(10, 10, 80).collect::<Vec<_>>(), vec![100]);
        assert_eq!(
            credits_crossed(10, 10, 0).collect::<Vec<_>>(),
            vec![80, 100]
        );
        assert_eq!(credits_crossed(10, 10, 100).count(), 0);
        assert_eq!(credits_crossed(0, 0, 0).count(), 0);
    }

    #[test]
    fn the_payload_is_ids_and_numbers() {
        let c = Crossing {
            of: Of::Quota {
                per: Period::Day,
                index: 1,
            },
            client_id: "acme",
            threshold: 80,
            limit: 10,
            used: 8,
        };
        let e = c.event(86_400_000 + 5);
        assert_eq!(e.ordering_key, "acme");
        let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
        assert_eq!(v["type"], "quota.threshold");
        assert_eq!(
            v["data"],
            json!({"kind": "quota", "client_id": "acme", "key_id": null, "threshold": 80,
                   "limit": 10, "used": 8, "remaining": 2, "period": "day",
                   "period_start": "1970-01-02T00:00:00.000Z",
                   "resets_at": "1970-01-03T00:00:00.000Z"})
        );
    }
}
