//! Logging. `RUST_LOG` overrides the configured level. Access lines go to the target
//! `keygate::access`, admin mutations to `keygate::audit`.

pub mod metrics;

use tracing_subscriber::EnvFilter;

/// rustls logs some clients' quirks at warn, once per handshake (an IP address sent as SNI,
/// as wrk and other OpenSSL-based clients do): a log line per connection that any client can
/// cause. Its events are kept to errors unless the filter names rustls itself.
const RUSTLS_CAP: &str = "rustls=error";

/// Installs the global subscriber with `level` (an `EnvFilter` directive) in JSON lines or
/// for humans. Safe to call more than once (later calls do nothing).
pub fn init(level: &str, json: bool) {
    let directives = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(env) if EnvFilter::try_new(&env).is_ok() => env,
        _ => level.to_owned(),
    };
    let filter = filter(&directives);
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

/// The filter of `directives` (`info` when they do not parse), with rustls kept to errors
/// unless they name it ([`RUSTLS_CAP`]).
fn filter(directives: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    if directives.contains("rustls") {
        return filter;
    }
    match RUSTLS_CAP.parse() {
        Ok(cap) => filter.add_directive(cap),
        Err(_) => filter,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a subscriber with `directives` writes of a rustls warning and a keygate one.
    fn written(directives: &str) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(super::filter(directives))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::error!(target: "rustls::conn", "a rustls error");
            tracing::warn!(target: "keygate::proxy", "a keygate warning");
        });
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn rustls_warnings_are_kept_out_unless_the_filter_names_rustls() {
        for directives in ["warn", "info", "debug"] {
            let out = written(directives);
            assert!(!out.contains("Illegal SNI"), "{directives}: {out}");
            assert!(out.contains("a rustls error"), "{directives}: {out}");
            assert!(out.contains("a keygate warning"), "{directives}: {out}");
        }
        let out = written("warn,rustls=warn");
        assert!(out.contains("Illegal SNI"), "named, yet kept out: {out}");
        let out = written("error");
        assert!(!out.contains("a keygate warning"), "{out}");
        assert!(out.contains("a rustls error"), "{out}");
    }
}
