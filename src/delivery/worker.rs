//! Connection tasks: one outbound SMTP connection each, on the shard that
//! owns the destination domain.
//!
//! A task resolves the destination (route or MX, cached by TTL), connects
//! to its targets in order until one greets and answers EHLO/HELO (a refused
//! connection or a 4xx/5xx greeting moves on to the next), then delivers
//! ready entries of its domain one after another over the same session
//! (the client core sends RSET between transactions when needed), waits up
//! to `idle_timeout` for more, and QUITs. The driver is thin: it moves bytes
//! between the socket and the sans-IO [`ClientSession`] and turns its
//! per-recipient results into outcomes.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures_lite::future;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::Instrument;

use super::accounting::RemoteMta;
use super::engine::{now_ms, ConnectionGuard, Dest, Engine, Outcome};
use super::log::BounceReason;
use super::plan::RcptResult;
use super::queue::QueueEntry;
use super::route::{Destination, Target};
use crate::smtp::address::{Address, ForwardPath, ReversePath};
use crate::smtp::client::{ClientEvent, ClientSession, OutgoingMessage, SessionClosed};
use crate::smtp::command::{BodyType, Notify, Orcpt, RcptTo, Ret};
use crate::smtp::{EnhancedCode, Reply};
use crate::spool::RecipientState;

/// Octets read from the socket at a time (replies are small).
const READ_BUFFER: usize = 16 * 1024;
/// Octets gathered from the session before one socket write.
const WRITE_BATCH: usize = 256 * 1024;

/// The life of one connection task; see the module documentation.
pub(super) async fn connection(guard: ConnectionGuard) {
    let engine = Rc::clone(&guard.engine);
    let dest = Rc::clone(&guard.dest);
    let destination = match resolve(&engine, &dest).await {
        Ok(d) => d,
        Err(e) => {
            guard.started();
            engine.dns_failure(&dest, &e);
            return;
        }
    };
    if engine.stopping() || engine.ready_len(&dest.domain) == 0 {
        return;
    }
    let mut failures: Vec<String> = Vec::new();
    let mut conn = None;
    for target in &destination.targets {
        match Connection::open(&engine, target.clone()).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(why) => failures.push(why),
        }
        if engine.stopping() {
            return;
        }
    }
    guard.started();
    let Some(mut conn) = conn else {
        let reply = Reply::new(
            451,
            EnhancedCode::new(4, 4, 1),
            format!(
                "No host of {} could be reached: {}",
                dest.domain,
                failures.join("; ")
            ),
        );
        engine.destination_unreachable(&dest, &reply);
        return;
    };
    dest.failures.set(0);
    engine.metrics.connections_opened.increment(1);
    engine.metrics.connections_open.increment(1.0);
    let sent = conn.serve(&engine, &dest).await;
    engine.metrics.messages_per_connection.record(sent as f64);
    engine.metrics.connections_open.decrement(1.0);
    drop(guard);
}

/// The routing answer for `dest`, reused until its TTL runs out.
async fn resolve(engine: &Engine, dest: &Dest) -> Result<Destination, super::dns::DnsError> {
    if let Some(d) = dest.resolved.borrow().as_ref() {
        if d.valid_until > Instant::now() {
            return Ok(d.clone());
        }
    }
    let d = engine
        .routes
        .destination(&dest.domain, &engine.resolver)
        .await?;
    *dest.resolved.borrow_mut() = Some(d.clone());
    Ok(d)
}

/// What [`Connection::next_event`] found.
enum Next {
    Event(ClientEvent),
    /// The session waits for nothing (idle): no event will come by itself.
    Idle,
}

/// What ended an idle wait.
enum IdleEnd {
    Work,
    Timeout,
    Shutdown,
    /// The server closed the connection (or said 421) while idle.
    Closed,
}

struct Connection {
    stream: TcpStream,
    session: ClientSession,
    target: Target,
    read_buf: Vec<u8>,
    out: Vec<u8>,
}

