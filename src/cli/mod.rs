//! `keygate client …`, `keygate key …`, `keygate export | diff | apply`: the admin API from the
//! command line. An HTTP client of the public admin API only: no store access, nothing the
//! console or a script could not do with curl.
//!
//! Where it connects: `--admin-url` / `KEYGATE_ADMIN_URL`, else the configured admin listener
//! (`[admin] listen` of the config file, a wildcard address read as loopback; `https` when the
//! admin listener has TLS, verified against `--admin-ca` / `KEYGATE_ADMIN_CA` or the webpki
//! roots). The admin key comes from `KEYGATE_ADMIN_KEY` (or `--admin-key`, visible in `ps`).
//!
//! Output: human tables by default, `--output json` for scripts (the admin API's own JSON; a
//! listing is one array of every page). `--quiet`: a command that creates a key (client
//! create, key create, key rotate) prints the plaintext key alone on stdout; other changes
//! print nothing; reads print as usual.
//!
//! Exit codes: 0 done; 1 refused by the server (the problem's `detail` on stderr), the
//! server could not be reached, or stdout could not be written (closed or full: never a
//! panic; a key or webhook secret that could not be shown is deleted again where it was
//! just made, and said on stderr); 2 usage error (bad arguments, no admin key, unreadable
//! file); 3 `diff` found changes.

pub mod http;
pub mod import;
pub mod state;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use ::http::Method;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use http::{Admin, segment};

/// Why a command failed; each has its exit code.
#[derive(Debug)]
pub enum CliError {
    /// Bad arguments or local input: exit 2.
    Usage(String),
    /// The server refused: exit 1, `detail` on stderr.
    Refused { status: u16, detail: String },
    /// The server could not be reached or answered nonsense: exit 1.
    Transport(String),
    /// A command that already reported what went wrong: exit 1.
    Failed,
    /// Standard output is closed or full: exit 1.
    Stdout(std::io::Error),
}

impl CliError {
    pub fn exit(&self) -> ExitCode {
        match self {
            CliError::Usage(m) => {
                eprintln!("keygate: {m}");
                ExitCode::from(2)
            }
            CliError::Refused { status, detail } => {
                eprintln!("keygate: refused ({status}): {detail}");
                ExitCode::from(1)
            }
            CliError::Transport(m) => {
                eprintln!("keygate: {m}");
                ExitCode::from(1)
            }
            CliError::Failed => ExitCode::from(1),
            CliError::Stdout(e) => {
                eprintln!("keygate: cannot write to standard output: {e}");
                ExitCode::from(1)
            }
        }
    }
}

