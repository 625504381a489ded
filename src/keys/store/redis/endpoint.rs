//! Where the store's Redis is: one server (`redis://`, `rediss://`, `redis+unix://`), a primary
//! found through Sentinel (`redis+sentinel://`, `rediss+sentinel://`) or a cluster endpoint
//! (`redis+cluster://`, `rediss+cluster://`).
//!
//! ```text
//! redis+sentinel://[USER:]PASSWORD@]H1[:26379],H2[:26379],…/SERVICE[/DB]
//! redis+cluster://[USER:]PASSWORD@]H1[:6379],H2[:6379],…
//! ```
//! The credentials are those of the Redis servers (the primary and its replicas, or every
//! cluster node); sentinels are asked without credentials. The `rediss+` forms use TLS to every
//! server (sentinels included), verified as for `rediss://`. Percent-encoding is undone in the
//! user name and password. Errors never repeat the URL (it may hold a password).

use ::redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

/// The default port of a sentinel.
pub const SENTINEL_PORT: u16 = 26379;
/// The default port of a Redis server.
pub const REDIS_PORT: u16 = 6379;

/// Most addresses a sentinel or cluster URL may list.
pub const MAX_HOSTS: usize = 32;

/// A parsed store URL.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// One server.
    Single(ConnectionInfo),
    /// The primary of `service`, as the sentinels name it.
    Sentinel(SentinelEndpoint),
    /// A Redis Cluster, reached through any of these nodes.
    Cluster(ClusterEndpoint),
}

#[derive(Debug, Clone)]
pub struct SentinelEndpoint {
    pub sentinels: Vec<(String, u16)>,
    pub service: String,
    pub db: i64,
    pub tls: bool,
    pub(super) auth: Auth,
}

#[derive(Debug, Clone)]
pub struct ClusterEndpoint {
    pub nodes: Vec<(String, u16)>,
    pub tls: bool,
    pub(super) auth: Auth,
}

/// User name and password of the Redis servers; `Debug` hides the password.
#[derive(Clone, Default)]
pub(super) struct Auth {
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Auth {
    fn settings(&self, db: i64) -> RedisConnectionInfo {
        let mut s = RedisConnectionInfo::default().set_db(db);
        if let Some(u) = &self.username {
            s = s.set_username(u);
        }
        if let Some(p) = &self.password {
            s = s.set_password(p);
        }
        s
    }
}

/// The address of `host:port`, TLS or not.
pub(super) fn addr(host: &str, port: u16, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    }
}

/// A connection to `host:port` with the endpoint's credentials and database.
pub(super) fn node_info(host: &str, port: u16, tls: bool, auth: &Auth, db: i64) -> ConnectionInfo {
    info_of(addr(host, port, tls)).set_redis_settings(auth.settings(db))
}

/// A connection to `host:port` without credentials (a sentinel).
pub(super) fn bare_info(host: &str, port: u16, tls: bool) -> ConnectionInfo {
    info_of(addr(host, port, tls))
}

fn info_of(addr: ConnectionAddr) -> ConnectionInfo {
    // Converting an address cannot fail.
    addr.into_connection_info()
        .unwrap_or_else(|_| unreachable!("an address is a connection info"))
}

const SCHEMES: &str = "redis://, rediss://, redis+unix://, redis+sentinel://, rediss+sentinel://, \
                       redis+cluster:// or rediss+cluster://";

/// Parses any supported store URL.
pub fn parse(url: &str) -> Result<Endpoint, String> {
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        return sentinel(rest, false).map(Endpoint::Sentinel);
    }
    if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        return sentinel(rest, true).map(Endpoint::Sentinel);
    }
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        return cluster(rest, false).map(Endpoint::Cluster);
    }
    if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        return cluster(rest, true).map(Endpoint::Cluster);
    }
    if !["redis://", "rediss://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        return Err(format!("a Redis store URL starts with {SCHEMES}"));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| format!("not a usable Redis URL ({e}); e.g. redis://127.0.0.1:6379/0"))?;
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(
            "rediss://…#insecure is refused: the Redis server's certificate is always verified \
             (against the webpki roots, or store.redis_ca)"
                .into(),
        );
    }
    Ok(Endpoint::Single(info))
}

/// Splits `[userinfo@]hosts[/path]` (no query or fragment allowed).
fn split(rest: &str, scheme: &str) -> Result<(Auth, String, String), String> {
    if rest.contains(['?', '#']) {
        return Err(format!(
            "{scheme}: query strings and fragments are not supported (TLS files are [store] \
             redis_ca / redis_client_cert / redis_client_key)"
        ));
    }
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (hosts, path) = match after.find('/') {
        Some(i) => (&after[..i], &after[i + 1..]),
        None => (after, ""),
    };
    let mut auth = Auth::default();
    if let Some(ui) = userinfo {
        let (user, pass) = match ui.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (ui, None),
        };
        let user = decode(user)
            .ok_or_else(|| format!("{scheme}: bad percent-encoding in the user name"))?;
        let pass = pass
            .map(|p| {
                decode(p).ok_or_else(|| format!("{scheme}: bad percent-encoding in the password"))
            })
            .transpose()?;
        match pass {
            // `user@` alone is a password, as redis:// reads it.
            None if !user.is_empty() => auth.password = Some(user),
            None => {}
            Some(p) => {
                auth.username = (!user.is_empty()).then_some(user);
                auth.password = (!p.is_empty()).then_some(p);
            }
        }
    }
    Ok((auth, hosts.to_owned(), path.to_owned()))
}