impl Connection {
    /// Connects to `target` and runs the session to `Ready`. On failure,
    /// says why in one line (for the deferral reply).
    async fn open(engine: &Engine, target: Target) -> Result<Connection, String> {
        let timeout = engine.config.delivery.connect_timeout();
        let name = format!("{} [{}]", target.host_name, target.addr);
        let stream = match TcpStream::connect_timeout(target.addr, timeout).await {
            Ok(s) => s,
            Err(e) => {
                let reason = match &e {
                    glommio::GlommioError::IoError(io)
                        if io.kind() == std::io::ErrorKind::ConnectionRefused =>
                    {
                        "refused"
                    }
                    glommio::GlommioError::IoError(io)
                        if io.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        "timeout"
                    }
                    _ => "error",
                };
                engine.metrics.connect_failure(reason);
                tracing::debug!(host = %name, error = %e, "connect failed");
                return Err(format!("connect to {name}: {e}"));
            }
        };
        let _ = stream.set_nodelay(true);
        let mut conn = Connection {
            stream,
            session: ClientSession::new(Arc::clone(&engine.client_config), Instant::now()),
            target,
            read_buf: vec![0u8; READ_BUFFER],
            out: Vec::with_capacity(8 * 1024),
        };
        loop {
            match conn.next_event().await {
                Next::Event(ClientEvent::Ready) => return Ok(conn),
                Next::Event(ClientEvent::StartTls) => {
                    // Not enabled in the client config yet (TLS is its own
                    // issue); refuse so the session goes on in plain text.
                    conn.session.answer_starttls(Instant::now(), false);
                }
                Next::Event(ClientEvent::Closed { reason, .. }) => {
                    conn.close().await;
                    engine.metrics.connect_failure("greeting");
                    tracing::debug!(host = %name, %reason, "host refused the session");
                    return Err(format!("{name} {reason}"));
                }
                Next::Event(ClientEvent::TransactionDone(_)) => {}
                Next::Idle => {
                    conn.close().await;
                    return Err(format!("{name}: session ended before it was ready"));
                }
            }
        }
    }

    /// Moves bytes until the session has an event (or waits for nothing).
    async fn next_event(&mut self) -> Next {
        loop {
            if let Some(ev) = self.session.poll_event() {
                return Next::Event(ev);
            }
            if self.session.has_output() {
                self.out.clear();
                while self.session.has_output() && self.out.len() < WRITE_BATCH {
                    self.session.write_output(Instant::now(), &mut self.out);
                }
                let deadline = self.session.poll_timeout();
                let write = async { Some(self.stream.write_all(&self.out).await.is_ok()) };
                let timer = async {
                    match deadline {
                        Some(d) => {
                            glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await
                        }
                        None => future::pending::<()>().await,
                    }
                    None
                };
                match future::or(write, timer).await {
                    Some(true) => {}
                    Some(false) => self.session.handle_eof(Instant::now()),
                    None => self.session.handle_timeout(Instant::now()),
                }
                continue;
            }
            let Some(deadline) = self.session.poll_timeout() else {
                return Next::Idle;
            };
            let read = async { Some(self.stream.read(&mut self.read_buf).await) };
            let timer = async {
                glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
                None
            };
            match future::or(read, timer).await {
                Some(Ok(0)) | Some(Err(_)) => self.session.handle_eof(Instant::now()),
                Some(Ok(n)) => self
                    .session
                    .handle_input(Instant::now(), &self.read_buf[..n]),
                None => self.session.handle_timeout(Instant::now()),
            }
        }
    }

    /// Writes what the session still holds (a QUIT, maybe), briefly, and
    /// closes the socket.
    async fn close(&mut self) {
        if self.session.has_output() {
            self.out.clear();
            while self.session.has_output() && self.out.len() < WRITE_BATCH {
                self.session.write_output(Instant::now(), &mut self.out);
            }
            let _ = future::or(
                async {
                    let _ = self.stream.write_all(&self.out).await;
                },
                glommio::timer::sleep(std::time::Duration::from_secs(1)),
            )
            .await;
        }
        let _ = self.stream.close().await;
    }

    /// QUIT, wait for the reply (bounded by the session's timeout), close.
    async fn quit(&mut self) {
        self.session.quit(Instant::now());
        loop {
            match self.next_event().await {
                Next::Event(ClientEvent::Closed { .. }) | Next::Idle => break,
                Next::Event(_) => {}
            }
        }
        self.close().await;
    }

    /// Delivers ready entries of `dest` until there is no more work within
    /// the idle time, the per-connection limit is reached, the server goes
    /// away, or the shard stops. Returns the number of messages tried.
    async fn serve(&mut self, engine: &Rc<Engine>, dest: &Dest) -> usize {
        let max = engine.config.delivery.max_messages_per_connection;
        let idle_timeout = engine.config.delivery.idle_timeout();
        let mut sent = 0;
        // The idle time counts from the last transaction, so wake-ups that
        // find no work (another connection took it) do not extend it.
        let mut last_work = Instant::now();
        loop {
            if engine.stopping() || sent >= max {
                break;
            }
            let entry = match engine.pop_ready(&dest.domain) {
                Some(e) => e,
                None => match self.idle(engine, dest, last_work + idle_timeout).await {
                    IdleEnd::Work => continue,
                    IdleEnd::Timeout | IdleEnd::Shutdown => break,
                    IdleEnd::Closed => {
                        self.close().await;
                        return sent;
                    }
                },
            };
            sent += 1;
            let span = tracing::info_span!(
                "delivery",
                id = %entry.id,
                domain = %entry.domain,
                host = %self.target.host_name,
                addr = %self.target.addr,
                attempt = entry.attempts + 1,
            );
            let usable = self.deliver(engine, entry).instrument(span).await;
            last_work = Instant::now();
            if !usable {
                self.close().await;
                return sent;
            }
        }
        self.quit().await;
        sent
    }

    /// Waits for ready work, the idle deadline or shutdown, while watching
    /// the socket (a server may close an idle connection, or say 421).
    async fn idle(&mut self, engine: &Engine, dest: &Dest, until: Instant) -> IdleEnd {
        dest.idle.set(dest.idle.get() + 1);
        let end = loop {
            if engine.ready_len(&dest.domain) > 0 {
                break IdleEnd::Work;
            }
            if engine.stopping() {
                break IdleEnd::Shutdown;
            }
            let now = Instant::now();
            if now >= until {
                break IdleEnd::Timeout;
            }
            enum Wake {
                Read(std::io::Result<usize>),
                Look,
            }
            let wake = {
                let read = async { Wake::Read(self.stream.read(&mut self.read_buf).await) };
                let work = async {
                    dest.work.notified().await;
                    Wake::Look
                };
                let stop = async {
                    engine.shutdown.notified().await;
                    Wake::Look
                };
                let timer = async {
                    glommio::timer::sleep(until - now).await;
                    Wake::Look
                };
                future::or(read, future::or(work, future::or(stop, timer))).await
            };
            if let Wake::Read(r) = wake {
                match r {
                    Ok(0) | Err(_) => self.session.handle_eof(Instant::now()),
                    Ok(n) => self
                        .session
                        .handle_input(Instant::now(), &self.read_buf[..n]),
                }
                if self.session.is_closed() {
                    while self.session.poll_event().is_some() {}
                    break IdleEnd::Closed;
                }
            }
        };
        dest.idle.set(dest.idle.get().saturating_sub(1));
        end
    }

    /// One transaction for `entry`. Returns whether the connection can carry
    /// another.
    async fn deliver(&mut self, engine: &Rc<Engine>, entry: QueueEntry) -> bool {
        let started = Instant::now();
        let mut results: Vec<RcptResult> = Vec::new();
        let local_error = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "{what}");
            Reply::new(
                451,
                EnhancedCode::new(4, 3, 0),
                format!("Local error reading the spool: {what}"),
            )
        };
        let loaded = engine.reader(entry.partition).and_then(|r| {
            let env = r.load_envelope(entry.id)?;
            let body = r.load_body(entry.id)?;
            Ok((env, body))
        });
        let (env, body) = match loaded {
            Ok((Some(env), Some(body))) => (env, body),
            Ok((None, _)) => {
                // Completed meanwhile (a repeated entry after a restart).
                tracing::debug!("message no longer in the spool");
                return true;
            }
            Ok((Some(_), None)) => {
                let reply = local_error("envelope without body", &entry.id);
                engine.temporary_failure(&entry, entry.rcpts.clone(), &reply, None, &mut results);
                engine.report(outcome(&entry, results));
                return true;
            }
            Err(e) => {
                let reply = local_error("cannot read message", &e);
                engine.temporary_failure(&entry, entry.rcpts.clone(), &reply, None, &mut results);
                engine.report(outcome(&entry, results));
                return true;
            }
        };

        let mut indexes = Vec::with_capacity(entry.rcpts.len());
        let mut rcpts = Vec::with_capacity(entry.rcpts.len());
        let mut unparsable = Vec::new();
        for &i in &entry.rcpts {
            let Some(r) = env.recipients.get(usize::from(i)) else {
                continue;
            };
            if r.state.is_final() {
                // Never send a delivered recipient twice.
                continue;
            }
            match Address::parse(&r.address) {
                Ok(a) => {
                    rcpts.push(RcptTo {
                        to: ForwardPath::Address(a),
                        notify: r.notify.as_deref().and_then(parse_notify),
                        orcpt: r.orcpt.as_deref().and_then(parse_orcpt),
                    });
                    indexes.push(i);
                }
                Err(_) => unparsable.push(i),
            }
        }
        let bad_rcpt = Reply::new(
            553,
            EnhancedCode::new(5, 1, 3),
            "Bad recipient address syntax",
        );
        engine.permanent_failure(
            &entry,
            &unparsable,
            &bad_rcpt,
            None,
            BounceReason::Local,
            &mut results,
        );
        let sender = if env.sender.is_empty() {
            Some(ReversePath::Null)
        } else {
            Address::parse(&env.sender).ok().map(ReversePath::Address)
        };
        let Some(sender) = sender else {
            let bad = Reply::new(553, EnhancedCode::new(5, 1, 7), "Bad sender address syntax");
            engine.permanent_failure(
                &entry,
                &indexes,
                &bad,
                None,
                BounceReason::Local,
                &mut results,
            );
            engine.report(outcome(&entry, results));
            return true;
        };
        if rcpts.is_empty() {
            engine.report(outcome(&entry, results));
            return true;
        }
        let message = OutgoingMessage {
            sender,
            recipients: rcpts,
            body,
            body_type: env.body_8bit.then_some(BodyType::EightBitMime),
            smtputf8: env.smtputf8,
            ret: env
                .ret_full
                .map(|full| if full { Ret::Full } else { Ret::Headers }),
            envid: env.envid.clone(),
        };
        if let Err(SessionClosed(_)) = self.session.send_message(Instant::now(), message) {
            engine.requeue_untried(entry);
            return false;
        }
        let done = loop {
            match self.next_event().await {
                Next::Event(ClientEvent::TransactionDone(r)) => break r,
                Next::Event(ClientEvent::Closed { reason, unsent }) => {
                    if unsent.is_empty() {
                        // Cannot happen (a started transaction ends with
                        // TransactionDone first); be safe: defer.
                        let reply = reason.reply.unwrap_or_else(|| {
                            Reply::new(421, EnhancedCode::new(4, 4, 2), "Connection closed")
                        });
                        engine.temporary_failure(&entry, indexes, &reply, None, &mut results);
                        engine.report(outcome(&entry, results));
                    } else {
                        engine.requeue_untried(entry);
                    }
                    return false;
                }
                Next::Event(ClientEvent::StartTls) => {
                    self.session.answer_starttls(Instant::now(), false)
                }
                Next::Event(ClientEvent::Ready) => {}
                Next::Idle => {
                    let reply = Reply::new(
                        421,
                        EnhancedCode::new(4, 4, 2),
                        "Session ended unexpectedly",
                    );
                    engine.temporary_failure(&entry, indexes, &reply, None, &mut results);
                    engine.report(outcome(&entry, results));
                    return false;
                }
            }
        };
        engine
            .metrics
            .attempt_seconds
            .record(started.elapsed().as_secs_f64());

        let host = self.target.host_name.clone();
        let reuse =
            u32::try_from(self.session.transactions().saturating_sub(1)).unwrap_or(u32::MAX);
        let now = now_ms();
        let mut delivered = 0u64;
        // Recipients that failed the same way share one entry (and one
        // backoff); usually all of them share one reply.
        let mut transient: Vec<(Reply, bool, Vec<u16>)> = Vec::new();
        let mut permanent: Vec<(Reply, bool, Vec<u16>)> = Vec::new();
        for (&index, r) in indexes.iter().zip(done.recipients.iter()) {
            if r.is_delivered() {
                delivered += 1;
                results.push(RcptResult {
                    index,
                    state: RecipientState::Delivered {
                        at_ms: now,
                        reply: r.reply.to_string(),
                    },
                    remote_mta: Some(host.clone()),
                });
                engine.log.delivery(
                    &entry,
                    &env.recipients[usize::from(index)].address,
                    &r.reply,
                    &host,
                    Some(self.target.addr.ip()),
                    reuse,
                );
                continue;
            }
            let list = if r.is_permanent() {
                &mut permanent
            } else {
                &mut transient
            };
            match list.iter_mut().find(|(reply, _, _)| *reply == r.reply) {
                Some((_, _, v)) => v.push(index),
                None => list.push((r.reply.clone(), r.remote, vec![index])),
            }
        }
        if delivered > 0 {
            engine
                .metrics
                .outcome(super::metrics::OutcomeKind::Delivered, 250, true, delivered);
            engine
                .metrics
                .queue_time
                .record(now.saturating_sub(entry.received_at_ms) as f64 / 1000.0);
        }
        let first_reply = done
            .recipients
            .first()
            .map(|r| r.reply.to_string())
            .unwrap_or_default();
        let (n_perm, n_temp) = (
            permanent.iter().map(|p| p.2.len()).sum::<usize>(),
            transient.iter().map(|p| p.2.len()).sum::<usize>(),
        );
        let mta_of = |remote: bool| {
            remote.then(|| RemoteMta {
                host: host.clone(),
                ip: self.target.addr.ip(),
            })
        };
        for (reply, remote, rcpts) in permanent {
            let mta = mta_of(remote);
            let reason = if remote {
                BounceReason::Remote
            } else {
                BounceReason::Local
            };
            engine.permanent_failure(&entry, &rcpts, &reply, mta, reason, &mut results);
        }
        for (reply, remote, rcpts) in transient {
            engine.temporary_failure(&entry, rcpts, &reply, mta_of(remote), &mut results);
        }
        tracing::info!(
            delivered,
            failed = n_perm,
            deferred = n_temp,
            reply = %first_reply,
            secs = started.elapsed().as_secs_f64(),
            "delivery attempt"
        );
        engine.report(outcome(&entry, results));
        !self.session.is_closed()
    }
}

