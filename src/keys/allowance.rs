//! What a caller may spend besides its rate: the scope of a plan's rate limit, a plan's quota
//! per UTC calendar period, and a key's credits with their refill. Pure types and calendar
//! arithmetic; the stores keep the counters ([`super::store::Store::charge`]) and the request
//! path asks them only for principals that have credits or a quota.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::Millis;

/// Who shares a plan's rate limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every key (and token) of a client draws from one bucket per client.
    #[default]
    Client,
    /// Each key has its own bucket.
    Key,
}

/// A quota's calendar period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Month,
}

/// A plan's quota: `requests` per calendar `per` period, counted per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub requests: u64,
    pub per: Period,
}

/// How often a key's credits are refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Daily,
    Monthly,
}

impl Interval {
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Daily => "daily",
            Interval::Monthly => "monthly",
        }
    }

    pub fn parse(s: &str) -> Option<Interval> {
        match s {
            "daily" => Some(Interval::Daily),
            "monthly" => Some(Interval::Monthly),
            _ => None,
        }
    }
}

/// A refill: at each period's start (00:00 UTC; for `monthly`, on day `day`, 1–28, default 1)
/// the remaining credits are set to `amount` (a refill replaces what was left, it does not add
/// to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    pub amount: u64,
    pub interval: Interval,
    /// The day of the month of a monthly refill (1–28; default 1). Not allowed for daily.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 28)]
    pub day: Option<u8>,
}

/// Most credits a key may hold (well inside every store's integer range).
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

impl Refill {
    /// What is wrong with it, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        if self.amount > MAX_CREDITS {
            return Some("refill.amount is larger than 10^15");
        }
        match (self.interval, self.day) {
            (Interval::Daily, Some(_)) => Some("refill.day is only for a monthly refill"),
            (Interval::Monthly, Some(d)) if !(1..=28).contains(&d) => {
                Some("refill.day must be between 1 and 28")
            }
            _ => None,
        }
    }

    /// The refill period `now` falls in (a number that grows by one at every refill).
    pub fn period(&self, now: Millis) -> i64 {
        let t = utc(now);
        match self.interval {
            Interval::Daily => now.div_euclid(DAY_MS),
            Interval::Monthly => {
                let month = i64::from(t.year()) * 12 + i64::from(t.month0());
                if t.day() < u32::from(self.day.unwrap_or(1)) {
                    month - 1
                } else {
                    month
                }
            }
        }
    }

    /// When the period after `now`'s starts.
    pub fn next_at(&self, now: Millis) -> Millis {
        match self.interval {
            Interval::Daily => (now.div_euclid(DAY_MS) + 1) * DAY_MS,
            Interval::Monthly => month_start(self.period(now) + 1, self.day.unwrap_or(1)),
        }
    }
}

/// The credit terms of a key: present when the key has credits; the refill, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditTerms {
    pub refill: Option<Refill>,
}

/// A key's credits as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    pub remaining: u64,
    pub refill: Option<Refill>,
    /// The refill period the remaining count belongs to (see [`Refill::period`]); 0 without a
    /// refill.
    pub period: i64,
}

impl Credits {
    /// The credits as they are at `now`: refilled when a refill period started since they were
    /// last written (what the stores do lazily on the next charge).
    pub fn at(mut self, now: Millis) -> Credits {
        if let Some(r) = self.refill {
            let p = r.period(now);
            if p > self.period {
                self.remaining = r.amount;
                self.period = p;
            }
        }
        self
    }
}

const HOUR_MS: Millis = 3_600_000;
const DAY_MS: Millis = 86_400_000;

fn utc(now: Millis) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(now).single().unwrap_or_default()
}

/// 00:00 UTC on day `day` of month number `month` (year × 12 + month0).
fn month_start(month: i64, day: u8) -> Millis {
    let (y, m0) = (month.div_euclid(12), month.rem_euclid(12));
    NaiveDate::from_ymd_opt(y as i32, m0 as u32 + 1, u32::from(day))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(Millis::MAX)
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The number of the calendar period `now` falls in.
    pub fn index(self, now: Millis) -> i64 {
        match self {
            Period::Hour => now.div_euclid(HOUR_MS),
            Period::Day => now.div_euclid(DAY_MS),
            Period::Month => {
                let t = utc(now);
                i64::from(t.year()) * 12 + i64::from(t.month0())
            }
        }
    }

    /// When period `index` starts.
    pub fn start(self, index: i64) -> Millis {
        match self {
            Period::Hour => index * HOUR_MS,
            Period::Day => index * DAY_MS,
            Period::Month => month_start(index, 1),
        }
    }
}

/// What one request spends, charged in the store in one atomic step: all of it or, when
/// something is short, nothing.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub key_id: uuid::Uuid,
    /// Credits to take (the route's cost), when the key has credits.
    pub cost: Option<u64>,
    pub quota: Option<QuotaCharge<'a>>,
    /// When the charge is made (refills and quota periods are judged on it).
    pub now: Millis,
}

/// One request counted against a client's quota for the period `now` falls in.
#[derive(Debug, Clone, Copy)]
pub struct QuotaCharge<'a> {
    pub client_id: &'a str,
    pub quota: Quota,
}

