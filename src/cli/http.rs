//! The admin API as the command line sees it: one HTTP(S) client, the admin key on every
//! call, problem+json answers turned into [`CliError::Refused`].

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::CliError;

pub struct Admin {
    base: String,
    key: String,
    /// How long one call may take, connecting included.
    timeout: std::time::Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Characters kept as they are in a path segment (RFC 3986 unreserved); the rest is
/// percent-encoded, so an argument can never change the path it is put in.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out == "." || out == ".." {
        return out.replace('.', "%2E");
    }
    out
}

impl Admin {
    /// `base`: `http://host:port` or `https://…`; `ca`: PEM bundle for a TLS admin listener
    /// (default: the webpki roots).
    pub fn new(
        base: &str,
        key: String,
        ca: Option<&std::path::Path>,
        timeout: std::time::Duration,
    ) -> Result<Self, CliError> {
        let base = base.trim_end_matches('/').to_owned();
        // Not echoed: a user and password in it would be printed, and never be sent (the
        // admin key is the credential).
        if base
            .split("://")
            .nth(1)
            .unwrap_or(&base)
            .split('/')
            .next()
            .is_some_and(|a| a.contains('@'))
        {
            return Err(CliError::Usage(
                "--admin-url must not carry a user or password: the admin key (KEYGATE_ADMIN_KEY) is the credential".into(),
            ));
        }
        let uri: http::Uri = base
            .parse()
            .map_err(|_| CliError::Usage(format!("--admin-url {base:?} is not a URL")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(CliError::Usage(format!(
                "--admin-url {base:?} must be http://HOST:PORT or https://HOST:PORT"
            )));
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let tls = crate::tls::client_config(ca).map_err(CliError::Usage)?;
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            base,
            key,
            timeout,
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// One call; a non-2xx answer is [`CliError::Refused`] with the problem's `detail`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Value, CliError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-admin-key", &self.key)
            .header("accept", "application/json");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| CliError::Usage(format!("bad request: {e}")))?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| {
                CliError::Transport(format!("cannot reach the admin API at {}: {e}", self.base))
            })?;
            let status = res.status();
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(|e| CliError::Transport(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, CliError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                CliError::Transport(format!(
                    "no answer from the admin API at {} within {} s (--timeout-secs)",
                    self.base,
                    self.timeout.as_secs()
                ))
            })??;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| {
                CliError::Transport(format!(
                    "the admin API answered {status} with a body that is not JSON"
                ))
            })?
        };
        if status.is_success() {
            Ok(value)
        } else {
            Err(refused(status, &value))
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn send(&self, method: Method, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(method, path, Some(Bytes::from(body.to_string())))
            .await
    }

    /// Every item of a paginated listing (`{data, total}`), 1000 per call.
    pub async fn all(&self, path: &str) -> Result<Vec<Value>, CliError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        for page in 1.. {
            let v = self
                .get(&format!("{path}{sep}page={page}&per_page=1000"))
                .await?;
            let data = v["data"].as_array().cloned().unwrap_or_default();
            let total = v["total"].as_u64().unwrap_or(0);
            let n = data.len();
            out.extend(data);
            if n == 0 || out.len() as u64 >= total {
                break;
            }
        }
        Ok(out)
    }
}

fn refused(status: StatusCode, problem: &Value) -> CliError {
    let mut detail = problem["detail"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| status.to_string());
    if let Some(errors) = problem["errors"].as_array() {
        for e in errors {
            detail.push_str(&format!(
                "\n  {}: {}",
                e["field"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("?")
            ));
        }
    }
    CliError::Refused {
        status: status.as_u16(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn a_segment_cannot_leave_its_place_in_the_path() {
        assert_eq!(segment("acme.prod_1-x~"), "acme.prod_1-x~");
        assert_eq!(segment("../v1/clients"), "..%2Fv1%2Fclients");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("."), "%2E");
        assert_eq!(segment("a b?c#d%"), "a%20b%3Fc%23d%25");
    }
}
