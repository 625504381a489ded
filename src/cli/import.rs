//! `keygate key import FILE`: keys of another system, one JSON object per line (the objects of
//! `POST /v1/api-keys/import`), streamed to the admin API in batches. The file is never held in
//! memory: one line (at most 64 KiB) and one batch at a time.
//!
//! `--on-error skip` (the default): a bad line, whether the command or the server refuses it,
//! is reported with its line number and skipped; the rest is imported; the summary counts
//! both.
//!
//! `--on-error abort`: nothing is ever half-applied silently. The file is read twice: first
//! every line is checked locally (JSON, fields, key shapes) and if any is bad they are all
//! reported and nothing is sent. Then each batch is imported atomically (`"atomic": true`: the
//! server writes all of it or none of it); when the server refuses a key (unknown client,
//! duplicate…), its whole batch is left out, the import stops, and the command says exactly
//! which lines were imported (every line before that batch) and which were not (that batch
//! and everything after it). Fix the file and rerun from the first line not imported — or
//! rerun it whole with `--on-error skip`, which reports the already-imported keys as
//! duplicates and imports the rest. A file read from stdin (`-`) cannot be read twice, so
//! abort needs a file.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::http::Admin;
use super::{CliError, Global, Output, emit};

/// Longest line read; a longer one is reported and skipped without being held whole.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest request body sent (below the admin listener's default 1 MiB limit).
const MAX_BATCH_BYTES: usize = 768 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Skip,
    Abort,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// JSON lines: {"client_id", "name", "key" | "sha256", "permissions"?, "expires_at"?};
    /// `-` reads stdin.
    pub file: PathBuf,
    /// What a bad line does: skip it (reported with its line number) or stop the import.
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
    /// Keys per request (1–10000).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub batch: u32,
}

/// A reader of bounded lines, counting line numbers and bytes.
struct Lines<R> {
    r: R,
    line_no: u64,
    bytes: u64,
    buf: Vec<u8>,
}

enum Line<'a> {
    Eof,
    Blank,
    TooLong,
    Text(&'a [u8]),
}

impl<R: BufRead> Lines<R> {
    fn new(r: R) -> Self {
        Self {
            r,
            line_no: 0,
            bytes: 0,
            buf: Vec::with_capacity(1024),
        }
    }

    fn next(&mut self) -> std::io::Result<Line<'_>> {
        self.buf.clear();
        let n = (&mut self.r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(Line::Eof);
        }
        self.line_no += 1;
        self.bytes += n as u64;
        if self.buf.len() > MAX_LINE && !self.buf.ends_with(b"\n") {
            // Skip the rest of the line without keeping it.
            loop {
                let avail = self.r.fill_buf()?;
                if avail.is_empty() {
                    break;
                }
                match avail.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.r.consume(i + 1);
                        self.bytes += i as u64 + 1;
                        break;
                    }
                    None => {
                        let l = avail.len();
                        self.r.consume(l);
                        self.bytes += l as u64;
                    }
                }
            }
            return Ok(Line::TooLong);
        }
        let text = self.buf.trim_ascii();
        Ok(if text.is_empty() {
            Line::Blank
        } else {
            Line::Text(text)
        })
    }
}

/// The local check of one line: what the server would refuse for its shape alone, by the
/// server's own rules ([`crate::keys::foreign::parse_import_item`]). Whether the client exists or the key is
/// already stored only the server knows, and so does whether a key that starts with its key
/// prefix carries a valid checksum (the prefix is the server's setting).
fn check(text: &[u8]) -> Result<(), String> {
    let item: Value = serde_json::from_slice(text)
        .map_err(|e| format!("not a JSON object ({})", e.classify_str()))?;
    if !item.is_object() {
        return Err("not a JSON object".into());
    }
    crate::keys::foreign::parse_import_item(&item, None, crate::keys::now_millis()).map(|_| ())
}

trait Classify {
    fn classify_str(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    /// The kind of JSON error without its text (which may quote the line).
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "not an object",
            serde_json::error::Category::Eof => "truncated JSON",
        }
    }
}

enum Msg {
    Bad {
        line: u64,
        message: String,
    },
    Batch {
        lines: Vec<u64>,
        body: Bytes,
        at: u64,
    },
    Failed(String),
}