/// What a charge found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    /// Credits left after the charge (before it, when it was refused); `None`: the key has no
    /// credits (any more).
    pub credits: Option<u64>,
    /// Quota left in the period after the charge (before it, when refused).
    pub quota: Option<u64>,
    /// Why nothing was charged, if so.
    pub refused: Option<Exhausted>,
}

/// What ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Credits,
    Quota,
}

/// An admin's change to a key's credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditsWrite {
    /// New terms: `remaining` now, and the refill (the count starts in the current period).
    Set {
        remaining: u64,
        refill: Option<Refill>,
    },
    /// The remaining count only (a key without credits gets credits without refill).
    SetRemaining(u64),
    /// Adds to the remaining count (after any refill due).
    Add(u64),
    /// The key has no credits any more (unlimited again).
    Remove,
}

/// What a credits write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditsWritten {
    Done(Option<Credits>),
    /// No such key.
    NoKey,
    /// The result would hold more than [`MAX_CREDITS`]; nothing was written.
    TooMany,
}

/// The calendar facts a store needs to judge a refill period without calendar arithmetic of
/// its own (the Redis scripts): days since the epoch, months since year 0, day of the month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    pub day: i64,
    pub month: i64,
    pub day_of_month: u8,
}

impl Calendar {
    pub fn at(now: Millis) -> Calendar {
        let t = utc(now);
        Calendar {
            day: now.div_euclid(DAY_MS),
            month: i64::from(t.year()) * 12 + i64::from(t.month0()),
            day_of_month: t.day() as u8,
        }
    }
}

/// The credits after `write` is applied to `current` (already refilled to `now`): `None` in
/// the outer option when the result would be over [`MAX_CREDITS`]. Every store applies this
/// same rule (the Redis script mirrors it).
pub fn credits_after(
    current: Option<Credits>,
    write: CreditsWrite,
    now: Millis,
) -> Option<Option<Credits>> {
    let bare = |remaining| Credits {
        remaining,
        refill: None,
        period: 0,
    };
    let next = match write {
        CreditsWrite::Set { remaining, refill } => Some(Credits {
            remaining,
            refill,
            period: refill.map_or(0, |r| r.period(now)),
        }),
        CreditsWrite::SetRemaining(n) => Some(match current {
            Some(c) => Credits { remaining: n, ..c },
            None => bare(n),
        }),
        CreditsWrite::Add(n) => Some(match current {
            Some(c) => Credits {
                remaining: c.remaining.saturating_add(n),
                ..c
            },
            None => bare(n),
        }),
        CreditsWrite::Remove => None,
    };
    match next {
        Some(c) if c.remaining > MAX_CREDITS => None,
        next => Some(next),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Millis {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn calendar_periods_in_utc() {
        let t = at("2026-03-31T23:59:59.999Z");
        assert_eq!(
            Period::Month.start(Period::Month.index(t)),
            at("2026-03-01T00:00:00Z")
        );
        assert_eq!(
            Period::Month.start(Period::Month.index(t) + 1),
            at("2026-04-01T00:00:00Z")
        );
        assert_eq!(
            Period::Day.start(Period::Day.index(t) + 1),
            at("2026-04-01T00:00:00Z")
        );
        assert_eq!(
            Period::Hour.start(Period::Hour.index(t)),
            at("2026-03-31T23:00:00Z")
        );
        // December rolls over into the next year.
        let dec = at("2026-12-15T10:00:00Z");
        assert_eq!(
            Period::Month.start(Period::Month.index(dec) + 1),
            at("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn refills_start_at_their_boundary() {
        let daily = Refill {
            amount: 10,
            interval: Interval::Daily,
            day: None,
        };
        let t = at("2026-05-10T13:00:00Z");
        assert_eq!(daily.next_at(t), at("2026-05-11T00:00:00Z"));
        assert_eq!(
            daily.period(at("2026-05-11T00:00:00Z")),
            daily.period(t) + 1
        );
        let monthly = Refill {
            amount: 10,
            interval: Interval::Monthly,
            day: Some(15),
        };
        assert_eq!(monthly.next_at(t), at("2026-05-15T00:00:00Z"));
        assert_eq!(
            monthly.next_at(at("2026-05-15T00:00:00Z")),
            at("2026-06-15T00:00:00Z")
        );
        assert_eq!(
            monthly.next_at(at("2026-12-20T00:00:00Z")),
            at("2027-01-15T00:00:00Z")
        );
        assert_eq!(
            monthly.period(at("2026-05-14T23:59:59Z")) + 1,
            monthly.period(at("2026-05-15T00:00:00Z"))
        );
        // Lazily applied: a later period sets the remaining count to the amount.
        let c = Credits {
            remaining: 3,
            refill: Some(monthly),
            period: monthly.period(t),
        };
        assert_eq!(c.at(t).remaining, 3);
        assert_eq!(c.at(at("2026-05-15T00:00:00Z")).remaining, 10);
        assert!(monthly.problem().is_none());
        assert!(
            Refill {
                day: Some(29),
                ..monthly
            }
            .problem()
            .is_some()
        );
        assert!(
            Refill {
                day: Some(1),
                ..daily
            }
            .problem()
            .is_some()
        );
    }
}
