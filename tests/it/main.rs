//! Integration tests: the real server in-process on port 0, a real SQLite file or a real
//! `redis-server` started by the test, a real upstream.

mod admin_api;
mod admin_races;
mod binary;
mod cli;
mod cli_state;
mod console;
mod deploy_files;
mod fast_path;
mod forward_auth;
mod hardening;
mod hostile;
mod import;
mod kixote;
mod layers;
mod observability;
mod openapi;
mod parity;
mod proxy_path;
mod rate_limits;
mod redis_cluster;
mod redis_store;
mod redis_support;
mod redis_tls;
mod scripted;
mod self_service;
mod store_conformance;
mod support;
mod tls_ws;
