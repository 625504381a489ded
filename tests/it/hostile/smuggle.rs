//! Request-smuggling corpus over raw sockets against the real binary, judged on what a raw
//! recording upstream read off the wire.
//!
//! Every probe uses paths `/p/<id>/<tag>`. Tags `a`, `pre`, `b2` ride on requests that carry
//! a valid key; `u` (no credential), `x` (forged key), `smuggled` and `inner` never do. A probe
//! passes when no response is a 5xx and every request the upstream read
//! - carries the gateway's identity headers for the test key (it was authenticated),
//! - no longer carries the credential,
//! - has exactly one unambiguous framing (one plain Content-Length or `chunked`, never both,
//!   no look-alike fields, no hop-by-hop fields, no framing or credential trailers),
//! - is one of the probe's authenticated requests, at most once (for generated probes; the
//!   random layer only checks the points above, since a mutation may change a tag).
//!
//! Classes follow the test plan (reliability.md §1 T2): CL.TE/TE.CL in both orders, 134 TE
//! obfuscations, TE values, Content-Length forms, TE on HTTP/1.0, obs-fold, bare CR/LF/NUL/DEL,
//! header-name tricks, chunk syntax and trailers, request lines, pipelining, Expect without a
//! key, h2c upgrade and an h2 preface, over-long lines, and a seeded mutation layer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::harness::{self, Exchange, Recorder};

const UNAUTH_TAGS: [&str; 4] = ["u", "x", "smuggled", "inner"];

struct Probe {
    id: usize,
    class: &'static str,
    name: String,
    parts: Vec<Vec<u8>>,
    /// Tags of requests carrying a valid credential.
    authed: Vec<&'static str>,
    /// A final status the probe must get (e.g. 401 for Expect without a key).
    must_answer: Option<u16>,
    /// Produced by the mutation layer: only the universal checks apply.
    mutated: bool,
}

struct Ctx {
    key: String,
}

impl Ctx {
    fn auth(&self) -> Vec<u8> {
        format!("Authorization: Bearer {}\r\n", self.key).into_bytes()
    }
    fn xkey(&self) -> Vec<u8> {
        format!("X-Api-Key: {}\r\n", self.key).into_bytes()
    }
}

/// A forged key: right prefix and length, wrong checksum.
const FORGED: &str = "X-Api-Key: kg_0000000000000000000000000000000000000000000zzzzzz\r\n";

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `METHOD base/tag HTTP/1.1` + Host + `headers` + blank line + `body`.
fn req(method: &str, base: &str, tag: &str, headers: &[u8], body: &[u8]) -> Vec<u8> {
    cat(&[
        format!("{method} {base}/{tag} HTTP/1.1\r\nHost: gw\r\n").as_bytes(),
        headers,
        b"\r\n",
        body,
    ])
}

fn smuggled(base: &str, forged: bool) -> Vec<u8> {
    req(
        "GET",
        base,
        "smuggled",
        if forged { FORGED.as_bytes() } else { b"" },
        b"",
    )
}

fn cl(n: usize) -> Vec<u8> {
    format!("Content-Length: {n}\r\n").into_bytes()
}

const TE: &[u8] = b"Transfer-Encoding: chunked\r\n";

struct Corpus {
    ctx: Ctx,
    probes: Vec<Probe>,
}