/// `h1:p1,h2:p2,…` (a missing port is `default_port`).
fn hosts(
    list: &str,
    default_port: u16,
    scheme: &str,
    what: &str,
) -> Result<Vec<(String, u16)>, String> {
    if list.is_empty() {
        return Err(format!(
            "{scheme}: no {what} address; list them as host:port,host:port,… after {scheme}"
        ));
    }
    if list.split(',').count() > MAX_HOSTS {
        return Err(format!(
            "{scheme}: more than {MAX_HOSTS} {what} addresses; list a few of them (the rest are found from those)"
        ));
    }
    let mut out: Vec<(String, u16)> = Vec::new();
    for (i, item) in list.split(',').enumerate() {
        let n = i + 1;
        let bad = |why: &str| format!("{scheme}: {what} address #{n} {why}; expected host:port");
        let (host, port) = if let Some(v6) = item.strip_prefix('[') {
            let (h, rest) = v6.split_once(']').ok_or_else(|| bad("has an unclosed ["))?;
            let port = match rest {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("has text after ]"))?),
            };
            (h, port)
        } else {
            match item.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(bad("is an IPv6 address without brackets"));
                }
                Some((h, p)) => (h, Some(p)),
                None => (item, None),
            }
        };
        if host.is_empty() {
            return Err(bad("is empty"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
        {
            return Err(bad("is not a host name or IP address"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad("has no valid port (1–65535)")),
            },
        };
        let entry = (host.to_owned(), port);
        if out.contains(&entry) {
            return Err(bad("is listed twice"));
        }
        out.push(entry);
    }
    Ok(out)
}

fn sentinel(rest: &str, tls: bool) -> Result<SentinelEndpoint, String> {
    let scheme = if tls {
        "rediss+sentinel://"
    } else {
        "redis+sentinel://"
    };
    let (auth, list, path) = split(rest, scheme)?;
    let sentinels = hosts(&list, SENTINEL_PORT, scheme, "sentinel")?;
    let mut parts = path.split('/');
    let service = parts.next().unwrap_or_default();
    if service.is_empty() {
        return Err(format!(
            "{scheme}: the service name is missing (the name the sentinels monitor, e.g. \
             {scheme}h1:26379,h2:26379/mymaster/0)"
        ));
    }
    if !service
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(format!(
            "{scheme}: the service name must be letters, digits, '.', '-' or '_'"
        ));
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
            format!(
                "{scheme}: the database after the service name must be a number (e.g. /mymaster/0)"
            )
        })?,
    };
    if parts.next().is_some_and(|p| !p.is_empty()) {
        return Err(format!(
            "{scheme}: the path is /SERVICE or /SERVICE/DB, nothing more"
        ));
    }
    Ok(SentinelEndpoint {
        sentinels,
        service: service.to_owned(),
        db,
        tls,
        auth,
    })
}

fn cluster(rest: &str, tls: bool) -> Result<ClusterEndpoint, String> {
    let scheme = if tls {
        "rediss+cluster://"
    } else {
        "redis+cluster://"
    };
    let (auth, list, path) = split(rest, scheme)?;
    let nodes = hosts(&list, REDIS_PORT, scheme, "cluster node")?;
    if !(path.is_empty() || path == "0") {
        return Err(format!(
            "{scheme}: a Redis Cluster has only database 0; remove the /{path} after the node list"
        ));
    }
    Ok(ClusterEndpoint { nodes, tls, auth })
}

/// Undoes percent-encoding; `None` when it is malformed or not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The hash tag of keys that start with `prefix`, as Redis Cluster reads it: what lies between
/// the first `{` and the first `}` after it, when that is not empty. `None` when keys under
/// `prefix` would not all share one hash slot.
pub fn hash_tag(prefix: &str) -> Option<&str> {
    let open = prefix.find('{')?;
    let close = prefix[open + 1..].find('}')?;
    (close > 0).then(|| &prefix[open + 1..open + 1 + close])
}

