//! The queue listing shared by `GET /queue` and `sluice queue`.
//!
//! Format (text, tab-separated):
//!
//! ```text
//! count N
//! ID<TAB>SIZE<TAB>SENDER<TAB>RCPT[ RCPT...]          one line per message
//! <TAB>RCPT<TAB>STATE[<TAB>detail...]                 one line per recipient
//! queue<TAB>ready=R<TAB>scheduled=S<TAB>connections=C (running server only)
//! domain<TAB>DOMAIN<TAB>ready=R<TAB>scheduled=S[<TAB>held_until=TIME]
//! ```
//!
//! Sender `<>` is the null reverse-path. Recipient states: `pending`,
//! `deferred` with `attempts=N`, `next=TIME` and `last=REPLY`, `delivered`
//! and `failed` with `reply=REPLY` (and `remote=HOST` when a remote server
//! answered). Times are UTC ISO 8601. The `queue` and `domain` lines come from
//! the shards' in-memory queues (published once a second), so they appear
//! only when a running server answers.

use std::time::{Duration, UNIX_EPOCH};

use super::api::{RecipientState, Spool};
use crate::delivery::engine::QueueSnapshot;
use crate::delivery::log::iso8601;

fn time(ms: u64) -> String {
    iso8601(UNIX_EPOCH + Duration::from_millis(ms))
}

/// A reply kept on one line of the listing.
fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
        .replace('\t', " ")
}

/// Renders at most `limit` spooled messages, then (when a running server
/// passes its snapshot) the queue and per-domain counts.
pub fn render(
    spool: &Spool,
    limit: usize,
    snapshot: Option<&QueueSnapshot>,
) -> Result<String, String> {
    let list = spool.list(limit).map_err(|e| e.to_string())?;
    // Under delivery the spool changes between two scans: when the listing
    // is complete, its length is the count, so the two always agree.
    let count = if list.len() < limit {
        list.len() as u64
    } else {
        spool.count().map_err(|e| e.to_string())?
    };
    let mut out = format!("count {count}\n");
    for env in list {
        let sender = if env.sender.is_empty() {
            "<>"
        } else {
            env.sender.as_str()
        };
        let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            env.id,
            env.size,
            sender,
            rcpts.join(" ")
        ));
        for r in &env.recipients {
            let remote = r
                .remote_mta
                .as_deref()
                .map(|h| format!("\tremote={h}"))
                .unwrap_or_default();
            let state = match &r.state {
                RecipientState::Pending => "pending".to_owned(),
                RecipientState::Deferred {
                    attempts,
                    last_reply,
                    next_attempt_ms,
                } => format!(
                    "deferred\tattempts={attempts}\tnext={}\tlast={}{remote}",
                    time(*next_attempt_ms),
                    one_line(last_reply)
                ),
                RecipientState::Delivered { at_ms, reply } => format!(
                    "delivered\tat={}\treply={}{remote}",
                    time(*at_ms),
                    one_line(reply)
                ),
                RecipientState::Failed { at_ms, reply } => format!(
                    "failed\tat={}\treply={}{remote}",
                    time(*at_ms),
                    one_line(reply)
                ),
            };
            out.push_str(&format!("\t{}\t{state}\n", r.address));
        }
    }
    if let Some(snapshot) = snapshot {
        let shards = snapshot.lock().map_err(|_| "queue snapshot poisoned")?;
        let (ready, scheduled, connections) = shards.iter().fold((0, 0, 0), |a, s| {
            (a.0 + s.ready, a.1 + s.scheduled, a.2 + s.connections)
        });
        out.push_str(&format!(
            "queue\tready={ready}\tscheduled={scheduled}\tconnections={connections}\n"
        ));
        let mut domains: Vec<_> = shards.iter().flat_map(|s| s.domains.iter()).collect();
        domains.sort_by(|a, b| {
            (b.ready + b.scheduled)
                .cmp(&(a.ready + a.scheduled))
                .then_with(|| a.domain.cmp(&b.domain))
        });
        for d in domains {
            let held = d
                .held_until_ms
                .map(|t| format!("\theld_until={}", time(t)))
                .unwrap_or_default();
            out.push_str(&format!(
                "domain\t{}\tready={}\tscheduled={}{held}\n",
                d.domain, d.ready, d.scheduled
            ));
        }
    }
    Ok(out)
}

/// `sluice queue` when no server runs: opens the spool directly.
pub fn render_offline(path: &std::path::Path, limit: usize) -> Result<String, String> {
    // Opening would create an empty spool: a mistyped path (or the wrong
    // working directory) would then read as "count 0" and leave a stray
    // spool behind. A listing never creates anything.
    if !path.exists() {
        return Err(format!(
            "no spool at {} (and no running server answered on the metrics address)",
            path.display()
        ));
    }
    let spool =
        Spool::open(path).map_err(|e| format!("cannot open spool at {}: {e}", path.display()))?;
    render(&spool, limit, None)
}
