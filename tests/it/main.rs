//! Integration tests: the real server in-process on port 0, a real SQLite file, a real upstream.

mod admin_api;
mod binary;
mod proxy_path;
mod rate_limits;
mod support;
