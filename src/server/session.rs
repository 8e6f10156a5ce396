//! The session driver: socket <-> sans-IO [`Session`], on one shard.
//!
//! Thin on purpose: read into a fixed buffer, feed the session, answer its
//! events (relay decision, durable store), write all pending replies in one
//! write once the input is consumed, and wake for the session's timers, the
//! total session deadline and shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use futures_lite::future;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use super::api::{
    BodyType, Envelope, Event, ForwardPath, IncomingMessage, MailFrom, PeerInfo, RcptTo, Recipient,
    RecipientState, Ret, ReversePath, Session, SpoolId, Stage,
};
use super::buffers::{read_pooled, Loan};
use super::date;
use super::shard::ShardCtx;
use crate::smtp::{EnhancedCode, Reply};

/// The reply buffer keeps at most this capacity between writes.
const OUT_KEEP: usize = 16 * 1024;

/// What woke the driver while it waited for input.
enum Wake<'a> {
    Read(std::io::Result<(Loan<'a>, usize)>),
    Timer,
    Shutdown,
    /// The shutdown grace period is over.
    Cut,
}

/// Runs one SMTP session to completion; the caller holds the connection
/// permit for as long as this future lives.
pub(crate) async fn drive(mut stream: TcpStream, peer: SocketAddr, ctx: Rc<ShardCtx>) {
    let started = Instant::now();
    let deadline = started + ctx.session_timeout;
    let mut session = Session::new(
        std::sync::Arc::clone(&ctx.session_config),
        PeerInfo {
            addr: peer,
            starttls_available: false,
            auth_mechanisms: Vec::new(),
            tls_active: false,
        },
        started,
    );
    // No read buffer of our own: one is lent by the shard's pool while input
    // is processed (see `buffers`), so an idle session costs little.
    let mut out = Vec::new();
    let mut shutdown_seen = false;
    let mut eof = false;

    loop {
        if !shutdown_seen && ctx.is_shutting_down() {
            shutdown_seen = true;
            session.shutdown(Instant::now());
        }
        drain_events(&mut session, &mut stream, &mut out, &ctx, peer).await;
        if session.has_output() {
            session.write_output(&mut out);
        }
        if !out.is_empty() {
            if !write_all(&mut stream, &out, deadline).await {
                break;
            }
            out.clear();
            if out.capacity() > OUT_KEEP {
                // A long pipelined batch grew it; do not keep that per session.
                out = Vec::new();
            }
        }
        if session.is_closed() || eof {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            ctx.metrics.sessions_timed_out.increment(1);
            tracing::info!("session time limit reached");
            let line = format!(
                "421 4.4.2 {} Session time limit exceeded, closing connection\r\n",
                ctx.hostname
            );
            write_all(&mut stream, line.as_bytes(), deadline + ctx.session_timeout).await;
            break;
        }
        let wake_at = session.poll_timeout().map_or(deadline, |t| t.min(deadline));
        let wake = {
            let read = async { Wake::Read(read_pooled(&mut stream, &ctx.buffers).await) };
            let timer = async {
                glommio::timer::sleep(wake_at.saturating_duration_since(Instant::now())).await;
                Wake::Timer
            };
            // Only an idle session is woken for shutdown (it is told 421 at
            // once); one inside a transaction learns of it at its next wake-up.
            let wake_for_stop = !shutdown_seen && !session.in_transaction();
            let stop = async {
                if !wake_for_stop {
                    future::pending::<()>().await;
                }
                // Closed at shutdown: acquire then fails and wakes everyone.
                let _ = ctx.shutdown.acquire(1).await;
                Wake::Shutdown
            };
            let cut = async {
                // Closed when the grace period ends; never signalled.
                let _ = ctx.cut.acquire(1).await;
                Wake::Cut
            };
            future::or(read, future::or(timer, future::or(stop, cut))).await
        };
        match &wake {
            Wake::Read(r) => tracing::trace!(read = ?r.as_ref().map(|(_, n)| *n), "woke: read"),
            Wake::Timer => tracing::trace!("woke: timer"),
            Wake::Shutdown => tracing::trace!("woke: shutdown"),
            Wake::Cut => tracing::trace!("woke: grace period over"),
        }
        match wake {
            Wake::Read(Ok((_, 0))) | Wake::Read(Err(_)) => {
                session.handle_eof(Instant::now());
                eof = true;
            }
            Wake::Read(Ok((buf, n))) => {
                ctx.metrics.bytes_received.increment(n as u64);
                feed(&mut session, &mut stream, &mut out, &ctx, peer, &buf[..n]).await;
            }
            Wake::Timer => {
                let now = Instant::now();
                if session.poll_timeout().is_some_and(|t| t <= now) {
                    session.handle_timeout(now);
                }
            }
            Wake::Shutdown => {}
            Wake::Cut => {
                // RFC 5321 3.8: say so before closing. The transaction is
                // lost to the client (no 250), so it retries.
                let line = format!(
                    "421 4.3.2 {} Service shutting down, closing transmission channel\r\n",
                    ctx.hostname
                );
                write_all(
                    &mut stream,
                    line.as_bytes(),
                    Instant::now() + super::shard::CUT_WRITE,
                )
                .await;
                let _ = stream.close().await;
                return;
            }
        }
    }
    // One final pass so replies queued by EOF/timeout handling get out.
    drain_events(&mut session, &mut stream, &mut out, &ctx, peer).await;
    session.write_output(&mut out);
    if !out.is_empty() {
        write_all(
            &mut stream,
            &out,
            Instant::now() + ctx.session_config.command_timeout,
        )
        .await;
    }
    let _ = stream.close().await;
}

/// Feeds `input` until the session has consumed all of it, answering events
/// as they come (the session stops consuming while an event awaits us).
async fn feed(
    session: &mut Session,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    ctx: &Rc<ShardCtx>,
    peer: SocketAddr,
    mut input: &[u8],
) {
    while !input.is_empty() {
        let n = session.handle_input(Instant::now(), input);
        input = &input[n..];
        let answered = drain_events(session, stream, out, ctx, peer).await;
        if session.is_closed() || (n == 0 && !answered) {
            // Closed, or nothing more will be taken: drop the rest.
            break;
        }
    }
}

/// Answers every pending event; returns whether there were any.
async fn drain_events(
    session: &mut Session,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    ctx: &Rc<ShardCtx>,
    peer: SocketAddr,
) -> bool {
    let mut any = false;
    while let Some(event) = session.poll_event() {
        any = true;
        match event {
            Event::CheckRecipient { recipient, .. } => {
                let verdict = relay_verdict(ctx, peer, &recipient);
                session.answer_recipient(Instant::now(), verdict);
            }
            Event::Message(msg) => {
                tracing::trace!("event: message");
                // Replies to the pipelined commands before DATA go out before
                // we block on storage.
                session.write_output(out);
                if !out.is_empty() {
                    let deadline = Instant::now() + ctx.session_config.command_timeout;
                    if write_all(stream, out, deadline).await {
                        out.clear();
                    }
                }
                let verdict = store(ctx, &msg).await;
                tracing::trace!(ok = verdict.is_ok(), "stored");
                session.answer_message(Instant::now(), verdict);
            }
            Event::StartTls => {
                // Never advertised by this driver (TLS is a later issue).
                session.answer_starttls(Instant::now(), false);
            }
            Event::Rejected { stage, code } => ctx.metrics.rejection(stage_label(stage), code),
        }
    }
    any
}

/// Relay policy: by client IP only. The recipient is stored exactly as
/// given, so address tricks (`u%evil@ok`, `"u@evil"@ok`, source routes) never
/// change where mail goes.
fn relay_verdict(ctx: &ShardCtx, peer: SocketAddr, _recipient: &RcptTo) -> Result<(), Reply> {
    if ctx.relay.allows(peer.ip()) {
        ctx.metrics.recipients_accepted.increment(1);
        Ok(())
    } else {
        ctx.metrics.relay_denied.increment(1);
        Err(Reply::new(
            554,
            EnhancedCode::new(5, 7, 1),
            "Relay access denied",
        ))
    }
}

/// Prepends `Received:`, stores durably, and names the queue id - or answers
/// 452 4.3.1 so a failed write is never acknowledged.
async fn store(ctx: &Rc<ShardCtx>, msg: &IncomingMessage) -> Result<String, Reply> {
    let started = Instant::now();
    let now = SystemTime::now();
    let now_ms = date::unix_ms(now);
    let id = ctx.ids.borrow_mut().next(now_ms);
    let id_text = id.to_string();
    let received = msg.received_header(&ctx.hostname, &id_text, &date::rfc5322(now));
    // The trace header goes in front of the body as the spool writes it:
    // no copy of the body here.
    let size = received.len() + msg.body.len();
    let envelope = envelope(id, msg, now_ms, size as u64, &ctx.hostname);
    match ctx
        .partition
        .store_parts(&envelope, &[received.as_bytes(), &msg.body])
        .await
    {
        Ok(()) => {
            ctx.metrics.messages_accepted.increment(1);
            ctx.metrics.message_size.record(size as f64);
            ctx.metrics
                .store_latency
                .record(started.elapsed().as_secs_f64());
            tracing::info!(id = %id_text, size, rcpts = envelope.recipients.len(), "queued");
            ctx.delivery.accepted(ctx.partition.shard(), &envelope);
            Ok(id_text)
        }
        Err(e) => {
            ctx.metrics.messages_spool_failed.increment(1);
            tracing::warn!(error = %e, "spool write failed; answered 452");
            Err(e.reply())
        }
    }
}

/// The spool's view of an accepted message. Addresses are stored exactly as
/// the client gave them (no `%`, `!` or source-route interpretation).
fn envelope(id: SpoolId, msg: &IncomingMessage, now_ms: u64, size: u64, host: &str) -> Envelope {
    let mail: &MailFrom = &msg.mail;
    Envelope {
        id,
        sender: match &mail.from {
            ReversePath::Null => String::new(),
            ReversePath::Address(a) => a.to_string(),
        },
        recipients: msg
            .recipients
            .iter()
            .map(|r: &RcptTo| Recipient {
                address: match &r.to {
                    ForwardPath::Address(a) => a.to_string(),
                    // RFC 5321 4.5.1: <Postmaster> means ours.
                    ForwardPath::Postmaster => format!("postmaster@{host}"),
                },
                notify: r.notify.map(|n| n.to_string()),
                orcpt: r
                    .orcpt
                    .as_ref()
                    .map(|o| format!("{};{}", o.addr_type, o.address)),
                state: RecipientState::Pending,
                remote_mta: None,
            })
            .collect(),
        received_at_ms: now_ms,
        size,
        body_8bit: matches!(
            mail.body,
            Some(BodyType::EightBitMime | BodyType::BinaryMime)
        ),
        smtputf8: mail.smtputf8,
        ret_full: mail.ret.map(|r| matches!(r, Ret::Full)),
        envid: mail.envid.clone(),
        client_ip: Some(msg.peer.ip().to_string()),
        helo: Some(msg.helo.clone()),
    }
}

fn stage_label(stage: Stage) -> &'static str {
    stage.as_str()
}

/// Writes everything unless the client stops reading past `deadline`.
async fn write_all(stream: &mut TcpStream, bytes: &[u8], deadline: Instant) -> bool {
    let write = async { stream.write_all(bytes).await.is_ok() };
    let timer = async {
        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
        false
    };
    future::or(write, timer).await
}
