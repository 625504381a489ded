//! Logging. `RUST_LOG` overrides the configured level. Access lines go to the target
//! `keygate::access`, admin mutations to `keygate::audit`.

pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber with `level` (an `EnvFilter` directive) in JSON lines or
/// for humans. Safe to call more than once (later calls do nothing).
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
