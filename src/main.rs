//! The `keygate` binary: parse the command line, load the configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keygate::config::{CliOverrides, Config};

#[derive(Parser)]
#[command(name = "keygate", version, about = "API-key authentication gateway")]
struct Cli {
    /// Config file (default: config/keygate.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Proxy listen address (overrides KEYGATE_LISTEN and the file).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Admin listen address (overrides KEYGATE_ADMIN_LISTEN and the file).
    #[arg(long, global = true)]
    admin_listen: Option<String>,
    /// Upstream of the catch-all route (overrides KEYGATE_UPSTREAM and the file).
    #[arg(long, global = true)]
    upstream: Option<String>,
    /// Store URL: sqlite://PATH or redis://… (overrides KEYGATE_STORE and the file).
    #[arg(long, global = true)]
    store: Option<String>,
    /// An additional admin key. Prefer KEYGATE_ADMIN_KEY: arguments are visible in `ps`.
    #[arg(long, global = true)]
    admin_key: Option<String>,
    #[command(flatten)]
    admin_api: keygate::cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and admin listeners.
    Serve,
    /// Validate the configuration and list every problem.
    CheckConfig,
    /// Manage clients through the admin API.
    #[command(subcommand)]
    Client(keygate::cli::ClientCmd),
    /// Manage API keys through the admin API.
    #[command(subcommand)]
    Key(keygate::cli::KeyCmd),
    /// Print clients, keys (never secrets), plans in use and routes as TOML.
    Export,
    /// Show what `apply FILE` would change (exit 0: nothing, 3: changes).
    Diff { file: PathBuf },
    /// Make the gateway's clients and keys what FILE says.
    Apply { file: PathBuf },
}

/// The environment as the configuration reads it. `std::env::vars` panics on a variable that
/// is not UTF-8, whatever its name: such a variable is left out, unless it is one of keygate's
/// (`KEYGATE_*`), which stops the command (exit 2) rather than be ignored.
fn environment() -> Result<std::collections::HashMap<String, String>, ExitCode> {
    let mut env = std::collections::HashMap::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                env.insert(name, value);
            }
            (Ok(name), Err(_)) if name.starts_with("KEYGATE_") => {
                eprintln!("keygate: the environment variable {name} is not valid UTF-8");
                return Err(ExitCode::from(2));
            }
            _ => {}
        }
    }
    Ok(env)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve | Command::CheckConfig) {
        return admin_api(cli);
    }
    let overrides = CliOverrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        upstream: cli.upstream,
        store: cli.store,
        admin_key: cli.admin_key,
    };
    let env = match environment() {
        Ok(env) => env,
        Err(code) => return code,
    };
    let config = match Config::load(cli.config.as_deref(), &env, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::CheckConfig => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            if config.admin.key_hashes.is_empty() {
                eprintln!(
                    "warning: no admin key configured; `keygate serve` will refuse to start (set KEYGATE_ADMIN_KEY)"
                );
            }
            match keygate::cli::emit("configuration OK") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => e.exit(),
            }
        }
        Command::Serve => serve(config),
        _ => unreachable!("admin-API commands return above"),
    }
}

fn serve(config: Config) -> ExitCode {
    keygate::telemetry::init(
        &config.log.level,
        config.log.format == keygate::config::LogFormat::Json,
    );
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let rt = match keygate::runtime::build(config.event_loop) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        if config.event_loop.busy_polling {
            tokio::spawn(keygate::runtime::busy_poll());
        }
        match keygate::App::bind(config).await {
            Ok(app) => {
                app.run(keygate::shutdown_signal()).await;
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("keygate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The admin-API commands: where the admin API is (flag, environment, else the config file's
/// admin listener) and which key to present.
fn admin_api(cli: Cli) -> ExitCode {
    let env = match environment() {
        Ok(env) => env,
        Err(code) => return code,
    };
    let configured = if cli.admin_api.admin_url.is_some() {
        None
    } else {
        let overrides = CliOverrides {
            admin_listen: cli.admin_listen.clone(),
            ..CliOverrides::default()
        };
        match Config::admin_target(cli.config.as_deref(), &env, &overrides) {
            Ok(target) => Some(target),
            Err(e) => {
                eprint!("{e}");
                eprintln!("keygate: no admin URL: give --admin-url or KEYGATE_ADMIN_URL");
                return ExitCode::from(2);
            }
        }
    };
    let target = keygate::cli::Target {
        url: cli.admin_api.admin_url.clone(),
        configured,
        key: cli
            .admin_key
            .clone()
            .or_else(|| env.get("KEYGATE_ADMIN_KEY").cloned()),
    };
    let g = &cli.admin_api;
    let admin = match keygate::cli::connect(g, target) {
        Ok(a) => a,
        Err(e) => return e.exit(),
    };
    let mut changes = false;
    let code = keygate::cli::block_on(async {
        match &cli.command {
            Command::Client(cmd) => keygate::cli::client(g, &admin, cmd).await,
            Command::Key(cmd) => keygate::cli::key(g, &admin, cmd).await,
            Command::Export => keygate::cli::state::export(&admin).await,
            Command::Diff { file } => {
                changes = !keygate::cli::state::diff(&admin, file).await?;
                Ok(())
            }
            Command::Apply { file } => keygate::cli::state::apply(g, &admin, file).await,
            Command::Serve | Command::CheckConfig => Ok(()),
        }
    });
    if changes && code == ExitCode::SUCCESS {
        return ExitCode::from(3);
    }
    code
}