/// `text` and a newline on stdout; a closed or full stdout is an error, not a panic.
pub fn emit(text: impl std::fmt::Display) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(CliError::Stdout)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Options of every admin-API command.
#[derive(Debug, Args)]
pub struct Global {
    /// Admin API base URL, e.g. http://127.0.0.1:8081 (default: the configured admin listener).
    #[arg(long, global = true, env = "KEYGATE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// PEM CA bundle to verify an https admin URL (default: the webpki roots).
    #[arg(long, global = true, env = "KEYGATE_ADMIN_CA")]
    pub admin_ca: Option<PathBuf>,
    /// Seconds each admin API call may take, connecting included (1–3600): past it the command
    /// ends with exit 1 saying the answer was not had.
    #[arg(long, global = true, env = "KEYGATE_ADMIN_TIMEOUT_SECS", default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_secs: u64,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print a new key alone on stdout, and nothing for other changes.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Create a client (and its first key, printed once).
    Create {
        client_id: String,
        #[arg(long)]
        license: String,
        /// Permissions of the first key.
        #[arg(long = "permission")]
        permissions: Vec<String>,
        /// A JSON object.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// List every client.
    List,
    /// Show one client.
    Get { client_id: String },
    /// Change a client's license or metadata.
    Update {
        client_id: String,
        #[arg(long)]
        license: Option<String>,
        /// A JSON object, or `null` to remove it.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// Delete a client and all its keys (they stop working at once).
    Delete { client_id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create a key (printed once).
    Create {
        #[arg(long = "client")]
        client_id: String,
        #[arg(long)]
        name: String,
        #[arg(long = "permission")]
        permissions: Vec<String>,
        /// Days until it expires, 1–36500 (default: never).
        #[arg(long, conflicts_with = "expires_at", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        expires_days: Option<u32>,
        /// RFC 3339 expiry time.
        #[arg(long)]
        expires_at: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// A JSON object.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// List keys (no secrets), of one client or all.
    List {
        #[arg(long = "client")]
        client_id: Option<String>,
    },
    /// Show one key (no secret).
    Get { id: String },
    /// Change a key's name, permissions, expiry or metadata.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Replaces the permissions (repeat for several).
        #[arg(long = "permission")]
        permissions: Vec<String>,
        /// Removes every permission.
        #[arg(long, conflicts_with = "permissions")]
        no_permissions: bool,
        /// Days from now until it expires, 1–36500.
        #[arg(long, conflicts_with_all = ["expires_at", "never_expire"],
              value_parser = clap::value_parser!(u32).range(1..=36_500))]
        expires_days: Option<u32>,
        #[arg(long, conflicts_with = "never_expire")]
        expires_at: Option<String>,
        #[arg(long)]
        never_expire: bool,
        /// A JSON object, or `null` to remove it.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// Disable a key (it stops working at once).
    Disable { id: String },
    /// Enable a disabled key.
    Enable { id: String },
    /// Delete a key (it stops working at once).
    Delete { id: String },
    /// Give a key a new secret (printed once); the old one works for --grace seconds more.
    Rotate {
        id: String,
        #[arg(long, default_value_t = 0)]
        grace: u64,
    },
    /// Requests per day of a key.
    Usage {
        id: String,
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Import keys of another system from a JSON-lines file (`-`: stdin).
    Import(import::ImportArgs),
}

/// Where the admin API is, from the flags, the environment or the config file.
pub struct Target {
    pub url: Option<String>,
    /// The configured admin listener, when the config could be loaded.
    pub configured: Option<(std::net::SocketAddr, bool)>,
    pub key: Option<String>,
}

pub fn connect(g: &Global, target: Target) -> Result<Admin, CliError> {
    let url = match (target.url, target.configured) {
        (Some(u), _) => u,
        (None, Some((addr, tls))) => {
            let ip = match addr.ip() {
                std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                    std::net::Ipv4Addr::LOCALHOST.into()
                }
                std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
                    std::net::Ipv6Addr::LOCALHOST.into()
                }
                ip => ip,
            };
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{}", std::net::SocketAddr::new(ip, addr.port()))
        }
        (None, None) => {
            return Err(CliError::Usage(
                "no admin URL: give --admin-url or KEYGATE_ADMIN_URL".into(),
            ));
        }
    };
    let key = target.key.filter(|k| !k.is_empty()).ok_or_else(|| {
        CliError::Usage("no admin key: set KEYGATE_ADMIN_KEY (or --admin-key)".into())
    })?;
    Admin::new(
        &url,
        key,
        g.admin_ca.as_deref(),
        std::time::Duration::from_secs(g.timeout_secs),
    )
}

/// Runs `f` on a small current-thread runtime.
pub fn block_on<F: Future<Output = Result<(), CliError>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit(),
    }
}

fn json_arg(name: &str, s: &Option<String>) -> Result<Option<Value>, CliError> {
    s.as_deref()
        .map(|s| {
            serde_json::from_str(s)
                .map_err(|e| CliError::Usage(format!("--{name} is not valid JSON: {e}")))
        })
        .transpose()
}

fn expiry_arg(s: &str) -> Result<String, CliError> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_rfc3339())
        .map_err(|_| CliError::Usage(format!("{s:?} is not an RFC 3339 time")))
}