fn open(path: &PathBuf) -> Result<(Box<dyn BufRead + Send>, Option<u64>), CliError> {
    if path.as_os_str() == "-" {
        return Ok((
            Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())),
            None,
        ));
    }
    let f = File::open(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let size = f.metadata().ok().map(|m| m.len());
    Ok((Box::new(BufReader::with_capacity(1 << 20, f)), size))
}

/// Pass one of abort mode: every bad line, reported; `Failed` when there is one.
fn validate(path: &PathBuf) -> Result<u64, CliError> {
    let (r, _) = open(path)?;
    let mut lines = Lines::new(r);
    let mut bad = 0u64;
    loop {
        let line_no = lines.line_no + 1;
        let problem = match lines
            .next()
            .map_err(|e| CliError::Usage(format!("reading {}: {e}", path.display())))?
        {
            Line::Eof => break,
            Line::Blank => None,
            Line::TooLong => Some(format!("longer than {MAX_LINE} bytes")),
            Line::Text(t) => check(t).err(),
        };
        if let Some(m) = problem {
            bad += 1;
            if bad <= 100 {
                eprintln!("line {line_no}: {m}");
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} bad lines; nothing was imported (--on-error abort)");
        return Err(CliError::Failed);
    }
    Ok(lines.line_no)
}

/// Reads `r` into batches on its own thread, so reading overlaps the requests.
fn produce(
    r: Box<dyn BufRead + Send>,
    batch: usize,
    atomic: bool,
    tx: tokio::sync::mpsc::Sender<Msg>,
) {
    let mut lines = Lines::new(r);
    let head: &[u8] = if atomic {
        b"{\"atomic\":true,\"keys\":["
    } else {
        b"{\"keys\":["
    };
    let mut body = Vec::with_capacity(MAX_BATCH_BYTES + MAX_LINE);
    let mut in_batch = Vec::with_capacity(batch);
    let flush = |body: &mut Vec<u8>, in_batch: &mut Vec<u64>, at: u64| {
        body.extend_from_slice(b"]}");
        let msg = Msg::Batch {
            lines: std::mem::take(in_batch),
            body: Bytes::from(std::mem::replace(
                body,
                Vec::with_capacity(MAX_BATCH_BYTES + MAX_LINE),
            )),
            at,
        };
        tx.blocking_send(msg).is_ok()
    };
    loop {
        let line_no = lines.line_no + 1;
        let msg = match lines.next() {
            Err(e) => Some(Msg::Failed(format!("reading line {line_no}: {e}"))),
            Ok(Line::Eof) => break,
            Ok(Line::Blank) => None,
            Ok(Line::TooLong) => Some(Msg::Bad {
                line: line_no,
                message: format!("longer than {MAX_LINE} bytes"),
            }),
            Ok(Line::Text(t)) => match check(t) {
                Err(message) => Some(Msg::Bad {
                    line: line_no,
                    message,
                }),
                Ok(()) => {
                    // A whole JSON object (checked above), so it can be spliced in as is.
                    if body.is_empty() {
                        body.extend_from_slice(head);
                    } else {
                        body.push(b',');
                    }
                    body.extend_from_slice(t);
                    in_batch.push(line_no);
                    None
                }
            },
        };
        let failed = matches!(msg, Some(Msg::Failed(_)));
        if let Some(m) = msg
            && (tx.blocking_send(m).is_err() || failed)
        {
            return;
        }
        let at = lines.bytes;
        if (in_batch.len() >= batch || body.len() >= MAX_BATCH_BYTES)
            && !flush(&mut body, &mut in_batch, at)
        {
            return;
        }
    }
    if !in_batch.is_empty() {
        let at = lines.bytes;
        flush(&mut body, &mut in_batch, at);
    }
}

/// Progress on stderr: a bar redrawn in place on a terminal, plain lines every few seconds
/// otherwise.
struct Progress {
    start: Instant,
    last: Instant,
    size: Option<u64>,
    terminal: bool,
}

impl Progress {
    fn show(&mut self, imported: u64, at: u64, done: bool) {
        let now = Instant::now();
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if !done && now.duration_since(self.last) < every {
            return;
        }
        self.last = now;
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-3);
        let rate = imported as f64 / secs;
        let frac = self
            .size
            .filter(|&s| s > 0)
            .map(|s| (at as f64 / s as f64).min(1.0));
        let eta = frac
            .filter(|&f| f > 0.0)
            .map(|f| secs * (1.0 - f) / f)
            .map(|e| format!("{}:{:02}", e as u64 / 60, e as u64 % 60))
            .unwrap_or_else(|| "?".into());
        let pct = frac
            .map(|f| format!("{:.0}%", f * 100.0))
            .unwrap_or_default();
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = 30;
            let filled = (frac.unwrap_or(0.0) * width as f64) as usize;
            let _ = write!(
                err,
                "\r[{}{}] {pct:>4} {imported} keys {rate:.0}/s ETA {eta}   ",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            if done {
                let _ = writeln!(err);
            }
        } else {
            let of = if pct.is_empty() {
                String::new()
            } else {
                format!(", {pct} of the input")
            };
            let _ = writeln!(
                err,
                "progress: {imported} keys imported{of}, {rate:.0} keys/s, ETA {eta}"
            );
        }
    }
}

