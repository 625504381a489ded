//! docker-compose.yml, Dockerfile and config/docker.toml, checked as far as possible without a
//! Docker engine: the compose file parses and has the documented services, the admin port is
//! published on the host's loopback only, Redis runs with the append-only file, the config file
//! it mounts exists, agrees with the published ports and service names, and passes
//! `keygate check-config` with the environment compose gives it.

use std::collections::HashMap;

use keygate::config::{CliOverrides, Config, StoreUrl};
use serde_json::Value;

use crate::support::binary::Binary;

/// What the tests put in for `${VAR…}` references of the compose file.
const SAMPLE_ADMIN_KEY: &str = "compose-sample-admin-key-0123456789";

fn compose() -> Value {
    let text = std::fs::read_to_string("docker-compose.yml").expect("docker-compose.yml exists");
    serde_norway::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("a string").to_owned())
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Null => Vec::new(),
        other => panic!("expected a list of strings, got {other}"),
    }
}

/// The environment compose gives a service, `${VAR…}` references filled with sample values.
fn environment(service: &Value) -> HashMap<String, String> {
    let fill = |v: &str| {
        if v.starts_with("${KEYGATE_ADMIN_KEY") {
            SAMPLE_ADMIN_KEY.to_owned()
        } else if v.starts_with("${KEYGATE_JWT_SECRET") {
            "a-sample-token-secret-of-32-bytes-or-more".to_owned()
        } else {
            assert!(!v.contains("${"), "unexpected variable in {v}");
            v.to_owned()
        }
    };
    match &service["environment"] {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), fill(v.as_str().expect("a string value"))))
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| {
                let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
                (k.to_owned(), fill(v))
            })
            .collect(),
        _ => HashMap::new(),
    }
}

/// `(host ip, host port, container port)` of each published port.
fn ports(service: &Value) -> Vec<(Option<String>, u16, u16)> {
    strings(&service["ports"])
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            let n = |s: &str| s.parse::<u16>().expect("a port number");
            match parts.as_slice() {
                [host, container] => (None, n(host), n(container)),
                [ip, host, container] => (Some(ip.to_string()), n(host), n(container)),
                _ => panic!("unexpected port mapping {p}"),
            }
        })
        .collect()
}

#[test]
fn compose_file_has_keygate_redis_with_aof_and_a_demo_upstream() {
    let c = compose();
    let services = c["services"].as_object().expect("services");
    for name in ["keygate", "redis", "upstream"] {
        assert!(services.contains_key(name), "service {name} missing");
    }

    // keygate is built from the Dockerfile of this repository.
    let keygate = &c["services"]["keygate"];
    let context = match &keygate["build"] {
        Value::String(s) => s.clone(),
        Value::Object(b) => b["context"].as_str().unwrap().to_owned(),
        other => panic!("keygate must be built from the Dockerfile, got build: {other}"),
    };
    assert!(
        std::path::Path::new(&context).join("Dockerfile").exists(),
        "no Dockerfile in build context {context}"
    );

    // Redis: an image, the append-only file on with a real fsync policy, no published port.
    let redis = &c["services"]["redis"];
    assert!(redis["image"].as_str().unwrap().starts_with("redis:"));
    let cmd = strings(&redis["command"]);
    let arg = |name: &str| {
        cmd.iter()
            .position(|a| a == name)
            .and_then(|i| cmd.get(i + 1))
            .map(String::as_str)
    };
    assert_eq!(arg("--appendonly"), Some("yes"), "{cmd:?}");
    assert!(
        matches!(arg("--appendfsync"), Some("always" | "everysec")),
        "{cmd:?}"
    );
    assert!(ports(redis).is_empty(), "Redis must not be published");

    // The upstream answers on the port config/docker.toml points at.
    assert!(c["services"]["upstream"]["image"].as_str().is_some());
    assert!(strings(&c["services"]["upstream"]["command"]).contains(&"9000".to_string()));
}