pub async fn client(g: &Global, admin: &Admin, cmd: &ClientCmd) -> Result<(), CliError> {
    match cmd {
        ClientCmd::Create {
            client_id,
            license,
            permissions,
            metadata,
        } => {
            let mut body = json!({"client_id": client_id, "license": license});
            if !permissions.is_empty() {
                body["permissions"] = json!(permissions);
            }
            if let Some(m) = json_arg("metadata", metadata)? {
                body["metadata"] = m;
            }
            let v = admin.send(Method::POST, "/v1/clients", &body).await?;
            let key = v["api_key"]["key"].as_str().unwrap_or_default();
            new_key(g, admin, &v, key, Made::Key(text(&v["api_key"]["id"]))).await?;
        }
        ClientCmd::List => {
            let all = admin.all("/v1/clients").await?;
            print_list(g, &all, CLIENT_COLUMNS)?;
        }
        ClientCmd::Get { client_id } => {
            let v = admin
                .get(&format!("/v1/clients/{}", segment(client_id)))
                .await?;
            print_one(g, &v)?;
        }
        ClientCmd::Update {
            client_id,
            license,
            metadata,
        } => {
            let mut body = json!({});
            if let Some(l) = license {
                body["license"] = json!(l);
            }
            if let Some(m) = json_arg("metadata", metadata)? {
                body["metadata"] = m;
            }
            if body.as_object().is_some_and(|o| o.is_empty()) {
                return Err(CliError::Usage(
                    "nothing to change: give --license or --metadata".into(),
                ));
            }
            let v = admin
                .send(
                    Method::PATCH,
                    &format!("/v1/clients/{}", segment(client_id)),
                    &body,
                )
                .await?;
            changed(g, &v)?;
        }
        ClientCmd::Delete { client_id } => {
            let v = admin
                .call(
                    Method::DELETE,
                    &format!("/v1/clients/{}", segment(client_id)),
                    None,
                )
                .await?;
            changed(g, &v)?;
        }
    }
    Ok(())
}

pub async fn key(g: &Global, admin: &Admin, cmd: &KeyCmd) -> Result<(), CliError> {
    let one = |id: &str| format!("/v1/api-keys/{}", segment(id));
    match cmd {
        KeyCmd::Create {
            client_id,
            name,
            permissions,
            expires_days,
            expires_at,
            disabled,
            metadata,
        } => {
            let mut body =
                json!({"client_id": client_id, "name": name, "permissions": permissions});
            if let Some(d) = expires_days {
                body["expires_days"] = json!(d);
            }
            if let Some(t) = expires_at {
                body["expires_at"] = json!(expiry_arg(t)?);
            }
            if *disabled {
                body["enabled"] = json!(false);
            }
            if let Some(m) = json_arg("metadata", metadata)? {
                body["metadata"] = m;
            }
            let v = admin.send(Method::POST, "/v1/api-keys", &body).await?;
            let key = v["key"].as_str().unwrap_or_default().to_owned();
            new_key(g, admin, &v, &key, Made::Key(text(&v["id"]))).await?;
        }
        KeyCmd::List { client_id } => {
            let path = match client_id {
                Some(c) => format!("/v1/api-keys?client_id={}", segment(c)),
                None => "/v1/api-keys".into(),
            };
            let all = admin.all(&path).await?;
            print_list(g, &all, KEY_COLUMNS)?;
        }
        KeyCmd::Get { id } => print_one(g, &admin.get(&one(id)).await?)?,
        KeyCmd::Update {
            id,
            name,
            permissions,
            no_permissions,
            expires_days,
            expires_at,
            never_expire,
            metadata,
        } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if !permissions.is_empty() || *no_permissions {
                body["permissions"] = json!(permissions);
            }
            if let Some(d) = expires_days {
                let t = chrono::Utc::now() + chrono::Duration::days(i64::from(*d));
                body["expires_at"] = json!(t.to_rfc3339());
            }
            if let Some(t) = expires_at {
                body["expires_at"] = json!(expiry_arg(t)?);
            }
            if *never_expire {
                body["expires_at"] = Value::Null;
            }
            if let Some(m) = json_arg("metadata", metadata)? {
                body["metadata"] = m;
            }
            if body.as_object().is_some_and(|o| o.is_empty()) {
                return Err(CliError::Usage("nothing to change".into()));
            }
            changed(g, &admin.send(Method::PATCH, &one(id), &body).await?)?;
        }
        KeyCmd::Disable { id } | KeyCmd::Enable { id } => {
            let enabled = matches!(cmd, KeyCmd::Enable { .. });
            let body = json!({ "enabled": enabled });
            changed(g, &admin.send(Method::PATCH, &one(id), &body).await?)?;
        }
        KeyCmd::Delete { id } => {
            changed(g, &admin.call(Method::DELETE, &one(id), None).await?)?;
        }
        KeyCmd::Rotate { id, grace } => {
            let body = json!({ "grace_period_seconds": grace });
            let v = admin
                .send(Method::POST, &format!("{}/rotate", one(id)), &body)
                .await?;
            let key = v["key"].as_str().unwrap_or_default().to_owned();
            new_key(g, admin, &v, &key, Made::Rotated(id.clone())).await?;
        }
        KeyCmd::Usage { id, days } => {
            let v = admin.get(&format!("{}/usage?days={days}", one(id))).await?;
            match g.output {
                Output::Json => print_json(&v)?,
                Output::Table => {
                    emit(format_args!("key_id: {}", text(&v["key_id"])))?;
                    emit(format_args!("last_used_at: {}", text(&v["last_used_at"])))?;
                    emit(format_args!("total: {}", text(&v["total"])))?;
                    let days = v["days"].as_array().cloned().unwrap_or_default();
                    print_table(&days, &[("DATE", "date"), ("REQUESTS", "requests")])?;
                }
            }
        }
        KeyCmd::Import(args) => import::run(g, admin, args).await?,
    }
    Ok(())
}

