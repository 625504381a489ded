//! `keygate export | diff | apply` with the real binary: export → diff is empty; an edited
//! file is listed by diff (exit 3) and applied; a second apply changes nothing; a state
//! exported from one gateway converges another; no secret ever appears in an export; bad
//! files are usage errors that change nothing.

use std::path::Path;
use std::process::Output;

use serde_json::{Value, json};

use crate::support::binary::Binary;
use crate::support::{ADMIN_KEY, Gateway};

const ROUTES: &str =
    "[[routes]]\npath = \"/v1\"\npermissions = [\"read\"]\n[[routes]]\npath = \"/\"\n";

async fn kg(gw: &Gateway, args: &[&str]) -> Output {
    let launch = Binary::command(args)
        .arg("--admin-url")
        .arg(format!("http://{}", gw.admin))
        .env("KEYGATE_ADMIN_KEY", ADMIN_KEY);
    tokio::task::spawn_blocking(move || launch.output())
        .await
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn export(gw: &Gateway, to: &Path) -> String {
    let o = kg(gw, &["export"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    std::fs::write(to, &o.stdout).unwrap();
    out(&o)
}

async fn diff(gw: &Gateway, file: &Path) -> (i32, String) {
    let o = kg(gw, &["diff", file.to_str().unwrap()]).await;
    (o.status.code().unwrap(), out(&o) + &err(&o))
}

async fn apply(gw: &Gateway, file: &Path) -> Output {
    let o = kg(gw, &["apply", file.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    o
}

/// Every client and key as the admin API shows them (with `updated_at`, so a write shows).
async fn snapshot(gw: &Gateway) -> (Value, Value) {
    let c = gw
        .admin("GET", "/v1/clients?per_page=1000", None)
        .await
        .json();
    let k = gw
        .admin("GET", "/v1/api-keys?per_page=1000", None)
        .await
        .json();
    (c["data"].clone(), k["data"].clone())
}

async fn seed(gw: &Gateway) -> Vec<String> {
    let (a, _) = gw.client("acme", "pro").await;
    let (b, _) = gw.client("globex", "free").await;
    let r = gw
        .admin(
            "PATCH",
            "/v1/clients/globex",
            Some(json!({"metadata": {"tier": 2, "note": null, "tags": ["x"]}})),
        )
        .await;
    assert_eq!(r.status, 200);
    let k = gw
        .key(
            "acme",
            json!({"name": "ci", "permissions": ["read", "write"], "expires_days": 30,
                   "rate_limit": {"per_second": 5, "burst": 10}, "metadata": {"team": "ops"}}),
        )
        .await;
    let d = gw
        .key("acme", json!({"name": "off", "enabled": false}))
        .await;
    vec![
        a,
        b,
        k["key"].as_str().unwrap().into(),
        d["key"].as_str().unwrap().into(),
    ]
}

#[tokio::test]
async fn export_then_diff_is_empty_and_edits_converge_idempotently() {
    let gw = Gateway::start_with(ROUTES).await;
    let secrets = seed(&gw).await;
    let file = gw.dir.path().join("state.toml");
    let text = export(&gw, &file).await;
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret in the export");
        assert!(!text.contains(&hex::encode(sha2::Digest::finalize(
            <sha2::Sha256 as sha2::Digest>::new_with_prefix(s.as_bytes())
        ))));
    }
    for want in [
        "[[clients]]",
        "[[keys]]",
        "[plans.pro",
        "[plans.free",
        "[[routes]]",
        "path = \"/v1\"",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    assert_eq!(diff(&gw, &file).await, (0, String::new()));

    // Edit: globex's license, disable ci, remove "off", add a key by name, add a client with
    // two keys, remove nothing else.
    let mut state: toml::Table = toml::from_str(&text).unwrap();
    let clients = state["clients"].as_array_mut().unwrap();
    for c in clients.iter_mut() {
        if c["client_id"].as_str() == Some("globex") {
            c.as_table_mut().unwrap()["license"] = "pro".into();
        }
    }
    clients.push(toml::Value::Table(
        toml::toml! { client_id = "initech" license = "free" },
    ));
    let keys = state["keys"].as_array_mut().unwrap();
    keys.retain(|k| k["name"].as_str() != Some("off"));
    for k in keys.iter_mut() {
        if k["name"].as_str() == Some("ci") {
            k.as_table_mut().unwrap()["enabled"] = false.into();
        }
    }
    keys.push(toml::Value::Table(
        toml::toml! { client_id = "acme" name = "new-one" permissions = ["read"] },
    ));
    keys.push(toml::Value::Table(
        toml::toml! { client_id = "initech" name = "first" },
    ));
    keys.push(toml::Value::Table(
        toml::toml! { client_id = "initech" name = "second" metadata = "{\"a\":1}" },
    ));
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();

    let (code, listed) = diff(&gw, &file).await;
    assert_eq!(code, 3, "{listed}");
    for want in [
        "~ client globex: license free → pro",
        "+ client initech (license free)",
        "- key acme/off",
        "~ key acme/ci",
        "enabled true → false",
        "+ key acme/new-one",
        "+ key initech/first",
        "+ key initech/second",
    ] {
        assert!(listed.contains(want), "{want:?} missing from:\n{listed}");
    }
    let before = snapshot(&gw).await;
    assert_eq!(diff(&gw, &file).await.0, 3, "diff changes nothing");
    assert_eq!(snapshot(&gw).await, before);

    let o = apply(&gw, &file).await;
    // New secrets are printed once: they work on the proxy.
    let created: Vec<String> = out(&o)
        .lines()
        .filter_map(|l| l.split_once(": kg_").map(|(_, k)| format!("kg_{k}")))
        .collect();
    assert_eq!(created.len(), 3, "{}", out(&o));
    for k in &created {
        assert_eq!(gw.get_with_key("/x", k).await.status, 200);
    }
    assert_eq!(
        gw.get_with_key("/x", &secrets[2]).await.status,
        401,
        "ci disabled"
    );
    assert_eq!(
        gw.get_with_key("/x", &secrets[3]).await.status,
        401,
        "off deleted"
    );
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    let (_, keys) = snapshot(&gw).await;
    let initech: Vec<&Value> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["client_id"] == "initech")
        .collect();
    assert_eq!(
        initech.len(),
        2,
        "the client's automatic first key became `first`"
    );

    // A second apply changes nothing at all.
    let before = snapshot(&gw).await;
    let o = apply(&gw, &file).await;
    assert_eq!(out(&o), "");
    assert_eq!(snapshot(&gw).await, before);
}

#[tokio::test]
async fn a_state_exported_from_one_gateway_converges_another() {
    let a = Gateway::start_with(ROUTES).await;
    seed(&a).await;
    let file = a.dir.path().join("state.toml");
    export(&a, &file).await;

    // The same routes, to the same upstream: the state's [[routes]] match.
    let url = a.upstream.url();
    let b = Gateway::start_custom(
        crate::support::Upstream::start().await,
        |_| url.clone(),
        ROUTES,
    )
    .await;
    b.client("stale", "free").await;
    let (code, listed) = diff(&b, &file).await;
    assert_eq!(code, 3);
    assert!(listed.contains("- client stale"), "{listed}");
    apply(&b, &file).await;
    assert_eq!(diff(&b, &file).await, (0, String::new()));
    // Same clients and keys, by everything but ids, times and secrets.
    let strip = |v: Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|k| {
                json!([
                    k["client_id"],
                    k["name"],
                    k["license"],
                    k["permissions"],
                    k["enabled"],
                    k["rate_limit"],
                    k["metadata"],
                    k["expires_at"].is_string()
                ])
            })
            .collect()
    };
    let (ca, ka) = snapshot(&a).await;
    let (cb, kb) = snapshot(&b).await;
    assert_eq!(strip(ca), strip(cb));
    assert_eq!(strip(ka), strip(kb));
    let before = snapshot(&b).await;
    assert_eq!(out(&apply(&b, &file).await), "");
    assert_eq!(snapshot(&b).await, before);
}

/// A client whose plan has left the configuration (it is served at the default limit) keeps
/// its license through export, diff and apply: only a new client or a change of license must
/// name a plan of the gateway (its own export was refused, and nothing could be applied).
#[tokio::test]
async fn a_client_whose_plan_left_the_config_does_not_block_its_own_export() {
    let gw = Gateway::start_with(ROUTES).await;
    seed(&gw).await;
    // As a gateway started without the plan the client was made under leaves it.
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    db.execute(
        "INSERT INTO clients (client_id, license, created_at) VALUES ('legacy', 'retired', 0)",
        [],
    )
    .unwrap();
    let file = gw.dir.path().join("state.toml");
    let text = export(&gw, &file).await;
    assert!(text.contains("retired"), "{text}");
    let (code, said) = diff(&gw, &file).await;
    assert_eq!(code, 0, "{said}");
    apply(&gw, &file).await;
    // Moving a client to it is still refused, naming the plans there are.
    std::fs::write(
        &file,
        text.replace(
            "client_id = \"acme\"\nlicense = \"pro\"",
            "client_id = \"acme\"\nlicense = \"retired\"",
        ),
    )
    .unwrap();
    let (code, said) = diff(&gw, &file).await;
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("is not a plan of this gateway"), "{said}");
}

#[tokio::test]
async fn bad_state_files_are_usage_errors_and_change_nothing() {
    let gw = Gateway::start_with(ROUTES).await;
    seed(&gw).await;
    let file = gw.dir.path().join("state.toml");
    let good = export(&gw, &file).await;
    let before = snapshot(&gw).await;
    let bad_files = [
        "this is [not toml".to_string(),
        // Empty (as `export > file` leaves it when the export fails), or without the keys:
        // apply would delete every client, or every key.
        String::new(),
        "# keygate state\n".to_string(),
        good.lines()
            .take_while(|l| !l.starts_with("[[keys]]"))
            .collect::<Vec<_>>()
            .join("\n"),
        format!("unknown = 1\n{good}"),
        good.replace(
            "client_id = \"acme\"\nlicense",
            "client_id = \"acme\"\nlicence",
        ),
        // A key of a client not in the file.
        format!("{good}\n[[keys]]\nclient_id = \"nobody\"\nname = \"x\"\n"),
        // Two keys of one client with one name and no ids.
        format!(
            "{good}\n[[keys]]\nclient_id = \"acme\"\nname = \"twin\"\n[[keys]]\nclient_id = \"acme\"\nname = \"twin\"\n"
        ),
        format!("{good}\n[[keys]]\nclient_id = \"acme\"\nname = \"m\"\nmetadata = \"[1]\"\n"),
        // A license the gateway has no plan for (refused by the server once clients before
        // it were made).
        format!("{good}\n[[clients]]\nclient_id = \"zeta\"\nlicense = \"nope\"\n"),
        // A key that has expired since the export, to be made here with a new client: the
        // gateway takes no past expiry, so apply once stopped halfway (the client made).
        format!(
            "{good}\n[[clients]]\nclient_id = \"newco\"\nlicense = \"free\"\n\
             [[keys]]\nclient_id = \"newco\"\nname = \"old\"\nexpires_at = \"2020-01-01T00:00:00Z\"\n"
        ),
    ];
    for text in &bad_files {
        std::fs::write(&file, text).unwrap();
        for cmd in ["diff", "apply"] {
            let o = kg(&gw, &[cmd, file.to_str().unwrap()]).await;
            assert_eq!(o.status.code(), Some(2), "{cmd} {text}: {}", err(&o));
        }
    }
    assert_eq!(snapshot(&gw).await, before);
    let o = kg(&gw, &["apply", file.to_str().unwrap()]).await;
    assert!(
        err(&o).contains("newco/old: expires_at 2020-01-01T00:00:00Z has passed"),
        "{}",
        err(&o)
    );
    std::fs::write(&file, "").unwrap();
    let o = kg(&gw, &["apply", file.to_str().unwrap()]).await;
    assert!(err(&o).contains("clients = []"), "{}", err(&o));
    // Routes that differ from the running configuration: diff says so, apply refuses whole.
    std::fs::write(&file, good.replace("path = \"/v1\"", "path = \"/v2\"")).unwrap();
    let (code, listed) = diff(&gw, &file).await;
    assert_eq!(code, 3);
    assert!(listed.contains("[[routes]] differ"), "{listed}");
    let o = kg(&gw, &["apply", file.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("nothing was changed"));
    assert_eq!(snapshot(&gw).await, before);
    // GET /v1/config is for admins only.
    let r = gw.admin_as("GET", "/v1/config", None, &[]).await;
    assert_eq!(r.status, 401);
}

/// A change the server refuses stops `apply`: it says which change and that those before it
/// stand, and the first key made with a new client this run is removed (else it stayed, its
/// secret never shown, and the rerun took it for the file's key of that name and showed none).
#[tokio::test]
async fn an_apply_that_stops_says_where_and_leaves_no_key_without_its_secret() {
    let gw = Gateway::start_with(ROUTES).await;
    seed(&gw).await;
    let file = gw.dir.path().join("state.toml");
    let good = export(&gw, &file).await;
    let with = |more: &str| {
        format!(
            "{good}\n[[clients]]\nclient_id = \"newco\"\nlicense = \"free\"\n\
             [[keys]]\nclient_id = \"newco\"\nname = \"default\"\n{more}"
        )
    };
    std::fs::write(&file, with("rate_limit = { per_second = 0, burst = 0 }\n")).unwrap();
    let o = kg(&gw, &["apply", file.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        err(&o).contains("apply stopped at change 2 of 2 (+ key newco/default"),
        "{}",
        err(&o)
    );
    assert!(err(&o).contains("the 1 before it stand"), "{}", err(&o));
    assert!(err(&o).contains("removed, as apply stopped"), "{}", err(&o));
    let r = gw.admin("GET", "/v1/api-keys?client_id=newco", None).await;
    assert_eq!(
        r.json()["data"],
        json!([]),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // Mended and applied again: the key is made and its secret shown.
    std::fs::write(&file, with("")).unwrap();
    let o = apply(&gw, &file).await;
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("newco/default "), "{}", out(&o));
    assert!(out(&o).contains(": kg_"), "{}", out(&o));
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
}

async fn webhooks(gw: &Gateway) -> Vec<Value> {
    let r = gw.admin("GET", "/v1/webhooks", None).await;
    assert_eq!(r.status, 200);
    r.json()["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn webhooks_are_exported_without_secrets_and_converge() {
    let gw = Gateway::start_with(ROUTES).await;
    seed(&gw).await;
    let mut secrets = Vec::new();
    for (url, events) in [
        ("https://hooks.example.com/a", json!(["key.created"])),
        ("https://hooks.example.com/b", json!("*")),
    ] {
        let r = gw
            .admin(
                "POST",
                "/v1/webhooks",
                Some(json!({"url": url, "events": events})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        secrets.push(r.json()["secret"].as_str().unwrap().to_owned());
    }
    let file = gw.dir.path().join("state.toml");
    let text = export(&gw, &file).await;
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a webhook secret in the export");
    }
    assert!(!text.contains("whsec_"), "{text}");
    assert!(!text.contains("secret ="), "{text}");
    let state: toml::Table = toml::from_str(&text).unwrap();
    let hooks = state["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2, "{text}");
    assert_eq!(
        hooks[0]["url"].as_str(),
        Some("https://hooks.example.com/a")
    );
    assert!(hooks[0]["id"].as_str().unwrap().starts_with("wh_"));
    assert_eq!(diff(&gw, &file).await, (0, String::new()));

    // Edit one webhook's events, drop the other, add one without an id.
    let mut state = state;
    let hooks = state["webhooks"].as_array_mut().unwrap();
    hooks[0].as_table_mut().unwrap()["events"] =
        toml::Value::Array(vec!["key.created".into(), "key.revoked".into()]);
    hooks.remove(1);
    hooks.push(toml::Value::Table(toml::toml! {
        url = "https://hooks.example.com/new" events = ["client.created"]
    }));
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();

    let before = webhooks(&gw).await;
    let (code, listed) = diff(&gw, &file).await;
    assert_eq!(code, 3, "{listed}");
    for want in [
        "~ webhook https://hooks.example.com/a",
        "events key.created → key.created, key.revoked",
        "- webhook https://hooks.example.com/b",
        "+ webhook https://hooks.example.com/new (client.created)",
    ] {
        assert!(listed.contains(want), "{want:?} missing from:\n{listed}");
    }
    assert_eq!(webhooks(&gw).await, before, "diff changes nothing");

    let o = apply(&gw, &file).await;
    let printed = out(&o);
    // The new webhook's secret is printed once, and is the one the gateway signs with: it is
    // not one of the earlier secrets, and it appears nowhere else.
    let new_secret: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.split_once(": whsec_").map(|(_, s)| s))
        .collect();
    assert_eq!(new_secret.len(), 1, "{printed}");
    assert!(!secrets.iter().any(|s| s.ends_with(new_secret[0])));
    let after = webhooks(&gw).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0]["url"], "https://hooks.example.com/a");
    assert_eq!(after[0]["id"], before[0]["id"], "updated in place");
    assert_eq!(after[0]["events"], json!(["key.created", "key.revoked"]));
    assert_eq!(after[1]["url"], "https://hooks.example.com/new");
    assert_eq!(after[1]["events"], json!(["client.created"]));
    assert!(
        printed.contains(after[1]["id"].as_str().unwrap()),
        "{printed}"
    );
    assert_eq!(diff(&gw, &file).await, (0, String::new()));

    // A second apply changes nothing at all.
    let o = apply(&gw, &file).await;
    assert_eq!(out(&o), "");
    assert_eq!(webhooks(&gw).await, after);

    // A state file without webhooks leaves them alone; an empty list removes them.
    let mut state: toml::Table = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    state.remove("webhooks");
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    state.insert("webhooks".into(), toml::Value::Array(vec![]));
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();
    assert_eq!(diff(&gw, &file).await.0, 3);
    apply(&gw, &file).await;
    assert!(webhooks(&gw).await.is_empty());

    // A webhook in the file that the server does not have is created there (as on a fresh
    // gateway given an export): matched by URL from then on.
    std::fs::write(
        &file,
        format!(
            "{}\n[[webhooks]]\nid = \"wh_00000000000000000000000000000000\"\nurl = \"https://hooks.example.com/c\"\nevents = [\"*\"]\n",
            toml::to_string(&{
                let mut s = state.clone();
                s.remove("webhooks");
                s
            })
            .unwrap()
        ),
    )
    .unwrap();
    let (code, listed) = diff(&gw, &file).await;
    assert_eq!(code, 3);
    assert!(
        listed.contains("+ webhook https://hooks.example.com/c (*)"),
        "{listed}"
    );
    let o = apply(&gw, &file).await;
    assert!(out(&o).contains(": whsec_"), "{}", out(&o));
    let hooks = webhooks(&gw).await;
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["url"], "https://hooks.example.com/c");
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    assert_eq!(out(&apply(&gw, &file).await), "");

    // Hostile files: empty events, one URL twice without ids; usage errors, nothing changed.
    for extra in [
        "[[webhooks]]\nurl = \"https://hooks.example.com/d\"\nevents = []\n",
        "[[webhooks]]\nurl = \"https://hooks.example.com/d\"\nevents = [\"*\"]\n[[webhooks]]\nurl = \"https://hooks.example.com/d\"\nevents = [\"*\"]\n",
        "[[webhooks]]\nurl = \"https://hooks.example.com/d\"\nevents = [\"*\"]\nsecret = \"whsec_x\"\n",
    ] {
        let bad = format!("{}\n{extra}", std::fs::read_to_string(&file).unwrap());
        let bad_file = gw.dir.path().join("bad.toml");
        std::fs::write(&bad_file, bad).unwrap();
        for cmd in ["diff", "apply"] {
            let o = kg(&gw, &[cmd, bad_file.to_str().unwrap()]).await;
            assert_eq!(o.status.code(), Some(2), "{cmd} {extra}: {}", err(&o));
        }
    }
    assert_eq!(webhooks(&gw).await, hooks);
}

/// A plan's scope and quota and a route's cost and audience are part of the running
/// configuration `diff` compares: an exported file is in sync, one that changes any of them is
/// listed and refused by `apply`, and one that writes a default out (`scope = "client"`,
/// `cost = 1`) is still in sync.
#[tokio::test]
async fn plan_quotas_scopes_and_route_costs_and_audiences_are_compared() {
    let gw = Gateway::start_with(
        "[[routes]]\npath = \"/v1\"\ncost = 3\naudience = \"billing\"\n\
         [[routes]]\npath = \"/\"\n\
         [plans.metered]\nscope = \"key\"\nquota = { requests = 1000, per = \"day\" }\n",
    )
    .await;
    seed(&gw).await;
    gw.client("initech", "metered").await;
    let file = gw.dir.path().join("state.toml");
    let good = export(&gw, &file).await;
    for want in [
        "cost = 3",
        "audience = \"billing\"",
        "scope = \"key\"",
        "per = \"day\"",
    ] {
        assert!(good.contains(want), "{want} missing from:\n{good}");
    }
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    let before = snapshot(&gw).await;
    for (from, to, what) in [
        ("cost = 3", "cost = 4", "[[routes]]"),
        (
            "audience = \"billing\"",
            "audience = \"other\"",
            "[[routes]]",
        ),
        ("scope = \"key\"", "scope = \"client\"", "[plans]"),
        ("requests = 1000", "requests = 2000", "[plans]"),
        ("per = \"day\"", "per = \"month\"", "[plans]"),
    ] {
        assert!(good.contains(from), "{from}");
        std::fs::write(&file, good.replace(from, to)).unwrap();
        let (code, listed) = diff(&gw, &file).await;
        assert_eq!(code, 3, "{from} → {to}: {listed}");
        assert!(listed.contains(&format!("{what} differ")), "{listed}");
        let o = kg(&gw, &["apply", file.to_str().unwrap()]).await;
        assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    }
    assert_eq!(snapshot(&gw).await, before);
    // Defaults written out: the catch-all route's cost 1, plan free's client scope.
    let mut state: toml::Table = toml::from_str(&good).unwrap();
    for r in state["routes"].as_array_mut().unwrap() {
        let r = r.as_table_mut().unwrap();
        if r["path"].as_str() == Some("/") {
            r.insert("cost".into(), 1.into());
        }
    }
    state["plans"]["free"]
        .as_table_mut()
        .unwrap()
        .insert("scope".into(), "client".into());
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
}

/// `apply` with a stdout that cannot be written (`apply FILE | head -1` after head quit):
/// no panic halfway; it stops at the first line it cannot write, and a key or webhook it made
/// and could not show the secret of is removed again, so a rerun makes it anew and shows it.
#[tokio::test]
async fn an_apply_whose_stdout_is_closed_stops_and_leaves_no_unseen_secret() {
    let gw = Gateway::start_with(ROUTES).await;
    seed(&gw).await;
    let file = gw.dir.path().join("state.toml");
    let good = export(&gw, &file).await;
    let before = snapshot(&gw).await;
    let hooks = webhooks(&gw).await;
    let runs = [
        // A key of an existing client (made new), …
        "[[keys]]\nclient_id = \"acme\"\nname = \"new\"\n".to_string(),
        // … a new client's key (its first key taken over), …
        "[[clients]]\nclient_id = \"newco\"\nlicense = \"free\"\n\
         [[keys]]\nclient_id = \"newco\"\nname = \"default\"\n"
            .to_string(),
        // … a webhook.
        good.replace(
            "webhooks = []",
            "webhooks = [{ url = \"https://hooks.example.com/a\", events = [\"*\"] }]",
        ),
    ];
    for (i, more) in runs.iter().enumerate() {
        let text = if i == 2 {
            more.clone()
        } else {
            format!("{good}\n{more}")
        };
        assert_ne!(text, good);
        std::fs::write(&file, &text).unwrap();
        for quiet in [false, true] {
            let mut args = vec!["apply", file.to_str().unwrap()];
            if quiet {
                args.push("--quiet");
            }
            let launch = Binary::command(&args)
                .arg("--admin-url")
                .arg(format!("http://{}", gw.admin))
                .env("KEYGATE_ADMIN_KEY", ADMIN_KEY);
            let o = tokio::task::spawn_blocking(move || {
                let (reader, writer) = std::io::pipe().unwrap();
                drop(reader);
                launch.output_to(writer.into())
            })
            .await
            .unwrap();
            assert_eq!(o.status.code(), Some(1), "{text}: {}", err(&o));
            assert!(
                err(&o).contains("cannot write to standard output"),
                "{}",
                err(&o)
            );
            // Removed as the one whose secret was not shown, or as a new client's first key
            // when apply stopped at the line saying it made the client.
            assert!(
                err(&o).contains("its secret could not be shown; removed")
                    || err(&o).contains("removed, as apply stopped"),
                "{}",
                err(&o)
            );
            assert!(err(&o).contains("apply stopped at change"), "{}", err(&o));
            let (clients, keys) = snapshot(&gw).await;
            assert_eq!(keys, before.1, "run {i} quiet {quiet}");
            assert_eq!(webhooks(&gw).await, hooks, "run {i}");
            // A client the run made stands (it holds no secret), keyless.
            if i == 1 {
                assert!(clients.to_string().contains("newco"));
                assert_eq!(
                    gw.admin("DELETE", "/v1/clients/newco", None).await.status,
                    200
                );
            }
        }
        // With stdout back, the rerun makes it and shows the secret.
        let o = apply(&gw, &file).await;
        assert!(
            out(&o).contains(": kg_") || out(&o).contains(": whsec_"),
            "{}",
            out(&o)
        );
        assert_eq!(diff(&gw, &file).await, (0, String::new()));
        std::fs::write(&file, &good).unwrap();
        apply(&gw, &file).await;
    }
}

async fn credits_of(gw: &Gateway, id: &str) -> Value {
    let r = gw.admin("GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.status, 200);
    r.json()["credits"].clone()
}

/// A key's credits move with the state: the refill terms and whether a key has credits are
/// compared and applied, the balance is carried to a key apply makes (and kept when the terms
/// change) and never compared, as every request moves it.
#[tokio::test]
async fn credits_are_exported_compared_by_their_terms_and_converge_another_gateway() {
    let gw = Gateway::start_with(ROUTES).await;
    seed(&gw).await;
    let metered = gw
        .key(
            "acme",
            json!({"name": "metered", "credits": {"remaining": 500,
                   "refill": {"amount": 1000, "interval": "monthly"}}}),
        )
        .await;
    let key = metered["key"].as_str().unwrap().to_owned();
    let id = metered["id"].as_str().unwrap().to_owned();
    let file = gw.dir.path().join("state.toml");
    let good = export(&gw, &file).await;
    for want in ["remaining = 500", "amount = 1000", "interval = \"monthly\""] {
        assert!(good.contains(want), "{want} missing from:\n{good}");
    }
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    // Spent: the balance moved, the state did not.
    for _ in 0..3 {
        assert_eq!(gw.get_with_key("/x", &key).await.status, 200);
    }
    assert_eq!(credits_of(&gw, &id).await["remaining"], 497);
    assert_eq!(diff(&gw, &file).await, (0, String::new()));

    // The other gateway (same routes, same upstream) gets the key with its terms and the
    // exported balance.
    let url = gw.upstream.url();
    let other = Gateway::start_custom(
        crate::support::Upstream::start().await,
        |_| url.clone(),
        ROUTES,
    )
    .await;
    other.client("acme", "pro").await;
    other.client("globex", "free").await;
    let o = apply(&other, &file).await;
    assert!(out(&o).contains("acme/metered "), "{}", out(&o));
    let listed = other
        .admin("GET", "/v1/api-keys?client_id=acme", None)
        .await
        .json();
    let moved = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "metered")
        .unwrap()
        .clone();
    assert_eq!(moved["credits"]["remaining"], 500);
    assert_eq!(
        moved["credits"]["refill"],
        json!({"amount": 1000, "interval": "monthly"})
    );
    assert_eq!(diff(&other, &file).await, (0, String::new()));

    // New terms: listed, applied, the balance kept.
    let mut state: toml::Table = toml::from_str(&good).unwrap();
    let metered_state = |state: &mut toml::Table| -> toml::value::Table {
        state["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"].as_str() == Some("metered"))
            .unwrap()
            .as_table()
            .unwrap()
            .clone()
    };
    let set = |state: &mut toml::Table, name: &str, credits: Option<toml::Value>| {
        for k in state["keys"].as_array_mut().unwrap() {
            let k = k.as_table_mut().unwrap();
            if k["name"].as_str() == Some(name) {
                match &credits {
                    Some(c) => {
                        k.insert("credits".into(), c.clone());
                    }
                    None => {
                        k.remove("credits");
                    }
                }
            }
        }
    };
    assert!(metered_state(&mut state).contains_key("credits"));
    set(
        &mut state,
        "metered",
        Some(toml::Value::Table(toml::toml! {
            remaining = 5
            refill = { amount = 2000, interval = "daily" }
        })),
    );
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();
    let (code, listed) = diff(&gw, &file).await;
    assert_eq!(code, 3, "{listed}");
    assert!(listed.contains("credits.refill"), "{listed}");
    apply(&gw, &file).await;
    let now = credits_of(&gw, &id).await;
    assert_eq!(now["refill"], json!({"amount": 2000, "interval": "daily"}));
    assert_eq!(now["remaining"], 497, "the balance is kept, not the file's");
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    // Credits given to a key that had none (the file's balance), and taken from one.
    set(
        &mut state,
        "ci",
        Some(toml::Value::Table(toml::toml! { remaining = 7 })),
    );
    set(&mut state, "metered", None);
    std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();
    let (code, listed) = diff(&gw, &file).await;
    assert_eq!(code, 3, "{listed}");
    assert!(listed.contains("credits → none"), "{listed}");
    assert!(listed.contains("credits none → "), "{listed}");
    apply(&gw, &file).await;
    assert_eq!(credits_of(&gw, &id).await, Value::Null);
    let ci = gw
        .admin("GET", "/v1/api-keys?client_id=acme", None)
        .await
        .json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "ci")
        .unwrap()["credits"]
        .clone();
    assert_eq!(
        ci,
        json!({"remaining": 7, "refill": null, "next_refill_at": null})
    );
    assert_eq!(diff(&gw, &file).await, (0, String::new()));
    // Credits without a balance or a refill, or with an unknown field: refused whole.
    let before = snapshot(&gw).await;
    for bad in [
        toml::Value::Table(toml::Table::new()),
        toml::Value::Table(toml::toml! { remaining = 1 bogus = 2 }),
    ] {
        set(&mut state, "ci", Some(bad));
        std::fs::write(&file, toml::to_string(&state).unwrap()).unwrap();
        for cmd in ["diff", "apply"] {
            let o = kg(&gw, &[cmd, file.to_str().unwrap()]).await;
            assert_eq!(o.status.code(), Some(2), "{cmd}: {}", err(&o));
        }
    }
    assert_eq!(snapshot(&gw).await, before);
}
