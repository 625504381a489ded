//! The real `keygate` binary as an admin-API client (`keygate client …`, `keygate key …`,
//! `keygate key import`) against a gateway on a free port: every subcommand, JSON and table
//! output, exit codes 0 / 1 (refused, detail on stderr) / 2 (usage), and the import of keys of
//! other systems that then authenticate on the proxy.

use std::process::Output;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Gateway};

/// `keygate ARGS --admin-url http://ADMIN` with the admin key in the environment.
async fn kg(gw: &Gateway, args: &[&str]) -> Output {
    kg_with(gw, args, &[("KEYGATE_ADMIN_KEY", ADMIN_KEY)]).await
}

async fn kg_with(gw: &Gateway, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut launch = Binary::command(args)
        .arg("--admin-url")
        .arg(format!("http://{}", gw.admin));
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    tokio::task::spawn_blocking(move || launch.output())
        .await
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects exit 0 with JSON on stdout.
async fn kg_json(gw: &Gateway, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let o = kg(gw, &all).await;
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&o)))
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    gw.get_with_key("/x", key).await.status.as_u16()
}

#[tokio::test]
async fn every_client_and_key_subcommand_with_json_output() {
    let gw = Gateway::start().await;

    // client create: the first key, printed once, works on the proxy.
    let v = kg_json(&gw, &["client", "create", "acme", "--license", "pro"]).await;
    assert_eq!(v["client_id"], "acme");
    let first = v["api_key"]["key"].as_str().unwrap().to_owned();
    assert_eq!(status(&gw, &first).await, 200);
    // --quiet: the key alone.
    let o = kg(
        &gw,
        &["client", "create", "globex", "--license", "free", "--quiet"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let globex_key = stdout(&o);
    assert!(globex_key.ends_with('\n') && globex_key.lines().count() == 1);
    assert_eq!(status(&gw, globex_key.trim_end()).await, 200);

    // Refusals: exit 1, the problem's detail on stderr.
    let o = kg(&gw, &["client", "create", "acme", "--license", "pro"]).await;
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    let o = kg(&gw, &["client", "create", "newco", "--license", "platinum"]).await;
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("license"), "{}", stderr(&o));

    // client list / get / update.
    let list = kg_json(&gw, &["client", "list"]).await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "globex"]);
    assert_eq!(
        kg_json(&gw, &["client", "get", "acme"]).await["license"],
        "pro"
    );
    let o = kg(&gw, &["client", "get", "nobody"]).await;
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("404"));
    let v = kg_json(
        &gw,
        &[
            "client",
            "update",
            "globex",
            "--license",
            "pro",
            "--metadata",
            r#"{"tier":2}"#,
        ],
    )
    .await;
    assert_eq!(
        (v["license"].clone(), v["metadata"].clone()),
        (json!("pro"), json!({"tier": 2}))
    );
    let r = gw.admin("GET", "/v1/clients/globex", None).await;
    assert_eq!(r.json()["license"], "pro");

    // key create --quiet: the key alone; its attributes as asked.
    let o = kg(
        &gw,
        &[
            "key",
            "create",
            "--client",
            "acme",
            "--name",
            "ci",
            "--permission",
            "read",
            "--permission",
            "write",
            "--expires-days",
            "3",
            "--quiet",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let key = stdout(&o).trim_end().to_owned();
    assert_eq!(status(&gw, &key).await, 200);
    let list = kg_json(&gw, &["key", "list", "--client", "acme"]).await;
    assert!(!list.to_string().contains(&key), "no secret in listings");
    let ci = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "ci")
        .unwrap()
        .clone();
    assert_eq!(ci["permissions"], json!(["read", "write"]));
    assert!(ci["expires_at"].is_string());
    let id = ci["id"].as_str().unwrap().to_owned();
    assert_eq!(
        kg_json(&gw, &["key", "list"])
            .await
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // get / disable / enable / update.
    assert_eq!(kg_json(&gw, &["key", "get", &id]).await["name"], "ci");
    assert_eq!(
        kg_json(&gw, &["key", "disable", &id]).await["enabled"],
        false
    );
    assert_eq!(status(&gw, &key).await, 401);
    assert_eq!(kg_json(&gw, &["key", "enable", &id]).await["enabled"], true);
    assert_eq!(status(&gw, &key).await, 200);
    let v = kg_json(
        &gw,
        &[
            "key",
            "update",
            &id,
            "--name",
            "ci-2",
            "--permission",
            "admin",
            "--never-expire",
        ],
    )
    .await;
    assert_eq!(
        (
            v["name"].clone(),
            v["permissions"].clone(),
            v["expires_at"].clone()
        ),
        (json!("ci-2"), json!(["admin"]), Value::Null)
    );

    // rotate with grace: both work for now; --quiet prints the new key alone.
    let o = kg(&gw, &["key", "rotate", &id, "--grace", "60", "--quiet"]).await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rotated = stdout(&o).trim_end().to_owned();
    assert_ne!(rotated, key);
    assert_eq!(status(&gw, &rotated).await, 200);
    assert_eq!(status(&gw, &key).await, 200);
    let v = kg_json(&gw, &["key", "rotate", &id]).await;
    let again = v["key"].as_str().unwrap();
    assert_eq!(status(&gw, again).await, 200);
    assert_eq!(
        status(&gw, &rotated).await,
        401,
        "no grace: the old key stops"
    );

    // usage.
    let v = kg_json(&gw, &["key", "usage", &id, "--days", "7"]).await;
    assert_eq!(v["key_id"], id.as_str());
    assert!(v["days"].is_array());

    // delete: the key stops; deleting again is refused.
    assert_eq!(
        kg_json(&gw, &["key", "delete", &id]).await["id"],
        id.as_str()
    );
    assert_eq!(status(&gw, again).await, 401);
    let o = kg(&gw, &["key", "delete", &id]).await;
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no API key with this id"));

    // client delete: its keys stop.
    kg_json(&gw, &["client", "delete", "acme"]).await;
    assert_eq!(status(&gw, &first).await, 401);
    assert_eq!(gw.admin("GET", "/v1/clients/acme", None).await.status, 404);
}

#[tokio::test]
async fn tables_by_default_and_quiet_changes_print_nothing() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let o = kg(&gw, &["client", "list"]).await;
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("CLIENT_ID  LICENSE  CREATED_AT")
    );
    assert!(lines.next().unwrap().starts_with("acme       pro"));
    let o = kg(&gw, &["key", "list"]).await;
    assert!(stdout(&o).starts_with("ID "));
    assert!(stdout(&o).contains("acme"));
    let o = kg(&gw, &["key", "create", "--client", "acme", "--name", "t"]).await;
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("key: kg_"));
    assert!(stderr(&o).contains("shown once"));
    let o = kg(
        &gw,
        &["client", "update", "acme", "--license", "free", "--quiet"],
    )
    .await;
    assert_eq!((code(&o), stdout(&o)), (0, String::new()));
}