const CLIENT_COLUMNS: &[(&str, &str)] = &[
    ("CLIENT_ID", "client_id"),
    ("LICENSE", "license"),
    ("CREATED_AT", "created_at"),
];

const KEY_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("CLIENT_ID", "client_id"),
    ("NAME", "name"),
    ("PREFIX", "prefix"),
    ("ENABLED", "enabled"),
    ("PERMISSIONS", "permissions"),
    ("EXPIRES_AT", "expires_at"),
    ("LAST_USED_AT", "last_used_at"),
];

/// A JSON value as a table cell: strings bare, arrays comma-separated, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) -> Result<(), CliError> {
    emit(serde_json::to_string_pretty(v).expect("a Value serializes"))
}

fn print_table(rows: &[Value], columns: &[(&str, &str)]) -> Result<(), CliError> {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, f)| text(&r[*f])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cols: Vec<String>| {
        cols.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    emit(line(columns.iter().map(|(h, _)| h.to_string()).collect()))?;
    for r in cells {
        emit(line(r))?;
    }
    Ok(())
}

fn print_list(g: &Global, items: &[Value], columns: &[(&str, &str)]) -> Result<(), CliError> {
    match g.output {
        Output::Json => print_json(&Value::Array(items.to_vec())),
        Output::Table => print_table(items, columns),
    }
}

/// One object as `field: value` lines (nested objects as JSON).
fn print_one(g: &Global, v: &Value) -> Result<(), CliError> {
    match (g.output, v) {
        (Output::Table, Value::Object(o)) => {
            for (k, v) in o {
                let cell = match v {
                    Value::Object(_) => v.to_string(),
                    v => text(v),
                };
                emit(format_args!("{k}: {cell}"))?;
            }
            Ok(())
        }
        _ => print_json(v),
    }
}

/// The answer to a change: nothing with --quiet.
fn changed(g: &Global, v: &Value) -> Result<(), CliError> {
    if g.quiet { Ok(()) } else { print_one(g, v) }
}

/// What a call that shows a new secret made, to undo when the secret cannot be shown.
enum Made {
    /// A new key (`id`): deleted again.
    Key(String),
    /// A key (`id`) given a new secret: cannot be undone; said on stderr.
    Rotated(String),
}

/// The answer to a call that made a key: with --quiet the key alone; otherwise the answer and
/// a warning on stderr that the key is shown once. When stdout cannot take it, a new key is
/// deleted (nobody could ever use it) and a rotation is named on stderr.
async fn new_key(
    g: &Global,
    admin: &Admin,
    v: &Value,
    key: &str,
    made: Made,
) -> Result<(), CliError> {
    let shown = if g.quiet { emit(key) } else { print_one(g, v) };
    if let Err(e) = shown {
        match made {
            Made::Key(id) => match admin
                .call(
                    Method::DELETE,
                    &format!("/v1/api-keys/{}", segment(&id)),
                    None,
                )
                .await
            {
                Ok(_) => eprintln!(
                    "keygate: the new key {id} could not be shown, so it was deleted again"
                ),
                Err(_) => {
                    eprintln!("keygate: the new key {id} could not be shown nor deleted: delete it")
                }
            },
            Made::Rotated(id) => eprintln!(
                "keygate: key {id} has a new secret that could not be shown: rotate it again"
            ),
        }
        return Err(e);
    }
    if g.output == Output::Table && !g.quiet {
        eprintln!("Store this key now: it is shown once and cannot be retrieved again.");
    }
    Ok(())
}
