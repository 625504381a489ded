//! Hostile input: request smuggling, path spellings, head limits and slow clients, descriptor
//! exhaustion, stalled admin bodies and per-address connection caps, crash safety of admin
//! writes, and property tests of the pure checks. Each test writes its figures to
//! `target/tmp/hostile/<name>.txt` (printed by scripts/test.sh).

mod durability;
mod harness;
mod limits;
mod paths;
mod props;
mod signals;
mod slots;
mod smuggle;