#[tokio::test]
async fn usage_errors_exit_2_and_refusals_exit_1() {
    let gw = Gateway::start().await;
    for args in [
        &["client"][..],
        &["client", "frobnicate"],
        &["client", "create", "acme"],
        &["key", "create", "--client", "acme"],
        &["key", "rotate", "some-id", "--grace", "soon"],
        &["key", "list", "--output", "yaml"],
        &["key", "import", "/no/such/file.jsonl"],
        &["key", "import", "-", "--on-error", "abort"],
        &["key", "import", "f", "--batch", "0"],
        &["client", "update", "acme"],
        // Past the 100 years a key may be given (once a panic in the date arithmetic).
        &[
            "key",
            "update",
            "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d",
            "--expires-days",
            "4000000000",
        ],
        &[
            "key",
            "update",
            "0193a4c2-5e1f-7b3a-9c4d-2f6e8a0b1c3d",
            "--expires-days",
            "36501",
        ],
        &[
            "key",
            "create",
            "--client",
            "acme",
            "--name",
            "n",
            "--expires-days",
            "0",
        ],
        &[
            "client",
            "create",
            "acme",
            "--license",
            "pro",
            "--metadata",
            "{not json",
        ],
    ] {
        let o = kg(&gw, args).await;
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
    // No admin key.
    let o = kg_with(&gw, &["client", "list"], &[]).await;
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("KEYGATE_ADMIN_KEY"));
    // A bad admin URL.
    let o = tokio::task::spawn_blocking(|| {
        Binary::command(["client", "list", "--admin-url", "ftp://x"])
            .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
            .output()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // A user and password in the admin URL: refused, and not printed.
    let o = tokio::task::spawn_blocking(|| {
        Binary::command([
            "client",
            "list",
            "--admin-url",
            "http://ops:hunter2@127.0.0.1:1",
        ])
        .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
        .output()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!stderr(&o).contains("hunter2"), "{}", stderr(&o));
    // A wrong admin key: refused by the server.
    let o = kg_with(
        &gw,
        &["client", "list"],
        &[("KEYGATE_ADMIN_KEY", "not-the-admin-key-at-all")],
    )
    .await;
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    // Nobody listening: exit 1.
    let (closed, _hold) = crate::support::closed_port();
    let o = tokio::task::spawn_blocking(move || {
        Binary::command(["client", "list", "--admin-url"])
            .arg(format!("http://{closed}"))
            .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
            .output()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("cannot reach"), "{}", stderr(&o));
    // An id that tries to leave its path segment stays in it.
    let o = kg(&gw, &["key", "get", "../../v1/clients", "--output", "json"]).await;
    assert_eq!(code(&o), 1);
    assert_eq!(stdout(&o), "");
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Without `--admin-url` the admin API is where the config file's `[admin] listen` says (with
/// `KEYGATE_ADMIN_LISTEN` over it), even when the file is not one `serve` would start with
/// (here: TLS files for the proxy that do not exist on this machine); a listen address that is
/// not one is a usage error naming the setting.
#[tokio::test]
async fn the_admin_url_comes_from_the_config_file_without_judging_the_rest() {
    let gw = Gateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keygate.toml");
    let run = |config: String, env: Vec<(&'static str, String)>| {
        let file = file.clone();
        async move {
            std::fs::write(&file, config).unwrap();
            tokio::task::spawn_blocking(move || {
                let mut launch = Binary::command(["client", "list", "--output", "json"])
                    .arg("--config")
                    .arg(&file)
                    .env("KEYGATE_ADMIN_KEY", ADMIN_KEY);
                for (k, v) in env {
                    launch = launch.env(k, v);
                }
                launch.output()
            })
            .await
            .unwrap()
        }
    };
    let elsewhere =
        "[proxy]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n";
    let o = run(
        format!("{elsewhere}[admin]\nlisten = \"{}\"\n", gw.admin),
        vec![],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(listed.is_array() || listed["data"].is_array(), "{listed}");
    // The environment's address wins over the file's.
    let o = run(
        format!("{elsewhere}[admin]\nlisten = \"127.0.0.1:1\"\n"),
        vec![("KEYGATE_ADMIN_LISTEN", gw.admin.to_string())],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Not an address: exit 2, the setting named.
    let o = run("[admin]\nlisten = \"localhost\"\n".into(), vec![]).await;
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("admin.listen"), "{}", stderr(&o));
    gw.stop().await;
}

#[tokio::test]
async fn key_import_streams_json_lines_and_reports_bad_lines_by_number() {
    let gw = Gateway::start_with("[keys]\nmax_per_client = 0\n").await;
    gw.client("acme", "pro").await;
    gw.client("globex", "pro").await;
    let kong = "kong-style-key-AbCdEf0123456789";
    let unkey = "unkey_3ZkT9p8QxW2mN5vB7cR4yH6jL1";
    let file = gw.dir.path().join("keys.jsonl");
    let lines = [
        json!({"client_id": "acme", "name": "kong", "key": kong, "permissions": ["read"]})
            .to_string(),
        json!({"client_id": "globex", "name": "unkey", "sha256": sha256_hex(unkey)}).to_string(),
        "{\"client_id\": \"acme\", \"name\": \"broken\"".into(),
        String::new(),
        json!({"client_id": "nobody", "name": "x", "key": "unknown-client-key-0123"}).to_string(),
        json!({"client_id": "acme", "name": "short", "key": "short"}).to_string(),
        format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000)),
        json!({"client_id": "acme", "name": "last", "key": "the-last-key-0123456789"}).to_string(),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let path = file.to_str().unwrap();
    let o = kg(&gw, &["key", "import", path, "--batch", "2"]).await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let err = stderr(&o);
    for want in [
        "line 3: not a JSON object",
        "line 5: no client with this client_id",
        "line 6: key: must be 16–256",
        "line 7: longer than 65536 bytes",
        "progress: 3 keys imported",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
    assert!(!err.contains(kong) && !stdout(&o).contains(kong));
    assert_eq!(stdout(&o), "imported 3 keys; 4 lines refused\n");
    for k in [kong, unkey, "the-last-key-0123456789"] {
        assert_eq!(status(&gw, k).await, 200, "{k}");
    }
    // Again, from stdin, as JSON: everything is a duplicate now.
    let o = tokio::task::spawn_blocking({
        let admin = gw.admin;
        let file = file.clone();
        move || {
            std::process::Command::new(crate::support::binary::BIN)
                .args(["key", "import", "-", "--output", "json", "--admin-url"])
                .arg(format!("http://{admin}"))
                .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
                .stdin(std::fs::File::open(file).unwrap())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["imported"].clone(), v["refused"].clone()),
        (json!(0), json!(7))
    );
    assert!(stderr(&o).contains("line 1: a key with this secret is already stored"));
}

/// A batch whose answer never came may have been stored (the server can fail after its write):
/// `key import` says it does not know, and how to find out; a refusal (4xx) wrote nothing and
/// says so.
#[tokio::test]
async fn key_import_does_not_claim_a_batch_whose_answer_was_lost_stored_nothing() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let file = gw.dir.path().join("keys.jsonl");
    std::fs::write(
        &file,
        json!({"client_id": "acme", "name": "k", "key": "lost-answer-key-0123456789"}).to_string(),
    )
    .unwrap();
    // An admin address that takes the request and closes without an answer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
        }
    });
    let path = file.to_str().unwrap().to_owned();
    let o = tokio::task::spawn_blocking(move || {
        Binary::command(["key", "import", &path, "--admin-url"])
            .arg(format!("http://{addr}"))
            .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
            .output()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("is not known"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("none from it on"), "{}", stderr(&o));
    // Refused (a wrong admin key): nothing from it on, and so it is.
    let o = kg_with(
        &gw,
        &["key", "import", file.to_str().unwrap()],
        &[("KEYGATE_ADMIN_KEY", "not-the-admin-key-at-all")],
    )
    .await;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("none from it on"), "{}", stderr(&o));
    assert_eq!(status(&gw, "lost-answer-key-0123456789").await, 401);
}

/// An admin API that takes the request and never answers: every command ends after
/// `--timeout-secs` (exit 1, saying no answer came), and an import says its batch's fate is not
/// known (it waited for ever).
#[tokio::test]
async fn an_admin_api_that_never_answers_ends_the_command_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.jsonl");
    std::fs::write(
        &file,
        json!({"client_id": "acme", "name": "k", "key": "never-answered-key-0123456789"})
            .to_string(),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let path = file.to_str().unwrap().to_owned();
    for (args, said) in [
        (vec!["key", "list"], "no answer from the admin API"),
        (vec!["key", "import", path.as_str()], "is not known"),
    ] {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let o = tokio::task::spawn_blocking(move || {
            Binary::command(args)
                .arg("--admin-url")
                .arg(format!("http://{addr}"))
                .arg("--timeout-secs")
                .arg("1")
                .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
                // (Without a timeout of its own the command waited for ever.)
                .output_within(std::time::Duration::from_secs(60))
        })
        .await
        .unwrap();
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(said), "{}", stderr(&o));
    }
    // Out of its range: a usage error.
    let o = tokio::task::spawn_blocking(move || {
        Binary::command(["key", "list", "--timeout-secs", "0"])
            .arg("--admin-url")
            .arg(format!("http://{addr}"))
            .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
            .output()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

/// `keygate key import FILE --on-error abort --batch N`.
async fn import_abort(gw: &Gateway, file: &std::path::Path, batch: usize) -> Output {
    let batch = batch.to_string();
    let args = [
        "key",
        "import",
        file.to_str().unwrap(),
        "--on-error",
        "abort",
        "--batch",
        &batch,
    ];
    kg(gw, &args).await
}

#[tokio::test]
async fn key_import_abort_checks_every_line_first_and_stops_before_a_refused_batch() {
    let gw = Gateway::start_with("[keys]\nmax_per_client = 0\n").await;
    gw.client("acme", "pro").await;
    let key = |i: usize| format!("abort-mode-key-{i:04}-padding");
    let line = |client: &str, i: usize| {
        json!({"client_id": client, "name": format!("k{i}"), "key": key(i)}).to_string()
    };
    let before = gw.admin("GET", "/v1/api-keys", None).await.json()["total"].clone();

    // A locally bad line: reported, nothing sent.
    let file = gw.dir.path().join("bad.jsonl");
    let text = [
        line("acme", 1),
        line("acme", 2),
        "[1, 2]".into(),
        line("acme", 4),
    ]
    .join("\n");
    std::fs::write(&file, text).unwrap();
    let o = kg(
        &gw,
        &[
            "key",
            "import",
            file.to_str().unwrap(),
            "--on-error",
            "abort",
        ],
    )
    .await;
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("line 3: not a JSON object"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("nothing was imported"));
    assert_eq!(status(&gw, &key(1)).await, 401);
    assert_eq!(
        gw.admin("GET", "/v1/api-keys", None).await.json()["total"],
        before
    );
    // Lines the server would refuse for their shape alone, each found before anything is sent
    // (in batches of one, line 1 would be imported first were it not).
    for (bad, says) in [
        (
            json!({"client_id": "acme", "name": "", "key": key(2)}),
            "name: ",
        ),
        (
            json!({"client_id": "not an id!", "name": "k", "key": key(2)}),
            "client_id: ",
        ),
        (
            json!({"client_id": "acme", "name": "k", "key": key(2), "colour": "red"}),
            "unknown field `colour`",
        ),
        (
            json!({"client_id": "acme", "name": "k", "key": key(2), "permissions": "read"}),
            "permissions: ",
        ),
        (
            json!({"client_id": "acme", "name": "k", "key": key(2), "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at: must be in the future",
        ),
    ] {
        let text = [line("acme", 1), bad.to_string(), line("acme", 3)].join("\n");
        std::fs::write(&file, text).unwrap();
        let o = import_abort(&gw, &file, 1).await;
        assert_eq!(code(&o), 1, "{bad}");
        assert!(
            stderr(&o).contains(&format!("line 2: {says}")),
            "{bad}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains("nothing was imported"),
            "{bad}: {}",
            stderr(&o)
        );
        assert_eq!(status(&gw, &key(1)).await, 401, "{bad}");
    }

    // A key the server refuses (unknown client) on line 5, batches of 2: lines 1–4 are
    // imported, the batch of lines 5–6 and everything after are not.
    let file = gw.dir.path().join("server.jsonl");
    let text = (1..=8)
        .map(|i| line(if i == 5 { "nobody" } else { "acme" }, i))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&file, text).unwrap();
    let o = import_abort(&gw, &file, 2).await;
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(
        err.contains("line 5: no client with this client_id"),
        "{err}"
    );
    assert!(
        err.contains("4 keys were imported, all from lines before 5"),
        "{err}"
    );
    for i in 1..=8 {
        let want = if i <= 4 { 200 } else { 401 };
        assert_eq!(status(&gw, &key(i)).await, want, "line {i}");
    }
}

#[tokio::test]
async fn key_import_draws_a_progress_bar_with_rate_and_eta_on_a_terminal() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let file = gw.dir.path().join("keys.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|i| {
            json!({"client_id": "acme", "name": format!("k{i}"), "key": format!("terminal-key-{i:04}-padding")})
                .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    // `script` (util-linux) runs the command on a pseudo-terminal and copies what it drew.
    let cmd = format!(
        "{} key import {} --admin-url http://{}",
        crate::support::binary::BIN,
        file.display(),
        gw.admin
    );
    let o = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("KEYGATE_ADMIN_KEY", ADMIN_KEY)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let drawn = stdout(&o);
    assert!(
        drawn.contains("\r[##############################] 100% 3 keys"),
        "{drawn:?}"
    );
    assert!(drawn.contains("/s ETA 0:00"), "{drawn:?}");
    assert!(
        !drawn.contains("progress:"),
        "no plain lines on a terminal: {drawn:?}"
    );
    assert!(drawn.contains("imported 3 keys; 0 lines refused"));
}

/// A standard output that cannot be written: a pipe whose reader has gone (`keygate … | head`
/// after head quit) or a full disk (`/dev/full`).
fn unwritable(closed: bool) -> std::process::Stdio {
    if closed {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer.into()
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
            .into()
    }
}

async fn kg_to(gw: &Gateway, args: &[&str], closed: bool) -> Output {
    let launch = Binary::command(args)
        .arg("--admin-url")
        .arg(format!("http://{}", gw.admin))
        .env("KEYGATE_ADMIN_KEY", ADMIN_KEY);
    tokio::task::spawn_blocking(move || launch.output_to(unwritable(closed)))
        .await
        .unwrap()
}

async fn key_names(gw: &Gateway, client: &str) -> Vec<String> {
    let r = gw
        .admin("GET", &format!("/v1/api-keys?client_id={client}"), None)
        .await;
    assert_eq!(r.status, 200);
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect()
}

/// stdout closed or full: exit 1 with the reason on stderr, never a panic (exit 101); a key
/// made by the command whose secret could not be shown is deleted again, so no key exists
/// that nobody holds; a rotation that could not be shown is named.
#[tokio::test]
async fn a_closed_or_full_stdout_is_an_error_and_leaves_no_unseen_secret() {
    let gw = Gateway::start().await;
    gw.client("acme", "pro").await;
    let names = key_names(&gw, "acme").await;
    for closed in [true, false] {
        for quiet in [false, true] {
            let mut args = vec!["key", "create", "--client", "acme", "--name", "ci"];
            if quiet {
                args.push("--quiet");
            }
            let o = kg_to(&gw, &args, closed).await;
            assert_eq!(code(&o), 1, "{args:?}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("cannot write to standard output"),
                "{}",
                stderr(&o)
            );
            assert!(
                stderr(&o).contains("could not be shown, so it was deleted again"),
                "{}",
                stderr(&o)
            );
            assert_eq!(key_names(&gw, "acme").await, names, "closed {closed}");
        }
        // A new client's first key goes the same way; the client stands.
        let id = if closed { "initech" } else { "globex" };
        let o = kg_to(&gw, &["client", "create", id, "--license", "free"], closed).await;
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains("deleted again"), "{}", stderr(&o));
        assert_eq!(key_names(&gw, id).await, Vec::<String>::new());
        // Reads: exit 1, the reason on stderr.
        for args in [
            &["key", "list"][..],
            &["client", "list", "--output", "json"],
            &["client", "get", "acme"],
            &["export"],
        ] {
            let o = kg_to(&gw, args, closed).await;
            assert_eq!(code(&o), 1, "{args:?}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("cannot write to standard output"),
                "{args:?}: {}",
                stderr(&o)
            );
        }
    }
    let k = gw.key("acme", json!({"name": "turn"})).await;
    let id = k["id"].as_str().unwrap();
    let o = kg_to(&gw, &["key", "rotate", id], true).await;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "key {id} has a new secret that could not be shown"
        )),
        "{}",
        stderr(&o)
    );
}