fn outcome(entry: &QueueEntry, results: Vec<RcptResult>) -> Outcome {
    Outcome {
        id: entry.id,
        partition: entry.partition,
        results,
    }
}

/// The stored NOTIFY text back to its typed form (what the server stored
/// came from its own parser, so anything else is ignored).
fn parse_notify(text: &str) -> Option<Notify> {
    let mut n = Notify::default();
    for item in text.split(',') {
        match item.trim().to_ascii_uppercase().as_str() {
            "NEVER" => n.never = true,
            "SUCCESS" => n.success = true,
            "FAILURE" => n.failure = true,
            "DELAY" => n.delay = true,
            _ => return None,
        }
    }
    (!n.never || !(n.success || n.failure || n.delay)).then_some(n)
}

/// The stored ORCPT (`addr-type;address`, xtext-decoded) to its typed form.
fn parse_orcpt(text: &str) -> Option<Orcpt> {
    let (addr_type, address) = text.split_once(';')?;
    Some(Orcpt {
        addr_type: addr_type.to_owned(),
        address: address.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_dsn_parameters_round_trip() {
        for text in ["NEVER", "SUCCESS", "FAILURE,DELAY", "SUCCESS,FAILURE,DELAY"] {
            assert_eq!(parse_notify(text).unwrap().to_string(), text);
        }
        assert!(parse_notify("NEVER,SUCCESS").is_none());
        assert!(parse_notify("bogus").is_none());
        let o = parse_orcpt("rfc822;a@b.test").unwrap();
        assert_eq!(
            (o.addr_type.as_str(), o.address.as_str()),
            ("rfc822", "a@b.test")
        );
        assert!(parse_orcpt("nosemicolon").is_none());
    }
}
