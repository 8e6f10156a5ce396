//! `verify`: compares what the generator was told is accepted (`send --acked`) with what the
//! sink received (`sink --received`). A lost message (acknowledged, never received) is the
//! one failure a relay must never have; duplicates are reported too (at-least-once delivery
//! after a crash makes some expected, so they fail only with `--fail-on-duplicates`).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

/// How many example ids the report lists.
const EXAMPLES: usize = 20;

/// The comparison.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines in the acked file (ids acknowledged with 250).
    pub acked: u64,
    /// Distinct acked ids.
    pub acked_distinct: u64,
    /// Lines in the received file (messages the sink accepted), `-` lines excluded.
    pub received: u64,
    /// Distinct received ids.
    pub received_distinct: u64,
    /// Received lines without an id (`-`).
    pub received_without_id: u64,
    /// Acked ids never received.
    pub lost: u64,
    /// Some lost ids.
    pub lost_examples: Vec<String>,
    /// Ids received more than once.
    pub duplicated: u64,
    /// Extra copies in all (`received - received_distinct`).
    pub duplicate_copies: u64,
    /// Some duplicated ids with their counts.
    pub duplicated_examples: Vec<(String, u64)>,
    /// Received but never acked: normal when the generator did not see the 250 (for
    /// example the relay crashed after delivering, before answering).
    pub unacked_received: u64,
}

/// Reads one id per line; trims blanks; skips empty lines.
fn read_ids(path: &Path) -> io::Result<Vec<String>> {
    let text = fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// The generator's `Message-ID` is `<ID@sluice-load.test>`: a sink that only saw that header
/// (a relay that dropped `X-Sluice-Load-Id`) still matches the acked id.
fn normalise(id: &str) -> &str {
    id.strip_prefix('<')
        .and_then(|s| s.strip_suffix("@sluice-load.test>"))
        .unwrap_or(id)
}

/// Compares the two files.
pub fn run(acked: &Path, received: &Path) -> io::Result<VerifyReport> {
    Ok(compare(&read_ids(acked)?, &read_ids(received)?))
}

/// Compares two id lists.
pub fn compare(acked: &[String], received: &[String]) -> VerifyReport {
    let mut got: HashMap<&str, u64> = HashMap::with_capacity(received.len());
    let mut without_id = 0;
    for r in received {
        if r == "-" {
            without_id += 1;
            continue;
        }
        *got.entry(normalise(r)).or_insert(0) += 1;
    }
    let mut want: HashMap<&str, u64> = HashMap::with_capacity(acked.len());
    let mut lost = Vec::new();
    for a in acked {
        let a = a.as_str();
        let first = {
            let c = want.entry(a).or_insert(0);
            *c += 1;
            *c == 1
        };
        if first && !got.contains_key(a) {
            lost.push(a.to_string());
        }
    }
    let mut dups: Vec<(String, u64)> = got
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(k, &n)| (k.to_string(), n))
        .collect();
    dups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let received_n = (received.len() as u64) - without_id;
    let lost_n = lost.len() as u64;
    lost.truncate(EXAMPLES);
    VerifyReport {
        acked: acked.len() as u64,
        acked_distinct: want.len() as u64,
        received: received_n,
        received_distinct: got.len() as u64,
        received_without_id: without_id,
        lost: lost_n,
        lost_examples: lost,
        duplicated: dups.len() as u64,
        duplicate_copies: received_n - got.len() as u64,
        duplicated_examples: dups.into_iter().take(EXAMPLES).collect(),
        unacked_received: got.keys().filter(|k| !want.contains_key(*k)).count() as u64,
    }
}

/// The human-readable report.
pub fn render_text(r: &VerifyReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "verify: {} acked ({} distinct), {} received ({} distinct{})",
        r.acked,
        r.acked_distinct,
        r.received,
        r.received_distinct,
        if r.received_without_id > 0 {
            format!(", {} without id", r.received_without_id)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "  lost: {}{}",
        r.lost,
        if r.lost > 0 {
            format!(" (e.g. {})", r.lost_examples.join(", "))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "  duplicated: {} ids, {} extra copies{}",
        r.duplicated,
        r.duplicate_copies,
        if r.duplicated > 0 {
            let ex: Vec<String> = r
                .duplicated_examples
                .iter()
                .map(|(id, n)| format!("{id} x{n}"))
                .collect();
            format!(" (e.g. {})", ex.join(", "))
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, "  received but not acked: {}", r.unacked_received);
    let _ = writeln!(
        s,
        "  result: {}",
        if r.lost == 0 {
            "OK, nothing lost"
        } else {
            "LOST MESSAGES"
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_lost_and_duplicated() {
        let r = compare(
            &v(&["r-1", "r-2", "r-3", "r-4"]),
            &v(&["r-1", "r-2", "r-2", "r-4", "r-4", "r-4", "x-9", "-"]),
        );
        assert_eq!(r.lost, 1);
        assert_eq!(r.lost_examples, vec!["r-3"]);
        assert_eq!(r.duplicated, 2);
        assert_eq!(r.duplicate_copies, 3);
        assert_eq!(
            r.duplicated_examples,
            vec![("r-4".to_string(), 3), ("r-2".to_string(), 2)]
        );
        assert_eq!(r.unacked_received, 1);
        assert_eq!(r.received_without_id, 1);
        assert_eq!(r.received, 7);
    }

    #[test]
    fn message_id_form_matches() {
        let r = compare(&v(&["ab12-7"]), &v(&["<ab12-7@sluice-load.test>"]));
        assert_eq!((r.lost, r.duplicated), (0, 0));
    }

    #[test]
    fn clean_run() {
        let r = compare(&v(&["a", "b"]), &v(&["b", "a"]));
        assert_eq!((r.lost, r.duplicated, r.unacked_received), (0, 0, 0));
        assert!(render_text(&r).contains("OK, nothing lost"));
    }
}
