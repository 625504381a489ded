//! Admin request bodies: parse_json into every request type never panics, and answers Ok or a
//! 400/422-class error.
#![no_main]
use keygate::admin::clients::{CreateClient, UpdateClient};
use keygate::admin::error::parse_json;
use keygate::admin::keys::{CreateKey, RotateKey, UpdateKey};
use keygate::admin::kixote::{KxClientRef, KxCreateClient};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_json::<CreateKey>(data);
    let _ = parse_json::<UpdateKey>(data);
    let _ = parse_json::<RotateKey>(data);
    let _ = parse_json::<CreateClient>(data);
    let _ = parse_json::<UpdateClient>(data);
    let _ = parse_json::<KxCreateClient>(data);
    let _ = parse_json::<KxClientRef>(data);
});