#[test]
fn compose_publishes_the_admin_port_on_loopback_only_and_its_config_checks_out() {
    let c = compose();
    let keygate = &c["services"]["keygate"];

    // Docker waits for keygate's drain (30 s unless config/docker.toml says otherwise) and its
    // usage flush before it kills it.
    let grace = keygate["stop_grace_period"].as_str().unwrap_or("10s");
    let secs: u64 = grace
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stop_grace_period {grace:?}: whole seconds"));
    let configured = std::fs::read_to_string("config/docker.toml")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("shutdown_grace_secs = ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(30);
    assert!(
        secs > configured,
        "stop_grace_period {grace} against {configured} s"
    );

    // The config file compose mounts exists and is the one the command names.
    let volumes = strings(&keygate["volumes"]);
    let (host_path, container_path) = volumes
        .iter()
        .find_map(|v| {
            let mut parts = v.split(':');
            let host = parts.next()?;
            let container = parts.next()?;
            container.ends_with(".toml").then_some((host, container))
        })
        .expect("a config file mounted into the keygate service");
    assert!(
        std::path::Path::new(host_path).exists(),
        "{host_path} missing"
    );
    let command = strings(&keygate["command"]);
    assert_eq!(
        command,
        vec!["serve", "--config", container_path],
        "keygate must serve the mounted config"
    );
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(
        dockerfile.contains(&format!(
            "CMD [\"serve\", \"--config\", \"{container_path}\"]"
        )),
        "the image's default command serves the same file"
    );

    // It passes check-config with exactly the environment compose sets.
    let env = environment(keygate);
    assert!(env.contains_key("KEYGATE_ADMIN_KEY"));
    assert!(
        env.contains_key("KEYGATE_JWT_SECRET"),
        "a Redis store needs a shared token secret"
    );
    let out = Binary::command(["check-config", "--config", host_path])
        .envs(&env)
        .output();
    assert!(
        out.status.success(),
        "check-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "check-config warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What it configures matches the compose file: listeners behind the published ports, the
    // Redis and upstream services by name.
    let config = Config::load(
        Some(std::path::Path::new(host_path)),
        &env,
        &CliOverrides::default(),
    )
    .unwrap();
    let published = ports(keygate);
    let admin_port = config.admin.listen.port();
    let admin: Vec<_> = published
        .iter()
        .filter(|(_, _, container)| *container == admin_port)
        .collect();
    assert!(!admin.is_empty(), "admin port {admin_port} not published");
    for (ip, _, _) in admin {
        assert_eq!(
            ip.as_deref(),
            Some("127.0.0.1"),
            "the admin port must be published on the host's loopback only"
        );
    }
    let proxy_port = config.proxy.listen.port();
    assert!(
        published.iter().any(|(_, _, c)| *c == proxy_port),
        "proxy port {proxy_port} not published"
    );
    assert!(config.admin.listen.ip().is_unspecified() && config.proxy.listen.ip().is_unspecified());
    assert_eq!(
        config.store.url,
        StoreUrl::Redis("redis://redis:6379/0".into()),
        "the Redis service of the compose file"
    );
    assert_eq!(config.proxy.upstream.host(), Some("upstream"));
    assert_eq!(config.proxy.upstream.port_u16(), Some(9000));
    assert_eq!(
        config.admin.key_hashes.len(),
        1,
        "the admin key comes from the environment"
    );
    // Published on the host's loopback, listening on 0.0.0.0 inside: the Host check is asked
    // for, so a DNS-rebinding page cannot reach it from the host's browser.
    assert_eq!(
        config.admin.allowed_hosts,
        Some(vec!["localhost".to_string(), "keygate".to_string()]),
        "config/docker.toml turns the admin Host check on, the service's name answered"
    );
}

#[test]
fn dockerfile_builds_in_stages_and_runs_unprivileged() {
    let d = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(d.contains("FROM rust:1-bookworm AS build"));
    assert!(d.contains("FROM debian:bookworm-slim"));
    assert!(d.contains("COPY --from=build"));
    assert!(d.contains("cargo build --release --locked"));
    let user = d
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    // A directory the unprivileged user may write, for a SQLite store and its lock file.
    assert!(
        d.contains("RUN mkdir /data && chown keygate:keygate /data"),
        "no writable /data"
    );
    // Every file it copies from the repository exists.
    for line in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(std::path::Path::new(src).exists(), "{line}: {src} missing");
        }
    }
}