/// Why `prefix` cannot be used with a cluster endpoint, if it cannot.
pub fn cluster_prefix_problem(prefix: &str) -> Option<String> {
    if hash_tag(prefix).is_some() {
        return None;
    }
    let suggestion = match prefix.trim_end_matches(':') {
        "" => "{keygate}:".to_owned(),
        p if !p.contains(['{', '}']) => format!("{{{p}}}:"),
        _ => "{keygate}:".to_owned(),
    };
    Some(format!(
        "store.redis_prefix: {prefix:?} has no hash tag, but a redis+cluster:// store needs one \
         so that every key of this database lives in one hash slot (each write is one atomic \
         script, and a script can only touch one slot); use e.g. redis_prefix = \"{suggestion}\""
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel_of(url: &str) -> SentinelEndpoint {
        match parse(url).unwrap() {
            Endpoint::Sentinel(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn cluster_of(url: &str) -> ClusterEndpoint {
        match parse(url).unwrap() {
            Endpoint::Cluster(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sentinel_urls() {
        let s = sentinel_of("redis+sentinel://h1:26380,10.0.0.2,[::1]:5/mymaster/3");
        assert_eq!(
            s.sentinels,
            vec![
                ("h1".into(), 26380),
                ("10.0.0.2".into(), SENTINEL_PORT),
                ("::1".into(), 5)
            ]
        );
        assert_eq!((s.service.as_str(), s.db, s.tls), ("mymaster", 3, false));
        assert!(s.auth.password.is_none());
        let s = sentinel_of("rediss+sentinel://kg:p%40ss%2Fw@h1/svc");
        assert_eq!((s.db, s.tls), (0, true));
        assert_eq!(s.auth.username.as_deref(), Some("kg"));
        assert_eq!(s.auth.password.as_deref(), Some("p@ss/w"));
        assert!(!format!("{s:?}").contains("p@ss"));
        let s = sentinel_of("redis+sentinel://:secretpw@h1:1/svc/");
        assert_eq!(s.auth.username, None);
        assert_eq!(s.auth.password.as_deref(), Some("secretpw"));
        for (url, why) in [
            ("redis+sentinel://h1:26379", "service name is missing"),
            ("redis+sentinel://h1:26379/", "service name is missing"),
            ("redis+sentinel:///svc", "no sentinel address"),
            ("redis+sentinel://h1:26379,,h2/svc", "#2 is empty"),
            ("redis+sentinel://h1:x/svc", "#1 has no valid port"),
            ("redis+sentinel://h1:0/svc", "#1 has no valid port"),
            ("redis+sentinel://h1,h1:26379/svc", "#2 is listed twice"),
            ("redis+sentinel://::1/svc", "without brackets"),
            ("redis+sentinel://h1/svc/x", "must be a number"),
            ("redis+sentinel://h1/svc/1/2", "nothing more"),
            ("redis+sentinel://h1/sv c", "service name must be"),
            ("redis+sentinel://u:secretpw@h1/svc?x=1", "query strings"),
            ("redis+sentinel://u:secret%zz@h1/svc", "percent-encoding"),
            ("redis+sentinel://h*st/svc", "not a host name"),
            ("redis+sentinel://h%41/svc", "not a host name"),
            ("redis+sentinel://h1:99999/svc", "no valid port"),
            ("redis+sentinel://[::1/svc", "unclosed ["),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn cluster_urls() {
        let c = cluster_of("redis+cluster://a:7000,b:7001,c");
        assert_eq!(
            c.nodes,
            vec![
                ("a".into(), 7000),
                ("b".into(), 7001),
                ("c".into(), REDIS_PORT)
            ]
        );
        assert!(!c.tls);
        let c = cluster_of("rediss+cluster://u:pw@a:7000/0");
        assert!(c.tls);
        assert_eq!(c.auth.username.as_deref(), Some("u"));
        for (url, why) in [
            ("redis+cluster://a:7000/2", "only database 0"),
            ("redis+cluster://", "no cluster node address"),
            ("redis+cluster://a:7000,:7001", "#2 is empty"),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
        let many = (0..=MAX_HOSTS)
            .map(|i| format!("h{i}:7000"))
            .collect::<Vec<_>>()
            .join(",");
        let e = parse(&format!("redis+cluster://{many}")).unwrap_err();
        assert!(e.contains("more than 32"), "{e}");
        let e = parse(&format!("redis+sentinel://{}/svc", "h,".repeat(100_000))).unwrap_err();
        assert!(e.contains("more than 32"), "{e}");
        let e = parse("memcached://x").unwrap_err();
        assert!(e.contains("redis+sentinel://"), "{e}");
    }

    #[test]
    fn hash_tags() {
        assert_eq!(hash_tag("{keygate}:"), Some("keygate"));
        assert_eq!(hash_tag("app:{kg}:"), Some("kg"));
        assert_eq!(hash_tag("{kg}{x}:"), Some("kg"));
        assert_eq!(hash_tag("keygate:"), None);
        assert_eq!(hash_tag("{}kg:"), None);
        assert_eq!(hash_tag("{kg:"), None);
        assert_eq!(hash_tag("}{kg}"), Some("kg"));
        assert!(cluster_prefix_problem("{keygate}:").is_none());
        let e = cluster_prefix_problem("keygate:").unwrap();
        assert!(e.contains("\"{keygate}:\""), "{e}");
        let e = cluster_prefix_problem("{}x:").unwrap();
        assert!(e.contains("hash slot"), "{e}");
    }
}
