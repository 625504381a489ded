//! The fast path's request heads: whatever the bytes, parsing never panics, and a head it
//! takes is forwarded as a head that parses back whole, with exactly one `Host`, the length
//! exactly when the request had one, no hop-by-hop, `x-keygate-*`, underscored or credential
//! field, the gateway's own `X-Forwarded-For`/`-Proto`/`-Host` once each, and the target that
//! was routed.
#![no_main]
use keygate::keys::IdentityHeaders;
use keygate::proxy::codec::head::{Parsed, parse_request};
use keygate::proxy::codec::wire::{BodyOut, Upstream, request_head, spans};
use keygate::proxy::policy::{FieldRules, Strip};
use libfuzzer_sys::fuzz_target;

const NEVER: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
    "trailer",
    "expect",
];

fuzz_target!(|data: &[u8]| {
    let mut fields = Vec::new();
    let Parsed::Complete(head) = parse_request(data, &FieldRules::default(), 100, &mut fields)
    else {
        return;
    };
    assert!(head.len <= data.len());
    let path = head.path(data);
    assert!(path.starts_with('/'));
    let identity = IdentityHeaders::new("c", "k", "p", "l");
    for strip in [
        Strip::NOTHING,
        Strip::AUTHORIZATION,
        Strip::API_KEY,
        Strip::BOTH,
    ] {
        let mut out = Vec::new();
        request_head(
            &mut out,
            spans(data, &fields),
            &Upstream {
                method: head.method.as_str().as_bytes(),
                target: head.target.get(data),
                strip,
                identity: Some(&identity),
                assertion: Some(b"a.b.c"),
                xff: head.xff.map(|s| s.get(data)),
                client_host: head.host.map(|s| s.get(data)),
                peer_ip: b"127.0.0.1",
                proto: b"http",
                host: b"up:80",
                body: head.content_length.map_or(BodyOut::None, BodyOut::Length),
            },
        );
        let mut hs = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut hs);
        let n = match req.parse(&out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("forwarded head does not parse: {other:?}"),
        };
        assert_eq!(n, out.len(), "bytes after the forwarded head");
        assert_eq!(req.path.unwrap().as_bytes(), head.target.get(data));
        let mut hosts = 0;
        let mut identity_fields = 0;
        let mut forwarded = [0; 3];
        let mut lengths = Vec::new();
        for h in req.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            assert!(!NEVER.contains(&name.as_str()), "{name} forwarded");
            assert!(!name.contains('_'), "{name} forwarded");
            if name.starts_with("x-keygate-") {
                let ours = [
                    ("x-keygate-client-id", &b"c"[..]),
                    ("x-keygate-key-id", b"k"),
                    ("x-keygate-permissions", b"p"),
                    ("x-keygate-license", b"l"),
                    ("x-keygate-assertion", b"a.b.c"),
                ];
                assert!(ours.contains(&(name.as_str(), h.value)), "{name} forwarded");
                identity_fields += 1;
            }
            match name.as_str() {
                "host" => hosts += 1,
                "content-length" => lengths.push(h.value.to_vec()),
                "x-forwarded-for" => {
                    assert!(h.value.ends_with(b"127.0.0.1"));
                    forwarded[0] += 1;
                }
                "x-forwarded-proto" => {
                    assert_eq!(h.value, b"http");
                    forwarded[1] += 1;
                }
                "x-forwarded-host" => forwarded[2] += 1,
                "authorization" => assert!(!strip.authorization),
                "x-api-key" => assert!(!strip.api_key),
                _ => {}
            }
        }
        assert_eq!(hosts, 1);
        assert_eq!(identity_fields, 5);
        assert_eq!(forwarded[..2], [1, 1], "x-forwarded-for/-proto once each");
        assert!(forwarded[2] <= 1, "x-forwarded-host twice");
        match head.content_length {
            Some(len) => assert_eq!(lengths, [len.to_string().into_bytes()]),
            None => assert!(lengths.is_empty()),
        }
    }
});