/// The commented Sentinel variant at the end of docker-compose.yml, as the override file the
/// comment tells the reader to save.
fn sentinel_variant() -> Value {
    let text = std::fs::read_to_string("docker-compose.yml").unwrap();
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "# BEGIN SENTINEL VARIANT")
        .skip(1)
        .take_while(|l| *l != "# END SENTINEL VARIANT")
        .collect();
    assert!(
        !block.is_empty(),
        "no Sentinel variant in docker-compose.yml"
    );
    let yaml = block
        .iter()
        .map(|l| {
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or_else(|| panic!("an uncommented line in the variant: {l}"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    serde_norway::from_str(&yaml).expect("the Sentinel variant is valid YAML")
}

#[test]
fn compose_sentinel_variant_adds_a_replica_and_three_sentinels_and_its_store_url_checks_out() {
    let base = compose();
    let v = sentinel_variant();
    let services = &v["services"];
    // The replica follows the base file's `redis` service, with the append-only file on.
    let replica = strings(&services["redis-replica"]["command"]).join(" ");
    assert!(replica.contains("--replicaof redis 6379"), "{replica}");
    assert!(replica.contains("--appendonly yes"), "{replica}");
    assert!(base["services"]["redis"].is_object());
    let primary = strings(&services["redis"]["command"]).join(" ");
    assert!(primary.contains("--appendonly yes"), "{primary}");
    // Three sentinels watching `redis` as service "keygate", quorum 2.
    for name in ["sentinel-1", "sentinel-2", "sentinel-3"] {
        let script = strings(&services[name]["command"]).join(" ");
        assert!(
            script.contains("sentinel monitor keygate redis 6379 2")
                && script.contains("exec redis-sentinel"),
            "{name}: {script}"
        );
    }
    // keygate asks those three sentinels; with the base environment, check-config passes.
    let overrides = environment(&services["keygate"]);
    let url = &overrides["KEYGATE_STORE"];
    assert_eq!(
        url,
        "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/keygate/0"
    );
    let mut env = environment(&base["services"]["keygate"]);
    env.extend(overrides);
    let out = Binary::command(["check-config", "--config", "config/docker.toml"])
        .envs(&env)
        .output();
    assert!(
        out.status.success(),
        "check-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The variant is commented out: the base file alone has none of its services.
    assert!(base["services"]["sentinel-1"].is_null());
}

/// The build stage's placeholder step, replayed without Docker: in a directory holding only
/// what the stage copies before it, its shell commands up to the build leave a file for every
/// target Cargo.toml declares, so cargo reads the manifest (it builds nothing while a declared
/// target's file is missing: the image would not build).
#[test]
fn the_dockerfiles_placeholder_build_leaves_every_declared_target_in_place() {
    let d = std::fs::read_to_string("Dockerfile").unwrap();
    let joined = d.replace("\\\n", " ");
    let stage: Vec<&str> = joined
        .lines()
        .skip_while(|l| !l.starts_with("FROM rust"))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .collect();
    let copied = stage
        .iter()
        .find_map(|l| l.strip_prefix("COPY "))
        .expect("a COPY before the placeholder build");
    let run = stage
        .iter()
        .find_map(|l| l.strip_prefix("RUN "))
        .expect("the placeholder build");
    let (placeholders, _) = run
        .split_once("&& cargo build")
        .expect("placeholders, then a cargo build");
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<&str> = copied.split_whitespace().collect();
    for f in &files[..files.len() - 1] {
        std::fs::copy(f, dir.path().join(f)).unwrap();
    }
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(placeholders)
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(made.success(), "{placeholders}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--release", "--locked", "--offline"])
        .args(["--bin", "manifest_check"])
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no bin target named `manifest_check`"),
        "cargo did not read the manifest the placeholders leave: {err}"
    );
}
