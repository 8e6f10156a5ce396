//! What the sink keeps of accepted messages: the `--received` id log and the `--store`
//! directory.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::util::write_atomic;

/// The id a message is known by: its `X-Sluice-Load-Id` header, else its `Message-ID`
/// header, from the header section only (up to the first empty line). Header names match
/// case-insensitively; folded values are joined; surrounding blanks are trimmed.
pub fn message_id(message: &[u8]) -> Option<String> {
    let mut load_id = None;
    let mut msg_id = None;
    let mut lines = HeaderLines::new(message);
    while let Some((name, value)) = lines.next_field() {
        if load_id.is_none() && name.eq_ignore_ascii_case(b"X-Sluice-Load-Id") {
            load_id = Some(value);
            break;
        }
        if msg_id.is_none() && name.eq_ignore_ascii_case(b"Message-ID") {
            msg_id = Some(value);
        }
    }
    let v = load_id.or(msg_id)?;
    let s = String::from_utf8_lossy(&v).trim().to_string();
    (!s.is_empty() && !s.contains(['\r', '\n'])).then_some(s)
}

/// Iterates `name: value` fields of an RFC 5322 header section.
struct HeaderLines<'a> {
    rest: &'a [u8],
}

impl<'a> HeaderLines<'a> {
    fn new(message: &'a [u8]) -> Self {
        HeaderLines { rest: message }
    }

    /// The next line without its line ending, or `None` at the end of the headers.
    fn line(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let (line, rest) = match memchr::memchr(b'\n', self.rest) {
            Some(i) => (&self.rest[..i], &self.rest[i + 1..]),
            None => (self.rest, &[][..]),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.rest = &[];
            return None;
        }
        self.rest = rest;
        Some(line)
    }

    fn next_field(&mut self) -> Option<(&'a [u8], Vec<u8>)> {
        loop {
            let line = self.line()?;
            let Some(colon) = memchr::memchr(b':', line) else {
                continue; // not a field (a stray continuation or garbage): skip it
            };
            let name = &line[..colon];
            let mut value = line[colon + 1..].to_vec();
            while matches!(self.rest.first(), Some(b' ' | b'\t')) {
                match self.line() {
                    Some(cont) => value.extend_from_slice(cont),
                    None => break,
                }
            }
            return Some((name.trim_ascii(), value));
        }
    }
}

/// The `--received` file: one id per line, appended (a restarted sink keeps adding to it).
/// Workers hand over whole batches of lines, written with one `write` each before the
/// replies that acknowledge them are sent, so a line is never torn and never late.
#[derive(Debug)]
pub struct ReceivedLog {
    file: Mutex<File>,
}

impl ReceivedLog {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(ReceivedLog {
            file: Mutex::new(file),
        })
    }

    /// Appends complete lines.
    pub fn append(&self, lines: &[u8]) -> io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(lines)
    }
}

/// The envelope stored next to each message (`NNNNNNNN.json`). Field names are a contract.
#[derive(Debug, Serialize)]
pub struct StoredEnvelope<'a> {
    /// Sequence number (also the file name).
    pub seq: u64,
    /// The id in our `250 ... queued as` reply.
    pub queue_id: &'a str,
    /// The client's EHLO/HELO argument.
    pub helo: &'a str,
    /// Envelope sender without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// Accepted recipients without angle brackets.
    pub rcpt_to: Vec<String>,
    /// `DATA` or `BDAT`.
    pub transfer: &'a str,
    /// Message size in octets (as stored: dot-unstuffed, CRLF line ends).
    pub size: usize,
    /// The message's id as written to `--received`.
    pub id: Option<&'a str>,
}

/// The `--store` directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Uses `dir`, creating it.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes the message bytes, then the envelope, both atomically, so a reader that sees
    /// `N.json` can rely on `N.eml` being complete.
    pub fn put(&self, env: &StoredEnvelope<'_>, message: &[u8]) -> io::Result<()> {
        let seq = env.seq;
        write_atomic(&self.dir.join(format!("{seq:08}.eml")), message)?;
        let mut j = serde_json::to_vec_pretty(env).map_err(io::Error::other)?;
        j.push(b'\n');
        write_atomic(&self.dir.join(format!("{seq:08}.json")), &j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_headers() {
        let table: [(&[u8], Option<&str>); 7] = [
            (
                b"Message-ID: <a@b>\r\nX-Sluice-Load-Id: r-1\r\n\r\nbody",
                Some("r-1"),
            ),
            (
                b"x-sluice-load-id:r-2\r\nMessage-ID: <a@b>\r\n\r\n",
                Some("r-2"),
            ),
            (
                b"Subject: hi\r\nMessage-Id:\r\n <folded@x>\r\n\r\n",
                Some("<folded@x>"),
            ),
            (b"Subject: hi\r\n\r\nX-Sluice-Load-Id: in-body\r\n", None),
            (
                b"Received: from x\r\n\tby y\r\nMessage-ID: <m@x>\n\nbody",
                Some("<m@x>"),
            ),
            (b"Subject: no id\r\n\r\n", None),
            (b"X-Sluice-Load-Id:   \r\n\r\n", None),
        ];
        for (msg, want) in table {
            assert_eq!(
                message_id(msg).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn received_log_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("received");
        let log = ReceivedLog::open(&p).unwrap();
        log.append(b"a\nb\n").unwrap();
        drop(log);
        ReceivedLog::open(&p).unwrap().append(b"c\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a\nb\nc\n");
    }
}
