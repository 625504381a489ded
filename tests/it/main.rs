//! Integration tests: the real server in-process on port 0, a real SQLite file, a real upstream.

mod admin_api;
mod binary;
mod hostile;
mod kixote;
mod observability;
mod openapi;
mod proxy_path;
mod rate_limits;
mod support;
