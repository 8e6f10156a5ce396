//! The queue listing shared by `GET /queue` and `sluice queue`.
//!
//! Format (text, one message per line after the count):
//! `count N` then `ID<TAB>SIZE<TAB>SENDER<TAB>RCPT[ RCPT...]`, sender `<>`
//! for the null reverse-path.

use super::api::Spool;

/// Renders at most `limit` spooled messages.
pub fn render(spool: &Spool, limit: usize) -> Result<String, String> {
    let count = spool.count().map_err(|e| e.to_string())?;
    let list = spool.list(limit).map_err(|e| e.to_string())?;
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
    }
    Ok(out)
}

/// `sluice queue` when no server runs: opens the spool directly.
pub fn render_offline(path: &std::path::Path, limit: usize) -> Result<String, String> {
    let spool =
        Spool::open(path).map_err(|e| format!("cannot open spool at {}: {e}", path.display()))?;
    render(&spool, limit)
}