impl Corpus {
    fn push(
        &mut self,
        class: &'static str,
        name: String,
        authed: &[&'static str],
        parts: Vec<Vec<u8>>,
        must_answer: Option<u16>,
    ) {
        let id = self.probes.len();
        self.probes.push(Probe {
            id,
            class,
            name,
            parts,
            authed: authed.to_vec(),
            must_answer,
            mutated: false,
        });
    }

    fn next_base(&self) -> String {
        format!("/p/{}", self.probes.len())
    }

    /// One probe built from its base path.
    fn one(
        &mut self,
        class: &'static str,
        name: impl Into<String>,
        authed: &[&'static str],
        build: impl Fn(&Ctx, &str) -> Vec<u8>,
    ) {
        let base = self.next_base();
        let bytes = build(&self.ctx, &base);
        self.push(class, name.into(), authed, vec![bytes], None);
    }

    /// The probe alone, and again pipelined behind a valid authenticated request.
    fn two(
        &mut self,
        class: &'static str,
        name: impl Into<String>,
        authed: &[&'static str],
        build: impl Fn(&Ctx, &str) -> Vec<u8>,
    ) {
        let name = name.into();
        self.one(class, name.clone(), authed, &build);
        let base = self.next_base();
        let mut tags = vec!["pre"];
        tags.extend_from_slice(authed);
        let bytes = cat(&[
            &req("GET", &base, "pre", &self.ctx.auth(), b""),
            &build(&self.ctx, &base),
        ]);
        self.push(
            class,
            format!("{name} (pipelined)"),
            &tags,
            vec![bytes],
            None,
        );
    }
}

fn build_corpus(key: &str) -> Corpus {
    let mut c = Corpus {
        ctx: Ctx { key: key.into() },
        probes: Vec::new(),
    };

    // 1. CL.TE and TE.CL, both header orders, with and without a key, plain and forged
    //    smuggled requests.
    for cl_first in [true, false] {
        for with_key in [true, false] {
            for forged in [false, true] {
                let authed: &[&str] = if with_key { &["a"] } else { &[] };
                let label = format!(
                    "{} key={with_key} forged_inner={forged}",
                    if cl_first { "CL then TE" } else { "TE then CL" }
                );
                c.two("cl-te", format!("CL.TE {label}"), authed, |cx, base| {
                    let body = cat(&[b"0\r\n\r\n", &smuggled(base, forged)]);
                    let framing = if cl_first {
                        cat(&[&cl(body.len()), TE])
                    } else {
                        cat(&[TE, &cl(body.len())])
                    };
                    let auth = if with_key { cx.auth() } else { Vec::new() };
                    req("POST", base, "a", &cat(&[&auth, &framing]), &body)
                });
                c.two("cl-te", format!("TE.CL {label}"), authed, |cx, base| {
                    let s = smuggled(base, forged);
                    let size = format!("{:x}\r\n", s.len());
                    let body = cat(&[size.as_bytes(), &s, b"\r\n0\r\n\r\n"]);
                    let framing = if cl_first {
                        cat(&[&cl(size.len()), TE])
                    } else {
                        cat(&[TE, &cl(size.len())])
                    };
                    let auth = if with_key { cx.auth() } else { Vec::new() };
                    req("POST", base, "a", &cat(&[&auth, &framing]), &body)
                });
            }
        }
    }

    // 2. The 134 Transfer-Encoding obfuscations of smuggler's default set, each in a CL.TE probe.
    let mut te_variants: Vec<(String, Vec<u8>)> = vec![
        ("vanilla".into(), b"Transfer-Encoding: chunked".to_vec()),
        ("nospace".into(), b"Transfer-Encoding:chunked".to_vec()),
        (
            "linewrapped".into(),
            b"Transfer-Encoding:\r\n chunked".to_vec(),
        ),
        (
            "doubled".into(),
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked".to_vec(),
        ),
    ];
    for b in [
        0x01u8, 0x04, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x1f, 0x20, 0x7f, 0xa0, 0xff,
    ] {
        let x = [b];
        let forms: [(&str, Vec<u8>); 10] = [
            ("midspace", cat(&[b"Transfer-Encoding:", &x, b"chunked"])),
            ("postspace", cat(&[b"Transfer-Encoding", &x, b": chunked"])),
            ("prespace", cat(&[&x, b"Transfer-Encoding: chunked"])),
            ("endspace", cat(&[b"Transfer-Encoding: chunked", &x])),
            (
                "xprespace",
                cat(&[b"X: X", &x, b"Transfer-Encoding: chunked"]),
            ),
            (
                "endspacex",
                cat(&[b"Transfer-Encoding: chunked", &x, b"X: X"]),
            ),
            (
                "rxprespace",
                cat(&[b"X: X\r", &x, b"Transfer-Encoding: chunked"]),
            ),
            (
                "xnprespace",
                cat(&[b"X: X", &x, b"\nTransfer-Encoding: chunked"]),
            ),
            (
                "endspacerx",
                cat(&[b"Transfer-Encoding: chunked\r", &x, b"X: X"]),
            ),
            (
                "endspacexn",
                cat(&[b"Transfer-Encoding: chunked", &x, b"\nX: X"]),
            ),
        ];
        for (n, v) in forms {
            te_variants.push((format!("{n}-{b:02x}"), v));
        }
    }
    for (name, te_line) in te_variants {
        c.two("te-obfuscation", name, &["a"], |cx, base| {
            let body = cat(&[b"0\r\n\r\n", &smuggled(base, false)]);
            let h = cat(&[&cx.auth(), &cl(body.len()), &te_line, b"\r\n"]);
            req("POST", base, "a", &h, &body)
        });
    }

    // 3. Transfer-Encoding values and repeated fields, with and without Content-Length.
    let te_values: [&[u8]; 16] = [
        b"Transfer-Encoding: identity\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding: \"chunked\"\r\n",
        b"Transfer-Encoding: chunked;q=1\r\n",
        b"Transfer-Encoding: CHUNKED\r\n",
        b"Transfer-Encoding: chunk\r\n",
        b"Transfer-Encoding: , chunked\r\n",
        b"Transfer-Encoding: chunked,\r\n",
        b"Transfer-Encoding: \r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        b"TRANSFER-ENCODING: chunked\r\ntransfer-encoding: chunked\r\n",
    ];
    for (i, te) in te_values.iter().enumerate() {
        for with_cl in [true, false] {
            let name = format!(
                "{} with_cl={with_cl}",
                String::from_utf8_lossy(te).replace("\r\n", " | ")
            );
            c.two("te-values", format!("{i}: {name}"), &["a"], |cx, base| {
                let body = cat(&[b"5\r\nhello\r\n0\r\n\r\n", &smuggled(base, false)]);
                let framing = if with_cl {
                    cat(&[&cl(body.len()), te])
                } else {
                    te.to_vec()
                };
                req("POST", base, "a", &cat(&[&cx.auth(), &framing]), &body)
            });
        }
    }

    // 4. Content-Length forms: duplicates, lists, signs, hex, padding, overflow, junk.
    let cls: [&[u8]; 20] = [
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 6\r\nContent-Length: 5\r\n",
        b"Content-Length: 5, 5\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: +5\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 0x5\r\n",
        b"Content-Length:  05\r\n",
        b"Content-Length: 005\r\n",
        b"Content-Length: 18446744073709551616\r\n",
        b"Content-Length: 99999999999999999999999999\r\n",
        b"Content-Length: 5 \r\n",
        b"Content-Length: \r\n",
        b"Content-Length: 5a\r\n",
        b"Content-Length: 1e1\r\n",
        b"Content-Length: 5,\r\n",
        b"Content-Length: 5\r\ncontent-length: 5\r\nCONTENT-LENGTH: 5\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 2\r\n",
    ];
    for (i, l) in cls.iter().enumerate() {
        let name = String::from_utf8_lossy(l).replace("\r\n", " | ");
        c.two(
            "content-length",
            format!("{i}: {name}"),
            &["a"],
            |cx, base| {
                let body = cat(&[b"hello", &smuggled(base, false)]);
                req("POST", base, "a", &cat(&[&cx.auth(), l]), &body)
            },
        );
    }

    // 5. Transfer-Encoding on HTTP/1.0.
    for with_cl in [false, true] {
        for with_key in [true, false] {
            let authed: &[&str] = if with_key { &["a"] } else { &[] };
            c.two(
                "http10-te",
                format!("HTTP/1.0 chunked with_cl={with_cl} key={with_key}"),
                authed,
                |cx, base| {
                    let body = cat(&[b"0\r\n\r\n", &smuggled(base, false)]);
                    let mut h = if with_key { cx.auth() } else { Vec::new() };
                    if with_cl {
                        h.extend(cl(body.len()));
                    }
                    h.extend_from_slice(TE);
                    cat(&[
                        format!("POST {base}/a HTTP/1.0\r\nHost: gw\r\n").as_bytes(),
                        &h,
                        b"\r\n",
                        &body,
                    ])
                },
            );
        }
    }

    // 6. obs-fold in framing, credential and ordinary fields.
    let folds: [(&str, &[u8]); 7] = [
        ("te", b"Transfer-Encoding:\r\n chunked\r\n"),
        ("te-tab", b"Transfer-Encoding: x\r\n\tchunked\r\n"),
        ("cl", b"Content-Length:\r\n 5\r\n"),
        ("host", b"X-Host: a\r\n b\r\n"),
        ("custom", b"X-Custom: a\r\n b\r\n"),
        ("auth-value", b"Authorization: Bearer\r\n KEY\r\n"),
        ("api-key-value", b"X-Api-Key:\r\n\tKEY\r\n"),
    ];
    for (name, fold) in folds {
        let has_key_in_fold = name.contains("auth") || name.contains("api-key");
        let authed: &[&str] = if has_key_in_fold { &[] } else { &["a"] };
        c.two("obs-fold", format!("fold in {name}"), authed, |cx, base| {
            let fold = String::from_utf8_lossy(fold).replace("KEY", &cx.key);
            let auth = if has_key_in_fold {
                Vec::new()
            } else {
                cx.auth()
            };
            let h = cat(&[&auth, fold.as_bytes(), &cl(5)]);
            cat(&[
                &req("POST", base, "a", &h, b"hello"),
                &smuggled(base, false),
            ])
        });
    }

    // 7. Bare CR / LF, NUL, DEL.
    c.two("bare-cr-lf", "bare LF line endings", &["a"], |cx, base| {
        format!(
            "GET {base}/a HTTP/1.1\nHost: gw\nAuthorization: Bearer {}\n\n",
            cx.key
        )
        .into_bytes()
    });
    c.two("bare-cr-lf", "bare CR line endings", &["a"], |cx, base| {
        format!(
            "GET {base}/a HTTP/1.1\rHost: gw\rAuthorization: Bearer {}\r\r",
            cx.key
        )
        .into_bytes()
    });
    c.two("bare-cr-lf", "CR CR LF line endings", &["a"], |cx, base| {
        format!(
            "GET {base}/a HTTP/1.1\r\r\nHost: gw\r\r\nAuthorization: Bearer {}\r\r\n\r\r\n",
            cx.key
        )
        .into_bytes()
    });
    let bad_bytes: [(&str, &[u8]); 10] = [
        ("CR in value", b"X-A: a\rb\r\n"),
        ("LF in value", b"X-A: a\nb\r\n"),
        ("NUL in value", b"X-A: a\0b\r\n"),
        ("NUL in name", b"X-\0A: b\r\n"),
        ("DEL in value", b"X-A: a\x7fb\r\n"),
        ("DEL in name", b"X-\x7fA: b\r\n"),
        ("CR before TE", b"\rTransfer-Encoding: chunked\r\n"),
        ("LF-only TE line", b"Transfer-Encoding: chunked\n"),
        ("LF then space", b"X-A: a\n Transfer-Encoding: chunked\r\n"),
        ("space-led first field", b" Transfer-Encoding: chunked\r\n"),
    ];
    for (name, bad) in bad_bytes {
        c.two("bare-cr-lf-nul", name, &["a"], |cx, base| {
            let body = cat(&[b"0\r\n\r\n", &smuggled(base, false)]);
            req(
                "POST",
                base,
                "a",
                &cat(&[&cx.auth(), bad, &cl(body.len())]),
                &body,
            )
        });
    }
    c.two("bare-cr-lf-nul", "NUL in path", &[], |cx, base| {
        cat(&[
            format!("GET {base}/a\0 HTTP/1.1\r\nHost: gw\r\n").as_bytes(),
            &cx.auth(),
            b"\r\n",
        ])
    });
    c.two("bare-cr-lf-nul", "NUL in method", &[], |cx, base| {
        cat(&[
            format!("G\0ET {base}/a HTTP/1.1\r\nHost: gw\r\n").as_bytes(),
            &cx.auth(),
            b"\r\n",
        ])
    });
    c.two(
        "bare-cr-lf-nul",
        "LF between pipelined heads",
        &["a"],
        |cx, base| {
            cat(&[
                &req("GET", base, "a", &cx.auth(), b""),
                b"\n",
                &req("GET", base, "u", b"", b""),
            ])
        },
    );

    // 8. Field-name tricks.
    // (name, field line, the request carries a valid credential, the key is in the line)
    let names: [(&str, &[u8], bool, bool); 10] = [
        (
            "space before colon: TE",
            b"Transfer-Encoding : chunked\r\n",
            true,
            false,
        ),
        (
            "space before colon: CL",
            b"Content-Length : 5\r\n",
            true,
            false,
        ),
        (
            "tab before colon: TE",
            b"Transfer-Encoding\t: chunked\r\n",
            true,
            false,
        ),
        ("empty name", b": chunked\r\n", true, false),
        ("colon only", b":\r\n", true, false),
        (
            "name with space",
            b"Transfer Encoding: chunked\r\n",
            true,
            false,
        ),
        (
            "underscore TE",
            b"Transfer_Encoding: chunked\r\n",
            true,
            false,
        ),
        (
            "space before colon: X-Api-Key",
            b"X-Api-Key : KEY\r\n",
            false,
            true,
        ),
        ("underscore X_Api_Key", b"X_Api_Key: KEY\r\n", false, true),
        (
            "no space after colon: X-Api-Key",
            b"X-Api-Key:KEY\r\n",
            true,
            true,
        ),
    ];
    for (name, line, valid, key_in_line) in names {
        let authed: &[&str] = if valid { &["a"] } else { &[] };
        c.two("field-names", name, authed, |cx, base| {
            let line = String::from_utf8_lossy(line).replace("KEY", &cx.key);
            let auth = if key_in_line { Vec::new() } else { cx.auth() };
            let body = b"5\r\nhello\r\n0\r\n\r\n";
            let h = cat(&[&auth, line.as_bytes(), &cl(body.len())]);
            cat(&[&req("POST", base, "a", &h, body), &smuggled(base, false)])
        });
    }

    // 9. Chunk syntax and trailers.
    let chunked: [(&str, &[u8]); 16] = [
        ("extension", b"5;ext=1\r\nhello\r\n0\r\n\r\n"),
        ("quoted extension", b"5;e=\"a b\"\r\nhello\r\n0\r\n\r\n"),
        (
            "size overflow",
            b"ffffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        ),
        ("0x size", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("negative size", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("space before size", b" 5\r\nhello\r\n0\r\n\r\n"),
        ("space after size", b"5 \r\nhello\r\n0\r\n\r\n"),
        ("missing CRLF after data", b"5\r\nhello0\r\n\r\n"),
        ("data longer than size", b"3\r\nhello\r\n0\r\n\r\n"),
        ("uppercase hex", b"A\r\nhellohello\r\n0\r\n\r\n"),
        ("bare LF chunk lines", b"5\nhello\n0\n\n"),
        (
            "trailer Content-Length",
            b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n",
        ),
        (
            "trailer Transfer-Encoding",
            b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "trailer X-Keygate-Key-Id",
            b"5\r\nhello\r\n0\r\nX-Keygate-Key-Id: spoofed\r\n\r\n",
        ),
        ("trailer Host", b"5\r\nhello\r\n0\r\nHost: internal\r\n\r\n"),
        (
            "long zero padding",
            b"00000000000000000000000000000000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (name, body) in chunked {
        c.two("chunked", name, &["a"], |cx, base| {
            let h = cat(&[&cx.auth(), TE, b"Trailer: Content-Length, Transfer-Encoding, X-Keygate-Key-Id, Host\r\nTE: trailers\r\n"]);
            cat(&[&req("POST", base, "a", &h, body), &smuggled(base, false)])
        });
    }
    for (name, trailer) in [
        ("trailer Authorization", "Authorization: Bearer KEY"),
        ("trailer X-Api-Key", "X-Api-Key: KEY"),
    ] {
        c.two(
            "chunked",
            format!("unauthenticated, {name}"),
            &[],
            |cx, base| {
                let t = trailer.replace("KEY", &cx.key);
                let body = format!("5\r\nhello\r\n0\r\n{t}\r\n\r\n");
                req(
                    "POST",
                    base,
                    "u",
                    &cat(&[TE, b"Trailer: Authorization, X-Api-Key\r\n"]),
                    body.as_bytes(),
                )
            },
        );
    }

    // Identity spoofing through look-alike names, Connection and trailers.
    for (name, h) in [
        (
            "underscored identity",
            "X_Keygate_Client_Id: victim\r\nX_Keygate_Key_Id: victim\r\n",
        ),
        (
            "dashed identity",
            "X-Keygate-Client-Id: victim\r\nx-keygate-permissions: ADMIN\r\n",
        ),
        (
            "Connection names identity",
            "Connection: x-keygate-client-id, x-keygate-key-id\r\n",
        ),
        (
            "underscored credential",
            "X_Api_Key: kg_spoof\r\nAuthorization_: x\r\n",
        ),
        (
            "a field named by Connection: close",
            "Connection: close, x-secret\r\nClose: x-keygate-key-id\r\nX-Secret: 1\r\n",
        ),
    ] {
        c.two("identity-spoof", name, &["a"], |cx, base| {
            req("GET", base, "a", &cat(&[&cx.auth(), h.as_bytes()]), b"")
        });
    }
    c.two(
        "identity-spoof",
        "identity in declared trailers",
        &["a"],
        |cx, base| {
            let h = cat(&[
                &cx.auth(),
                TE,
                b"Trailer: X-Keygate-Client-Id, X_Keygate_Key_Id\r\n",
            ]);
            let body =
                b"5\r\nhello\r\n0\r\nX-Keygate-Client-Id: victim\r\nX_Keygate_Key_Id: v\r\n\r\n";
            req("POST", base, "a", &h, body)
        },
    );

    // 10. Request lines.
    let lines: [(&str, &str, bool); 16] = [
        (
            "absolute-form other host",
            "GET http://other.example{base}/a HTTP/1.1",
            true,
        ),
        (
            "absolute-form https",
            "GET https://other.example{base}/a HTTP/1.1",
            true,
        ),
        (
            "absolute-form userinfo",
            "GET http://user@other.example{base}/a HTTP/1.1",
            true,
        ),
        (
            "authority-form CONNECT",
            "CONNECT other.example:443 HTTP/1.1",
            false,
        ),
        ("asterisk-form", "OPTIONS * HTTP/1.1", false),
        ("two spaces", "GET  {base}/a  HTTP/1.1", false),
        ("tab separators", "GET\t{base}/a\tHTTP/1.1", false),
        ("trailing space", "GET {base}/a HTTP/1.1 ", false),
        ("HTTP/1.10", "GET {base}/a HTTP/1.10", false),
        ("HTTP/2.0", "GET {base}/a HTTP/2.0", false),
        ("HTTP/1.1x", "GET {base}/a HTTP/1.1x", false),
        ("lowercase version", "GET {base}/a http/1.1", false),
        ("lowercase method", "get {base}/a HTTP/1.1", true),
        ("fragment", "GET {base}/a#frag HTTP/1.1", true),
        ("HTTP/0.9", "GET {base}/a", false),
        (
            "long method",
            "GETGETGETGETGETGETGETGETGETGETGETGETGETGETGET {base}/a HTTP/1.1",
            true,
        ),
    ];
    for (name, line, ok) in lines {
        // Requests that may legitimately be forwarded are authenticated; a refusal is fine.
        let authed: &[&str] = if ok { &["a"] } else { &[] };
        c.two("request-line", name, authed, |cx, base| {
            let l = line.replace("{base}", base);
            let end = if name == "HTTP/0.9" { "\r\n" } else { "" };
            cat(&[
                l.as_bytes(),
                b"\r\n",
                end.as_bytes(),
                b"Host: gw\r\n",
                &cx.auth(),
                b"\r\n",
            ])
        });
    }
    c.two(
        "request-line",
        "absolute-form without key",
        &[],
        |_, base| {
            format!("GET http://other.example{base}/u HTTP/1.1\r\nHost: gw\r\n\r\n").into_bytes()
        },
    );

    // 11. Pipelining: authenticated and unauthenticated requests on one connection.
    c.one("pipelined", "auth then none", &["a"], |cx, base| {
        cat(&[
            &req("GET", base, "a", &cx.auth(), b""),
            &req("GET", base, "u", b"", b""),
        ])
    });
    c.one("pipelined", "auth then forged", &["a"], |cx, base| {
        cat(&[
            &req("GET", base, "a", &cx.auth(), b""),
            &req("GET", base, "x", FORGED.as_bytes(), b""),
        ])
    });
    c.one("pipelined", "none then auth", &["a"], |cx, base| {
        cat(&[
            &req("GET", base, "u", b"", b""),
            &req("GET", base, "a", &cx.auth(), b""),
        ])
    });
    c.one(
        "pipelined",
        "auth, auth (X-Api-Key), none",
        &["a", "b2"],
        |cx, base| {
            cat(&[
                &req("GET", base, "a", &cx.auth(), b""),
                &req("GET", base, "b2", &cx.xkey(), b""),
                &req("GET", base, "u", b"", b""),
            ])
        },
    );
    c.one("pipelined", "auth POST then none", &["a"], |cx, base| {
        cat(&[
            &req("POST", base, "a", &cat(&[&cx.auth(), &cl(5)]), b"hello"),
            &req("GET", base, "u", b"", b""),
        ])
    });
    c.one(
        "pipelined",
        "keyed request inside a body",
        &["a"],
        |cx, base| {
            let inner = req("GET", base, "inner", &cx.auth(), b"");
            cat(&[&req(
                "POST",
                base,
                "a",
                &cat(&[&cx.auth(), &cl(inner.len())]),
                &inner,
            )])
        },
    );
    c.one(
        "pipelined",
        "unauth POST with keyed body",
        &[],
        |cx, base| {
            let inner = req("GET", base, "inner", &cx.auth(), b"");
            req("POST", base, "u", &cl(inner.len()), &inner)
        },
    );
    c.one("pipelined", "ten mixed", &["a"], |cx, base| {
        let mut v = Vec::new();
        for i in 0..10 {
            if i == 4 {
                v.extend(req("GET", base, "a", &cx.auth(), b""));
            } else if i % 2 == 0 {
                v.extend(req("GET", base, "u", b"", b""));
            } else {
                v.extend(req("GET", base, "x", FORGED.as_bytes(), b""));
            }
        }
        v
    });

    // 12. Expect: 100-continue without a key: 401 at once, body never needed.
    for (name, h) in [
        ("no key", ""),
        ("forged key", FORGED),
        ("garbage bearer", "Authorization: Bearer nope\r\n"),
    ] {
        let base = c.next_base();
        let bytes = req(
            "POST",
            &base,
            "u",
            format!("{h}Content-Length: 100000\r\nExpect: 100-continue\r\n").as_bytes(),
            b"",
        );
        c.push(
            "expect",
            format!("Expect, {name}, head only"),
            &[],
            vec![bytes],
            Some(401),
        );
    }
    c.two("expect", "Expect with key and body", &["a"], |cx, base| {
        let h = cat(&[&cx.auth(), &cl(5), b"Expect: 100-continue\r\n"]);
        req("POST", base, "a", &h, b"hello")
    });

    // 13. h2c upgrade and an HTTP/2 preface on the HTTP/1 port.
    c.two("h2", "Upgrade: h2c with key", &["a"], |cx, base| {
        let h = cat(&[
            &cx.auth(),
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ]);
        cat(&[&req("GET", base, "a", &h, b""), &smuggled(base, false)])
    });
    c.two("h2", "Upgrade: h2c without key", &[], |_, base| {
        req(
            "GET",
            base,
            "u",
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            b"",
        )
    });
    c.one("h2", "h2 preface then HTTP/1 request", &[], |_, base| {
        cat(&[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            &req("GET", base, "u", b"", b""),
        ])
    });
    c.one("h2", "h2 preface then junk", &[], |_, _| {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()
    });
    c.one("h2", "h2 preface only", &[], |_, _| {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    });

    // 14. Over-long lines.
    c.one("long-lines", "70 KiB header value", &[], |cx, base| {
        let h = cat(&[&cx.auth(), b"X-Big: ", &vec![b'a'; 70 * 1024], b"\r\n"]);
        req("GET", base, "a", &h, b"")
    });
    c.one("long-lines", "70 KiB request line", &[], |cx, base| {
        let path = format!("{base}/a?{}", "q".repeat(70 * 1024));
        cat(&[
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\n").as_bytes(),
            &cx.auth(),
            b"\r\n",
        ])
    });
    c.one("long-lines", "200 header fields", &[], |cx, base| {
        let mut h = cx.auth();
        for i in 0..200 {
            h.extend(format!("X-H{i}: v\r\n").into_bytes());
        }
        req("GET", base, "a", &h, b"")
    });
    c.one(
        "long-lines",
        "16 KiB chunk extension",
        &["a"],
        |cx, base| {
            let body = cat(&[b"5;", &vec![b'e'; 16 * 1024], b"\r\nhello\r\n0\r\n\r\n"]);
            req("POST", base, "a", &cat(&[&cx.auth(), TE]), &body)
        },
    );
    c.one("long-lines", "20 KiB bearer value", &[], |_, base| {
        let h = format!("Authorization: Bearer {}\r\n", "A".repeat(20 * 1024));
        req("GET", base, "u", h.as_bytes(), b"")
    });
    c.one("long-lines", "8 KiB Basic value", &[], |_, base| {
        let h = format!("Authorization: Basic {}\r\n", "QUFB".repeat(2048));
        req("GET", base, "u", h.as_bytes(), b"")
    });
    c
}

/// Seeded mutations of a few valid streams (http-garden's operators, simplified): byte
/// insert/delete/replace, insertion of CR/LF/SP/TAB/NUL/':'/',' tokens, framing field
/// insertion, and duplication of a slice (request split/concat).
fn mutations(c: &mut Corpus, n: usize) {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |m: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % m.max(1) as u64) as usize
    };
    const TOKENS: [&[u8]; 9] = [
        b"\r\n", b" ", b"\r", b"\n", b"\0", b":", b"\t", b"\r\n ", b",",
    ];
    const FIELDS: [&[u8]; 6] = [
        b"Content-Length: 0\r\n",
        b"Content-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"Connection: x-keygate-key-id, authorization\r\n",
        b"Transfer-Encoding: identity\r\n",
    ];
    for _ in 0..n {
        let base = c.next_base();
        let cx = &c.ctx;
        let seeds = [
            {
                let body = cat(&[b"0\r\n\r\n", &smuggled(&base, false)]);
                req(
                    "POST",
                    &base,
                    "a",
                    &cat(&[&cx.auth(), &cl(body.len()), TE]),
                    &body,
                )
            },
            cat(&[
                &req(
                    "POST",
                    &base,
                    "a",
                    &cat(&[&cx.auth(), TE]),
                    b"5\r\nhello\r\n0\r\n\r\n",
                ),
                &req("GET", &base, "u", b"", b""),
            ]),
            cat(&[
                &req("GET", &base, "a", &cx.xkey(), b""),
                &req("GET", &base, "x", FORGED.as_bytes(), b""),
            ]),
            cat(&[
                &req("POST", &base, "a", &cat(&[&cx.auth(), &cl(5)]), b"hello"),
                &smuggled(&base, false),
            ]),
        ];
        let mut s = seeds[rnd(seeds.len())].clone();
        for _ in 0..1 + rnd(3) {
            let at = rnd(s.len() + 1);
            match rnd(6) {
                0 => s.insert(at, rnd(256) as u8),
                1 if at < s.len() => {
                    s.remove(at);
                }
                2 if at < s.len() => s[at] = rnd(256) as u8,
                3 => {
                    let t = TOKENS[rnd(TOKENS.len())];
                    s.splice(at..at, t.iter().copied());
                }
                4 => {
                    // A framing field at a line start.
                    if let Some(i) = s.windows(2).skip(at).position(|w| w == b"\r\n") {
                        let f = FIELDS[rnd(FIELDS.len())];
                        let p = at + i + 2;
                        s.splice(p..p, f.iter().copied());
                    }
                }
                _ => {
                    let len = rnd(32).min(s.len() - at.min(s.len()));
                    let slice: Vec<u8> = s[at.min(s.len())..at.min(s.len()) + len].to_vec();
                    let to = rnd(s.len() + 1);
                    s.splice(to..to, slice);
                }
            }
        }
        let id = c.probes.len();
        c.probes.push(Probe {
            id,
            class: "mutation",
            name: format!("mutation {id}"),
            parts: vec![s],
            authed: vec![],
            must_answer: None,
            mutated: true,
        });
    }
}

/// Probe id and tag of an upstream target `/p/<id>/<tag>…`.
fn attribution(target: &str) -> Option<(usize, String)> {
    let path = target.split_once("://").map_or(target, |(_, rest)| {
        rest.find('/').map_or("", |i| &rest[i..])
    });
    let mut it = path.strip_prefix("/p/")?.splitn(2, '/');
    let id = it.next()?.parse().ok()?;
    let tag = it
        .next()
        .unwrap_or("")
        .split(['?', '#', '/'])
        .next()
        .unwrap_or("")
        .to_owned();
    Some((id, tag))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_forwards_nothing_ambiguous_or_unauthenticated() {
    let rec = Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let dir = tempfile::tempdir().unwrap();
    let text = harness::config(
        &format!("http://{up}"),
        dir.path(),
        "[limits]\nheader_read_timeout_secs = 2\n",
    );
    let mut gw = harness::keygate(&text, dir.path()).spawn();
    let (key, key_id) = harness::make_key(gw.admin, "smuggler", &[]).await;

    let mut corpus = build_corpus(&key);
    let generated = corpus.probes.len();
    mutations(&mut corpus, 250);
    let probes = Arc::new(corpus.probes);

    // Send, 16 at a time.
    let proxy = gw.proxy;
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..probes.len() {
        let probes = Arc::clone(&probes);
        let sem = Arc::clone(&sem);
        tasks.push(tokio::spawn(async move {
            let _slot = sem.acquire().await.unwrap();
            let p = &probes[i];
            let parts: Vec<&[u8]> = p.parts.iter().map(Vec::as_slice).collect();
            harness::exchange(
                proxy,
                &parts,
                Duration::from_millis(50),
                Duration::from_millis(1000),
                Duration::from_secs(5),
            )
            .await
        }));
    }
    let mut answers: Vec<Exchange> = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    // Anything the gateway might still send upstream late.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let seen = rec.seen();
    let garbage = rec.garbage();
    let mut by_probe: HashMap<usize, Vec<&harness::RawSeen>> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut ambiguous = garbage.len();
    let mut unauth = 0;
    let mut extra = 0;
    for g in &garbage {
        failures.push(format!(
            "upstream {} read garbage ({}): {:?}",
            g.label,
            g.why,
            String::from_utf8_lossy(&g.bytes)
        ));
    }
    for s in &seen {
        let target = s.target_str();
        let who = attribution(&target);
        let mut bad = Vec::new();
        if !s.problems.is_empty() {
            ambiguous += 1;
            bad.push(format!("ambiguous: {:?}", s.problems));
        }
        let identity = s.header("x-keygate-key-id") == Some(key_id.as_bytes());
        let tag_unauth = who
            .as_ref()
            .is_some_and(|(_, t)| UNAUTH_TAGS.contains(&t.as_str()));
        if !identity || tag_unauth {
            unauth += 1;
            bad.push("unauthenticated request reached the upstream".into());
        }
        if s.headers
            .iter()
            .any(|(_, v)| v.windows(key.len()).any(|w| w == key.as_bytes()))
        {
            bad.push("the credential was forwarded".into());
        }
        for id_field in ["x-keygate-key-id", "x-keygate-client-id"] {
            if s.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(id_field))
                .count()
                != 1
            {
                bad.push(format!("not exactly one {id_field}"));
            }
        }
        if s.header("x-keygate-client-id") != Some(b"smuggler".as_slice()) {
            bad.push("spoofed X-Keygate-Client-Id".into());
        }
        match &who {
            Some((id, _)) if *id < probes.len() => by_probe.entry(*id).or_default().push(s),
            _ => {}
        }
        if !bad.is_empty() {
            failures.push(format!("{target}: {}", bad.join("; ")));
        }
    }

    let mut by_class: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut five_xx = 0;
    let mut refused = 0;
    let mut forwarded_exact = 0;
    for (p, ans) in probes.iter().zip(&answers) {
        let e = by_class.entry(p.class).or_default();
        e.0 += 1;
        let mut bad = Vec::new();
        if ans.statuses.iter().any(|&s| s >= 500) {
            five_xx += 1;
            bad.push(format!("5xx in {:?}", ans.statuses));
        }
        if let Some(code) = p.must_answer
            && !ans.finals().contains(&code)
        {
            bad.push(format!("expected a {code}, got {:?}", ans.statuses));
        }
        let got: Vec<String> = by_probe
            .get(&p.id)
            .map(|v| {
                v.iter()
                    .filter_map(|s| attribution(&s.target_str()).map(|(_, t)| t))
                    .collect()
            })
            .unwrap_or_default();
        if !p.mutated {
            let mut dup = got.clone();
            dup.sort();
            dup.dedup();
            if dup.len() != got.len() || got.iter().any(|t| !p.authed.contains(&t.as_str())) {
                extra += 1;
                bad.push(format!(
                    "upstream saw {got:?}, authenticated were {:?}",
                    p.authed
                ));
            }
            if got.len() == p.authed.len() {
                forwarded_exact += 1;
            } else if ans.finals().iter().any(|s| (400..500).contains(s)) {
                e.2 += 1;
                refused += 1;
            }
        }
        if bad.is_empty() {
            e.1 += 1;
        } else {
            failures.push(format!(
                "probe {} [{}] {}: {} (answers {:?}, closed {})",
                p.id,
                p.class,
                p.name,
                bad.join("; "),
                ans.statuses,
                ans.closed
            ));
        }
    }

    let alive = gw.alive();
    let panics = gw.panics();
    let mut text = format!(
        "probes sent: {} ({generated} generated in {} classes + {} mutations)\n\
         upstream requests read: {}\n\
         ambiguous requests forwarded: {ambiguous}\n\
         unauthenticated requests that reached the upstream: {unauth}\n\
         extra upstream requests: {extra}\n\
         5xx answers: {five_xx}\n\
         crashes: {} (panics logged: {})\n\
         generated probes forwarded exactly as authenticated: {forwarded_exact}; refused or cut short with a 4xx: {refused}\n\
         per class (probes / passed):\n",
        probes.len(),
        by_class.len() - 1,
        probes.len() - generated,
        seen.len(),
        u8::from(!alive),
        panics.len(),
    );
    for (class, (n, ok, _)) in &by_class {
        text.push_str(&format!("  {class:<16} {n:>4} / {ok}\n"));
    }
    harness::report("smuggling", &text);
    for f in failures.iter().take(40) {
        eprintln!("FAIL {f}");
    }
    assert!(alive, "keygate died during the corpus");
    assert!(panics.is_empty(), "keygate panicked: {panics:?}");
    assert!(probes.len() >= 400, "only {} probes", probes.len());
    assert_eq!(ambiguous, 0, "ambiguous requests reached the upstream");
    assert_eq!(unauth, 0, "unauthenticated requests reached the upstream");
    assert_eq!(five_xx, 0, "5xx answers");
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The corpus really exercised the forwarding path.
    assert!(
        forwarded_exact > 100,
        "too few probes were forwarded: {forwarded_exact}"
    );
    gw.kill9();
}
