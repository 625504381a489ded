//! A strict decoder of chunked bodies (RFC 9112 §7.1), without I/O: fed whatever bytes have
//! arrived, it reports the chunk data in them and where the body ends. Chunk extensions and
//! trailer fields are read past and dropped; lines must end in CRLF.

/// Longest chunk-size line (size, extensions) accepted.
const MAX_LINE: usize = 4096;
/// Most bytes of trailer fields accepted.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`digits` read so far).
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeSpace {
        value: u64,
    },
    /// A chunk extension, up to CR.
    Extension {
        value: u64,
    },
    /// LF after a chunk-size line.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct Malformed;

/// What one call to [`Decoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `input[start..start + len]` is chunk data; `consumed` bytes of input were used.
    Data {
        start: usize,
        len: usize,
        consumed: usize,
    },
    /// Every byte of the input was framing; more are needed.
    NeedMore,
    /// The body ended after `consumed` bytes of the input.
    Done { consumed: usize },
}

#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    line: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            line: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads framing from `input` up to the next piece of chunk data or the end of the body.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, Malformed> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data { left } = self.state {
                let n = (left.min((input.len() - i) as u64)) as usize;
                let left = left - n as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { left }
                };
                return Ok(Step::Data {
                    start: i,
                    len: n,
                    consumed: i + n,
                });
            }
            let b = input[i];
            i += 1;
            self.line += 1;
            self.state = match self.state {
                State::Size { value, digits } => match (b, hex(b)) {
                    (_, Some(d)) => {
                        if digits >= 15 {
                            return Err(Malformed);
                        }
                        State::Size {
                            value: value << 4 | d,
                            digits: digits + 1,
                        }
                    }
                    _ if digits == 0 => return Err(Malformed),
                    (b' ' | b'\t', _) => State::SizeSpace { value },
                    (b';', _) => State::Extension { value },
                    (b'\r', _) => State::SizeLf { value },
                    _ => return Err(Malformed),
                },
                State::SizeSpace { value } => match b {
                    b' ' | b'\t' => State::SizeSpace { value },
                    b';' => State::Extension { value },
                    b'\r' => State::SizeLf { value },
                    _ => return Err(Malformed),
                },
                State::Extension { value } => match b {
                    b'\r' => State::SizeLf { value },
                    b'\t' | b' '..=b'~' | 0x80..=0xff => State::Extension { value },
                    _ => return Err(Malformed),
                },
                State::SizeLf { value } => {
                    if b != b'\n' {
                        return Err(Malformed);
                    }
                    self.line = 0;
                    if value == 0 {
                        State::TrailerStart
                    } else {
                        State::Data { left: value }
                    }
                }
                State::Data { .. } => unreachable!("handled above"),
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(Malformed),
                },
                State::DataLf => match b {
                    b'\n' => {
                        self.line = 0;
                        State::Size {
                            value: 0,
                            digits: 0,
                        }
                    }
                    _ => return Err(Malformed),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => State::TrailerLine,
                    _ => return Err(Malformed),
                },
                State::TrailerLine => match b {
                    b'\r' => State::TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => State::TrailerLine,
                    _ => return Err(Malformed),
                },
                State::TrailerLf => match b {
                    // `line` keeps counting across trailer lines: it bounds them all.
                    b'\n' => State::TrailerStart,
                    _ => return Err(Malformed),
                },
                State::EndLf => match b {
                    b'\n' => {
                        self.state = State::Done;
                        return Ok(Step::Done { consumed: i });
                    }
                    _ => return Err(Malformed),
                },
                State::Done => return Ok(Step::Done { consumed: i - 1 }),
            };
            let limit = match self.state {
                State::TrailerStart | State::TrailerLine | State::TrailerLf | State::EndLf => {
                    MAX_TRAILERS
                }
                _ => MAX_LINE,
            };
            if self.line > limit {
                return Err(Malformed);
            }
        }
        Ok(Step::NeedMore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; the data and whether it ended.
    fn run(input: &[u8], step: usize) -> Result<(Vec<u8>, bool, usize), Malformed> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut pending: Vec<u8> = Vec::new();
        while fed < input.len() || !pending.is_empty() {
            if pending.is_empty() {
                let end = (fed + step).min(input.len());
                pending.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            match d.decode(&pending)? {
                Step::Data {
                    start,
                    len,
                    consumed,
                } => {
                    out.extend_from_slice(&pending[start..start + len]);
                    pending.drain(..consumed);
                }
                Step::NeedMore => pending.clear(),
                Step::Done { consumed } => {
                    let rest = pending.len() - consumed + (input.len() - fed);
                    return Ok((out, true, rest));
                }
            }
        }
        Ok((out, d.is_done(), 0))
    }

    #[test]
    fn decodes_in_any_split() {
        let body =
            b"5\r\nhello\r\n1;ext=\"x\"\r\n \r\nA  \r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (data, done, rest) = run(body, step).unwrap();
            assert_eq!(data, b"hello 0123456789", "step {step}");
            assert!(done);
            assert_eq!(rest, 4, "step {step}");
        }
    }

    #[test]
    fn refuses_malformed_framing() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"g\r\n",
            b"\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"1000000000000000\r\n",
            b"5;a\x00b\r\n",
            b"5 x\r\n",
        ] {
            assert!(
                run(bad, bad.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn bounds_lines_and_trailers() {
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE));
        long.extend_from_slice(b"\r\n");
        assert!(run(&long, 100).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"x-a: bbbbbbbbbbbb\r\n");
        }
        trailers.extend_from_slice(b"\r\n");
        assert!(run(&trailers, 100).is_err());
    }

    #[test]
    fn incomplete_is_not_done() {
        let (data, done, _) = run(b"5\r\nhel", 3).unwrap();
        assert_eq!(data, b"hel");
        assert!(!done);
    }
}