pub async fn run(g: &Global, admin: &Admin, args: &ImportArgs) -> Result<(), CliError> {
    let abort = args.on_error == OnError::Abort;
    if abort && args.file.as_os_str() == "-" {
        return Err(CliError::Usage(
            "--on-error abort reads the file twice (checked first, then imported): give a file, \
             not stdin"
                .into(),
        ));
    }
    if abort {
        validate(&args.file)?;
    }
    let (r, size) = open(&args.file)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let batch = args.batch as usize;
    let reader = std::thread::spawn(move || produce(r, batch, abort, tx));
    let mut progress = Progress {
        start: Instant::now(),
        last: Instant::now(),
        size,
        terminal: std::io::stderr().is_terminal(),
    };
    let (mut imported, mut refused, mut last_line, mut at) = (0u64, 0u64, 0u64, 0u64);
    let mut outcome = Ok(());
    let report = |line: u64, message: &str| {
        if progress_is_terminal() {
            eprint!("\r");
        }
        eprintln!("line {line}: {message}");
    };
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Failed(m) => {
                outcome = Err(CliError::Usage(m));
                break;
            }
            Msg::Bad { line, message } => {
                refused += 1;
                report(line, &message);
                if abort {
                    // Checked in the first pass: the file changed since.
                    eprintln!(
                        "import stopped: line {line} changed since it was checked; {imported} \
                         keys were imported, all from lines before it"
                    );
                    outcome = Err(CliError::Failed);
                    break;
                }
            }
            Msg::Batch {
                lines,
                body,
                at: pos,
            } => {
                let (first, last) = (lines[0], lines[lines.len() - 1]);
                let answer = match admin
                    .call(::http::Method::POST, "/v1/api-keys/import", Some(body))
                    .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        // A refusal (4xx) wrote nothing; a lost answer or a server error may
                        // have come after the batch was stored, in part or whole.
                        let batch = if matches!(e, CliError::Refused { status, .. } if status < 500)
                        {
                            "none from it on"
                        } else {
                            "and whether the keys of that batch were stored is not known (see \
                             `keygate key list`; a rerun with `--on-error skip` reports those \
                             already stored as refused lines and imports the rest)"
                        };
                        eprintln!(
                            "import stopped at the batch of lines {first}–{last}: {imported} \
                             keys were imported from the lines before it, {batch}"
                        );
                        outcome = Err(e);
                        break;
                    }
                };
                let errors = answer["errors"].as_array().cloned().unwrap_or_default();
                for e in &errors {
                    let line = e["index"]
                        .as_u64()
                        .and_then(|i| lines.get(i as usize))
                        .copied()
                        .unwrap_or(first);
                    report(line, e["message"].as_str().unwrap_or("refused"));
                }
                refused += errors.len() as u64;
                imported += answer["imported"].as_u64().unwrap_or(0);
                if abort && !errors.is_empty() {
                    eprintln!(
                        "import stopped: the batch of lines {first}–{last} was left out whole \
                         (--on-error abort); {imported} keys were imported, all from lines \
                         before {first}; nothing from line {first} on"
                    );
                    outcome = Err(CliError::Failed);
                    break;
                }
                last_line = last;
                at = pos;
                progress.show(imported, at, false);
            }
        }
    }
    drop(rx);
    let _ = reader.join();
    outcome?;
    progress.show(imported, at, true);
    let summary =
        serde_json::json!({"imported": imported, "refused": refused, "last_line": last_line});
    if g.output == Output::Json {
        emit(summary)?;
    } else if !g.quiet {
        emit(format_args!(
            "imported {imported} keys; {refused} lines refused"
        ))?;
    }
    Ok(())
}

fn progress_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
