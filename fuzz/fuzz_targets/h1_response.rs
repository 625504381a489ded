//! The fast path's response heads and chunked bodies: whatever an upstream sends, parsing
//! never panics; a head it accepts is relayed as a head that parses back whole, with one
//! unambiguous framing (a single length, or chunked, or nothing for a bodiless answer) and no
//! hop-by-hop field but the gateway's own `Connection: close` when it closes; the chunked decoder only ever points inside its input.
#![no_main]
use keygate::clock::FakeClock;
use keygate::proxy::codec::chunked::{Decoder, Step};
use keygate::proxy::codec::head::{Framing, parse_response};
use keygate::proxy::codec::wire::{Out, response_head};
use libfuzzer_sys::fuzz_target;

const NEVER: [&str; 7] = [
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let close = flags & 2 == 2;
    let mut fields = Vec::new();
    let Ok(Some(res)) = parse_response(data, head_request, &mut fields) else {
        return;
    };
    let framing = match res.framing {
        Framing::Empty | Framing::Length(_) => Out::AsIs,
        Framing::Chunked | Framing::Close => Out::Chunked,
    };
    let clock = FakeClock::new().clock();
    let mut out = Vec::new();
    response_head(
        &mut out, data, &res, &fields, None, framing, close, &clock, None,
    );
    let mut hs = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Response::new(&mut hs);
    let n = match parsed.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("relayed head does not parse: {other:?}"),
    };
    assert_eq!(n, out.len());
    assert_eq!(parsed.code, Some(res.status));
    let mut lengths = 0;
    let mut chunked = 0;
    let mut connection = 0;
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        assert!(!NEVER.contains(&name.as_str()), "{name} relayed");
        match name.as_str() {
            "content-length" => lengths += 1,
            "transfer-encoding" => chunked += 1,
            "connection" => {
                assert_eq!(h.value, b"close");
                connection += 1;
            }
            _ => {}
        }
    }
    assert!(
        chunked <= 1 && !(chunked == 1 && lengths > 0),
        "two framings"
    );
    assert!(lengths <= 1, "two lengths");
    assert_eq!(connection, usize::from(close), "connection field");
    if let Framing::Length(_) = res.framing {
        assert_eq!(lengths, 1);
    }
    if res.framing == Framing::Chunked {
        let mut d = Decoder::new();
        let mut rest = &data[res.len..];
        loop {
            match d.decode(rest) {
                Ok(Step::Data {
                    start,
                    len,
                    consumed,
                }) => {
                    assert!(start + len <= consumed && consumed <= rest.len() && len > 0);
                    rest = &rest[consumed..];
                }
                Ok(Step::Done { consumed }) => {
                    assert!(consumed <= rest.len());
                    break;
                }
                Ok(Step::NeedMore) | Err(_) => break,
            }
        }
    }
});
