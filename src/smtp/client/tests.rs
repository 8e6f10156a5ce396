//! Client session tests: scripted server replies on a virtual clock.

use super::*;
use crate::smtp::address::{Address, ForwardPath, ReversePath};
use crate::smtp::command::{Notify, Orcpt, RcptTo};
use crate::smtp::reply::EnhancedCode;

const EHLO_ALL: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n\
                        250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 DSN\r\n";
const EHLO_PLAIN: &str = "250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n";
const EHLO_PIPE: &str = "250-mx.test\r\n250 PIPELINING\r\n";
const EHLO_CHUNK: &str = "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n";
const EHLO_CHUNK_LOCKSTEP: &str = "250-mx.test\r\n250 CHUNKING\r\n";

fn rcpt(a: &str) -> RcptTo {
    RcptTo {
        to: ForwardPath::Address(Address::parse(a).unwrap()),
        notify: None,
        orcpt: None,
    }
}

fn msg(from: &str, to: &[&str], body: &str) -> OutgoingMessage {
    let sender = if from.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Address(Address::parse(from).unwrap())
    };
    OutgoingMessage::new(
        sender,
        to.iter().map(|a| rcpt(a)).collect(),
        body.as_bytes().to_vec(),
    )
}

fn config() -> ClientConfig {
    ClientConfig {
        ehlo_name: "relay.test".into(),
        ..ClientConfig::default()
    }
}

/// A driver without sockets: `client()` drains what the session writes,
/// `server()` feeds it replies.
struct Harness {
    s: ClientSession,
    now: Instant,
    start: Instant,
    done: Vec<TransactionResult>,
    closed: Option<(CloseReason, Vec<(TransactionId, OutgoingMessage)>)>,
    ready: usize,
    starttls: usize,
    bytewise: bool,
}

impl Harness {
    fn new(config: ClientConfig) -> Self {
        let now = Instant::now();
        Self {
            s: ClientSession::new(Arc::new(config), now),
            now,
            start: now,
            done: Vec::new(),
            closed: None,
            ready: 0,
            starttls: 0,
            bytewise: false,
        }
    }

    /// Greets and answers EHLO with `ehlo`; returns the harness ready.
    fn ready(config: ClientConfig, ehlo: &str) -> Self {
        let mut h = Self::new(config);
        assert_eq!(h.client(), "");
        h.server("220 mx.test ESMTP\r\n");
        assert_eq!(h.client(), "EHLO relay.test\r\n");
        h.server(ehlo);
        assert_eq!(h.ready, 1, "Ready after EHLO");
        h
    }

    /// Everything the client writes now.
    fn client(&mut self) -> String {
        let mut out = Vec::new();
        let mut calls = 0;
        while self.s.has_output() {
            let n = self.s.write_output(self.now, &mut out);
            assert!(n > 0, "has_output promised bytes");
            calls += 1;
            assert!(calls < 100_000);
        }
        self.collect();
        String::from_utf8(out).unwrap()
    }

    fn server(&mut self, text: &str) {
        if self.bytewise {
            for b in text.as_bytes() {
                self.s.handle_input(self.now, std::slice::from_ref(b));
            }
        } else {
            self.s.handle_input(self.now, text.as_bytes());
        }
        self.collect();
    }

    fn send(&mut self, m: OutgoingMessage) -> TransactionId {
        let id = self.s.send_message(self.now, m).unwrap();
        self.collect();
        id
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.s.handle_timeout(self.now);
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(ev) = self.s.poll_event() {
            match ev {
                ClientEvent::Ready => self.ready += 1,
                ClientEvent::StartTls => self.starttls += 1,
                ClientEvent::TransactionDone(r) => {
                    assert!(self.closed.is_none(), "no result after Closed");
                    assert_eq!(r.recipients.len(), r.message.recipients.len());
                    self.done.push(*r)
                }
                ClientEvent::Closed { reason, unsent } => {
                    assert!(self.closed.is_none(), "Closed once");
                    self.closed = Some((reason, unsent));
                }
            }
        }
    }

    /// (code, enhanced, phase, remote) per recipient of the last transaction.
    fn last(&self) -> Vec<(u16, String, Phase, bool)> {
        let r = self.done.last().expect("a transaction result");
        r.recipients
            .iter()
            .map(|x| {
                (
                    x.reply.code(),
                    x.reply
                        .enhanced()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    x.phase,
                    x.remote,
                )
            })
            .collect()
    }

    fn closed_kind(&self) -> Option<CloseKind> {
        self.closed.as_ref().map(|(r, _)| r.kind)
    }
}

fn r(code: u16, enh: &str, phase: Phase, remote: bool) -> (u16, String, Phase, bool) {
    (code, enh.to_string(), phase, remote)
}

#[test]
fn happy_path_pipelined() {
    let mut h = Harness::ready(config(), EHLO_ALL);
    assert!(h.s.is_idle());
    assert!(h.s.extensions().pipelining && h.s.is_esmtp());
    let body = "Subject: hi\r\n\r\nhello\r\n";
    let id = h.send(msg("a@x.test", &["b@y.test", "c@y.test"], body));
    // RFC 2920: the whole envelope and DATA in one write.
    assert_eq!(
        h.client(),
        format!(
            "MAIL FROM:<a@x.test> SIZE={}\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
            body.len()
        )
    );
    h.server(
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
    );
    assert_eq!(h.client(), format!("{body}.\r\n"));
    assert!(h.done.is_empty());
    h.server("250 2.0.0 Ok: queued as X\r\n");
    assert_eq!(h.done.len(), 1);
    assert_eq!(h.done[0].id, id);
    assert!(h.done[0].remote_dsn);
    assert_eq!(
        h.last(),
        vec![r(250, "2.0.0", Phase::EndOfData, true); 2],
        "both delivered by the final reply"
    );
    assert!(h.s.is_idle());
    assert_eq!(h.s.poll_timeout(), None, "idle: no deadline");
    h.s.quit(h.now);
    assert_eq!(h.client(), "QUIT\r\n");
    h.server("221 2.0.0 Bye\r\n");
    assert_eq!(h.closed_kind(), Some(CloseKind::Quit));
    assert!(h.s.is_closed());
    assert_eq!(h.s.transactions(), 1);
}

#[test]
fn happy_path_lock_step_without_pipelining() {
    let mut h = Harness::ready(config(), EHLO_PLAIN);
    h.send(msg("a@x.test", &["b@y.test", "c@y.test"], "hi\r\n"));
    // One command per round trip.
    assert_eq!(h.client(), "MAIL FROM:<a@x.test>\r\n");
    assert_eq!(h.client(), "");
    h.server("250 2.1.0 Ok\r\n");
    assert_eq!(h.client(), "RCPT TO:<b@y.test>\r\n");
    h.server("250 2.1.5 Ok\r\n");
    assert_eq!(h.client(), "RCPT TO:<c@y.test>\r\n");
    h.server("250 2.1.5 Ok\r\n");
    assert_eq!(h.client(), "DATA\r\n");
    h.server("354 go\r\n");
    assert_eq!(h.client(), "hi\r\n.\r\n");
    h.server("250 2.0.0 Ok\r\n");
    assert_eq!(h.last(), vec![r(250, "2.0.0", Phase::EndOfData, true); 2]);
}

#[test]
fn pipelining_disabled_by_config_is_lock_step() {
    let cfg = ClientConfig {
        use_pipelining: false,
        ..config()
    };
    let mut h = Harness::ready(cfg, EHLO_PIPE);
    h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
    assert_eq!(h.client(), "MAIL FROM:<a@x.test>\r\n");
}

#[test]
fn pipeline_window_bounds_commands_in_flight() {
    let cfg = ClientConfig {
        max_pipelined_commands: 2,
        ..config()
    };
    let mut h = Harness::ready(cfg, EHLO_PIPE);
    h.send(msg(
        "a@x.test",
        &["b@y.test", "c@y.test", "d@y.test"],
        "x\r\n",
    ));
    assert_eq!(h.client(), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
    h.server("250 ok\r\n");
    assert_eq!(h.client(), "RCPT TO:<c@y.test>\r\n");
    h.server("250 ok\r\n250 ok\r\n");
    assert_eq!(h.client(), "RCPT TO:<d@y.test>\r\nDATA\r\n");
    h.server("250 ok\r\n354 go\r\n");
    assert_eq!(h.client(), "x\r\n.\r\n");
    h.server("250 ok\r\n");
    assert_eq!(h.last().len(), 3);
    assert!(h.done[0].recipients.iter().all(|x| x.is_delivered()));
}

#[test]
fn helo_fallback_after_ehlo_refused() {
    for refusal in [
        "500 5.5.1 what?\r\n",
        "502 not implemented\r\n",
        "504 no\r\n",
        "550 no\r\n",
    ] {
        let mut h = Harness::new(config());
        h.server("220 old.test SMTP\r\n");
        assert_eq!(h.client(), "EHLO relay.test\r\n");
        h.server(refusal);
        assert_eq!(h.client(), "HELO relay.test\r\n");
        assert_eq!(h.ready, 0);
        h.server("250 old.test\r\n");
        assert_eq!(h.ready, 1);
        assert!(!h.s.is_esmtp());
        assert_eq!(h.s.extensions(), &Extensions::default());
        // No ESMTP parameters, lock-step.
        let mut m = msg("a@x.test", &["b@y.test"], "hi\r\n");
        m.body_type = Some(BodyType::SevenBit);
        m.ret = Some(Ret::Full);
        h.send(m);
        assert_eq!(h.client(), "MAIL FROM:<a@x.test>\r\n");
    }
}

#[test]
fn ehlo_4xx_and_helo_refusal_close_the_connection() {
    for (ehlo_reply, helo_reply, phase) in [
        ("451 4.3.0 busy\r\n", None, Phase::Ehlo),
        ("502 no\r\n", Some("550 go away\r\n"), Phase::Helo),
    ] {
        let mut h = Harness::new(config());
        h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
        h.server("220 x\r\n");
        h.client();
        h.server(ehlo_reply);
        if let Some(helo) = helo_reply {
            assert_eq!(h.client(), "HELO relay.test\r\n");
            h.server(helo);
        }
        let (reason, unsent) = h.closed.clone().unwrap();
        assert_eq!(reason.kind, CloseKind::Refused);
        assert_eq!(reason.phase, phase);
        assert!(reason.is_connection_failure());
        assert_eq!(unsent.len(), 1, "the message was never attempted");
        assert!(h.done.is_empty());
        assert_eq!(h.client(), "QUIT\r\n", "polite goodbye");
    }
}

#[test]
fn greeting_refused_is_a_connection_failure() {
    for greeting in ["554 5.7.1 go away\r\n", "450 busy\r\n"] {
        let mut h = Harness::new(config());
        let id = h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
        h.server(greeting);
        let (reason, unsent) = h.closed.clone().unwrap();
        assert_eq!(reason.kind, CloseKind::Refused);
        assert_eq!(reason.phase, Phase::Greeting);
        assert_eq!(
            reason.reply.as_ref().unwrap().code(),
            greeting[..3].parse::<u16>().unwrap()
        );
        assert!(reason.is_connection_failure());
        assert_eq!(unsent[0].0, id);
        assert_eq!(h.client(), "QUIT\r\n");
        assert!(h.s.is_closed());
        // A closed session refuses new messages, handing them back.
        let back = h.s.send_message(h.now, msg("a@x.test", &["c@y.test"], "x"));
        assert!(back.is_err());
    }
}

#[test]
fn mixed_recipient_results() {
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(msg(
        "a@x.test",
        &["bad@y.test", "good@y.test", "later@y.test"],
        "hi\r\n",
    ));
    h.client();
    h.server(
        "250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n451 4.2.1 try later\r\n354 go\r\n",
    );
    assert_eq!(h.client(), "hi\r\n.\r\n");
    h.server("250 2.0.0 queued\r\n");
    assert_eq!(
        h.last(),
        vec![
            r(550, "5.1.1", Phase::Rcpt, true),
            r(250, "2.0.0", Phase::EndOfData, true),
            r(451, "4.2.1", Phase::Rcpt, true),
        ]
    );
    let res = &h.done[0].recipients;
    assert!(res[0].is_permanent() && res[1].is_delivered() && res[2].is_transient());
    assert_eq!(h.client(), "", "no RSET after a completed transaction");
}

#[test]
fn mail_refused_applies_to_every_recipient() {
    // Pipelined: the RCPT and DATA replies (503s) are consumed and ignored.
    for (code, enh) in [(451, "4.3.0"), (550, "5.7.1")] {
        let mut h = Harness::ready(config(), EHLO_PIPE);
        h.send(msg("a@x.test", &["b@y.test", "c@y.test"], "hi\r\n"));
        h.client();
        h.server(&format!(
            "{code} {enh} sender refused\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n"
        ));
        assert!(h.done.is_empty(), "DATA reply still outstanding");
        h.server("503 5.5.1 no valid recipients\r\n");
        assert_eq!(h.last(), vec![r(code, enh, Phase::Mail, true); 2]);
        assert_eq!(h.client(), "", "MAIL failed: no transaction to reset");
        assert!(h.s.is_idle());
    }
    // Lock-step: nothing after the refused MAIL.
    let mut h = Harness::ready(config(), EHLO_PLAIN);
    h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
    h.client();
    h.server("550 5.7.1 no\r\n");
    assert_eq!(h.last(), vec![r(550, "5.7.1", Phase::Mail, true)]);
    assert_eq!(h.client(), "");
}

#[test]
fn data_refused_applies_to_accepted_recipients_then_rset() {
    for (code, enh) in [(451, "4.3.0"), (554, "5.5.1")] {
        let mut h = Harness::ready(config(), EHLO_PIPE);
        h.send(msg("a@x.test", &["b@y.test", "c@y.test"], "hi\r\n"));
        h.client();
        h.server(&format!(
            "250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n{code} {enh} not now\r\n"
        ));
        assert_eq!(
            h.last(),
            vec![
                r(550, "5.1.1", Phase::Rcpt, true),
                r(code, enh, Phase::Data, true)
            ]
        );
        assert_eq!(h.client(), "RSET\r\n");
        assert!(!h.s.is_idle());
        h.server("250 2.0.0 ok\r\n");
        assert!(h.s.is_idle());
    }
    // Lock-step.
    let mut h = Harness::ready(config(), EHLO_PLAIN);
    h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
    for reply in ["250 ok\r\n", "250 ok\r\n"] {
        h.client();
        h.server(reply);
    }
    assert_eq!(h.client(), "DATA\r\n");
    h.server("554 5.3.0 no data today\r\n");
    assert_eq!(h.last(), vec![r(554, "5.3.0", Phase::Data, true)]);
    assert_eq!(h.client(), "RSET\r\n");
}

#[test]
fn final_dot_refused() {
    for (code, enh) in [(451, "4.3.0"), (552, "5.3.4"), (554, "5.7.1")] {
        let mut h = Harness::ready(config(), EHLO_PIPE);
        h.send(msg("a@x.test", &["b@y.test", "c@y.test"], "hi\r\n"));
        h.client();
        h.server("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
        h.client();
        h.server(&format!("{code} {enh} no thanks\r\n"));
        assert_eq!(h.last(), vec![r(code, enh, Phase::EndOfData, true); 2]);
        // RFC 5321 says the reply ended the transaction, but some servers
        // (aiosmtpd after `500 Error: strict ASCII mode`) keep the envelope
        // and answer the next MAIL `503 nested MAIL command`: reset.
        assert_eq!(h.client(), "RSET\r\n");
        assert!(!h.s.is_idle());
        h.server("250 2.0.0 ok\r\n");
        assert!(h.s.is_idle());
    }
}

#[test]
fn next_transaction_waits_for_the_rset_after_a_refused_data() {
    // Seen with aiosmtpd as the destination: the second message was sent
    // right after a refused one and bounced with `503 nested MAIL command`.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(msg("a@x.test", &["b@y.test"], "one\r\n"));
    h.send(msg("a@x.test", &["c@y.test"], "two\r\n"));
    h.client();
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    assert_eq!(h.client(), "one\r\n.\r\n");
    h.server("500 Error: strict ASCII mode\r\n");
    assert_eq!(h.client(), "RSET\r\n", "no MAIL before the RSET reply");
    h.server("250 OK\r\n");
    assert_eq!(
        h.client(),
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    assert_eq!(h.client(), "two\r\n.\r\n");
    h.server("250 ok\r\n");
    assert!(h.done[1].recipients[0].is_delivered());
    assert!(h.s.is_idle());
}

#[test]
fn all_recipients_refused_lock_step_sends_no_data_then_rset() {
    let mut h = Harness::ready(config(), EHLO_PLAIN);
    h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
    h.client();
    h.server("250 ok\r\n");
    h.client();
    h.server("550 5.1.1 unknown\r\n");
    assert_eq!(h.last(), vec![r(550, "5.1.1", Phase::Rcpt, true)]);
    assert_eq!(h.client(), "RSET\r\n");
}

#[test]
fn data_354_after_all_rcpts_refused_sends_lone_dot() {
    // RFC 2920 §3.1: the server said 354 although it accepted nobody.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(msg("a@x.test", &["b@y.test"], "secret body\r\n"));
    h.client();
    h.server("250 ok\r\n550 5.1.1 unknown\r\n354 go ahead anyway\r\n");
    assert_eq!(h.client(), ".\r\n", "empty data, never the body");
    assert!(h.done.is_empty());
    h.server("554 5.5.1 no valid recipients\r\n");
    assert_eq!(h.last(), vec![r(550, "5.1.1", Phase::Rcpt, true)]);
    assert_eq!(h.client(), "RSET\r\n", "the empty data was refused");
    h.server("250 ok\r\n");
    assert!(h.s.is_idle());
}

#[test]
fn server_421_closes_with_its_reply_for_open_recipients() {
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(msg(
        "a@x.test",
        &["b@y.test", "c@y.test", "d@y.test"],
        "hi\r\n",
    ));
    let queued = h.send(msg("a@x.test", &["e@y.test"], "next\r\n"));
    h.client();
    h.server("250 ok\r\n550 5.1.1 unknown\r\n421 4.3.2 shutting down\r\n");
    assert_eq!(
        h.last(),
        vec![
            r(550, "5.1.1", Phase::Rcpt, true),
            r(421, "4.3.2", Phase::Rcpt, true),
            r(421, "4.3.2", Phase::Rcpt, true),
        ]
    );
    let (reason, unsent) = h.closed.clone().unwrap();
    assert_eq!(reason.kind, CloseKind::ServerClosing);
    assert!(!reason.is_connection_failure());
    assert_eq!(unsent.len(), 1);
    assert_eq!(unsent[0].0, queued);
    assert_eq!(h.client(), "", "no QUIT to a server that is closing");

    // After the data was sent, a 421 instead of the final reply.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
    h.client();
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    h.client();
    h.server("421 4.4.2 timeout\r\n");
    assert_eq!(h.last(), vec![r(421, "4.4.2", Phase::EndOfData, true)]);
    assert_eq!(h.closed_kind(), Some(CloseKind::ServerClosing));

    // While idle.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.server("421 4.4.2 idle too long\r\n");
    assert_eq!(h.closed_kind(), Some(CloseKind::ServerClosing));
    assert!(h.done.is_empty());
}

#[test]
fn eof_mid_transaction() {
    // EOF at various points: every open recipient gets 421 4.4.2.
    let steps: &[&str] = &[
        "250 ok\r\n",
        "250 ok\r\n250 ok\r\n",
        "250 ok\r\n250 ok\r\n354 go\r\n",
    ];
    for (i, replies) in steps.iter().enumerate() {
        let mut h = Harness::ready(config(), EHLO_PIPE);
        h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
        h.client();
        h.server(replies);
        h.client();
        h.s.handle_eof(h.now);
        h.collect();
        let want_phase = [Phase::Rcpt, Phase::Data, Phase::EndOfData][i];
        assert_eq!(
            h.last(),
            vec![r(421, "4.4.2", want_phase, false)],
            "step {i}"
        );
        assert_eq!(h.closed_kind(), Some(CloseKind::ConnectionLost));
        assert_eq!(h.client(), "");
    }
    // EOF before the greeting: a connection failure, nothing attempted.
    let mut h = Harness::new(config());
    h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
    h.s.handle_eof(h.now);
    h.collect();
    let (reason, unsent) = h.closed.clone().unwrap();
    assert!(reason.is_connection_failure());
    assert_eq!(unsent.len(), 1);
    // EOF after QUIT is just the end.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.s.quit(h.now);
    h.client();
    h.s.handle_eof(h.now);
    h.collect();
    assert_eq!(h.closed_kind(), Some(CloseKind::Quit));
}

#[test]
fn malformed_or_unexpected_replies_are_protocol_errors() {
    let cases: &[(&str, &str)] = &[
        ("250 ok\r\nbogus\r\n", "malformed"),
        ("250 ok\r\n250-a\r\n251 b\r\n", "mixed codes"),
        ("250 ok\r\n354 what\r\n", "3xx to RCPT"),
        ("250 ok\r\n250 ok\r\n250 ok\r\n", "2xx to DATA"),
    ];
    for &(replies, what) in cases {
        let mut h = Harness::ready(config(), EHLO_PIPE);
        h.send(msg("a@x.test", &["b@y.test"], "hi\r\n"));
        h.client();
        h.server(replies);
        assert_eq!(h.closed_kind(), Some(CloseKind::ProtocolError), "{what}");
        let got = h.last();
        assert_eq!(
            (got[0].0, got[0].1.as_str(), got[0].3),
            (451, "4.5.0", false),
            "{what}"
        );
    }
    // An oversized reply line.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.server(&format!(
        "250 {}",
        "x".repeat(crate::smtp::reply::MAX_REPLY_LINE)
    ));
    assert_eq!(h.closed_kind(), Some(CloseKind::ProtocolError));
    // A reply when nothing was asked.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.server("250 surprise\r\n");
    assert_eq!(h.closed_kind(), Some(CloseKind::ProtocolError));
}

#[test]
fn premature_reply_during_data() {
    let cfg = ClientConfig {
        max_write_chunk: 4,
        ..config()
    };
    let mut h = Harness::ready(cfg, EHLO_PIPE);
    h.send(msg("a@x.test", &["b@y.test"], "0123456789\r\n"));
    h.client();
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    let mut out = Vec::new();
    h.s.write_output(h.now, &mut out);
    assert_eq!(out, b"0123");
    h.server("552 5.3.4 too big\r\n");
    assert_eq!(h.last(), vec![r(552, "5.3.4", Phase::EndOfData, true)]);
    assert_eq!(h.closed_kind(), Some(CloseKind::ProtocolError));
    assert!(!h.s.has_output(), "the rest of the body is dropped");
}

/// Drives a session to the point where it waits in `phase`; returns it.
fn wait_in(phase: Phase) -> Harness {
    let cfg = ClientConfig {
        max_write_chunk: 4,
        ..config()
    };
    let mut h = Harness::new(cfg);
    if phase == Phase::Greeting {
        return h;
    }
    h.server("220 x\r\n");
    h.client();
    if phase == Phase::Ehlo {
        return h;
    }
    h.server(EHLO_PLAIN);
    if phase == Phase::Quit {
        h.s.quit(h.now);
        h.client();
        return h;
    }
    h.send(msg("a@x.test", &["b@y.test"], "0123456789\r\n"));
    h.client();
    if phase == Phase::Mail {
        return h;
    }
    h.server("250 ok\r\n");
    h.client();
    if phase == Phase::Rcpt {
        return h;
    }
    if phase == Phase::Rset {
        h.server("550 5.1.1 no\r\n");
        assert_eq!(h.client(), "RSET\r\n");
        return h;
    }
    h.server("250 ok\r\n");
    h.client();
    if phase == Phase::Data {
        return h;
    }
    h.server("354 go\r\n");
    if phase == Phase::Bdat {
        // Stands for "sending data": only part of the body handed out.
        let mut out = Vec::new();
        h.s.write_output(h.now, &mut out);
        return h;
    }
    h.client();
    assert_eq!(phase, Phase::EndOfData);
    h
}

#[test]
fn timeouts_on_every_phase() {
    let t = ClientTimeouts::default();
    // (phase waited in, its timeout, phase reported, message text part)
    let table = [
        (Phase::Greeting, t.greeting, Phase::Greeting),
        (Phase::Ehlo, t.ehlo, Phase::Ehlo),
        (Phase::Mail, t.mail, Phase::Mail),
        (Phase::Rcpt, t.rcpt, Phase::Rcpt),
        (Phase::Data, t.data_init, Phase::Data),
        (Phase::Bdat, t.data_block, Phase::EndOfData), // sending the body
        (Phase::EndOfData, t.final_dot, Phase::EndOfData),
        (Phase::Rset, t.rset, Phase::Rset),
        (Phase::Quit, t.quit, Phase::Quit),
    ];
    for (waiting, timeout, reported) in table {
        let mut h = wait_in(waiting);
        let deadline = h.s.poll_timeout().expect("a deadline while waiting");
        assert_eq!(deadline - h.now, timeout, "{waiting:?}");
        h.advance(timeout - Duration::from_millis(1));
        assert!(h.closed.is_none(), "{waiting:?}: not before the deadline");
        h.advance(Duration::from_millis(1));
        let (reason, _) = h.closed.clone().expect("closed at the deadline");
        assert_eq!(reason.phase, reported, "{waiting:?}");
        if waiting == Phase::Quit {
            assert_eq!(reason.kind, CloseKind::Quit);
            continue;
        }
        assert_eq!(reason.kind, CloseKind::Timeout, "{waiting:?}");
        let reply = reason.reply.unwrap();
        assert_eq!(
            (reply.code(), reply.enhanced()),
            (451, Some(EnhancedCode::new(4, 4, 2)))
        );
        if matches!(
            waiting,
            Phase::Mail | Phase::Rcpt | Phase::Data | Phase::Bdat | Phase::EndOfData
        ) {
            assert_eq!(
                h.last(),
                vec![r(451, "4.4.2", reported, false)],
                "{waiting:?}"
            );
        } else {
            assert!(h.done.is_empty() || waiting == Phase::Rset);
        }
        assert_eq!(h.s.poll_timeout(), None);
    }
}

#[test]
fn data_block_timer_restarts_with_each_write_and_final_dot_follows() {
    let cfg = ClientConfig {
        max_write_chunk: 4,
        ..config()
    };
    let t = cfg.timeouts;
    let mut h = Harness::ready(cfg, EHLO_PIPE);
    h.send(msg("a@x.test", &["b@y.test"], "0123456789\r\n"));
    h.client();
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    let mut out = Vec::new();
    for _ in 0..3 {
        h.now += t.data_block - Duration::from_secs(1);
        h.s.write_output(h.now, &mut out);
        assert_eq!(
            h.s.poll_timeout(),
            Some(
                h.now
                    + if h.s.has_output() {
                        t.data_block
                    } else {
                        t.final_dot
                    }
            )
        );
    }
    assert_eq!(out, b"0123456789\r\n.\r\n");
    assert_eq!(h.s.poll_timeout(), Some(h.now + t.final_dot));
    assert!(h.closed.is_none());
}

#[test]
fn dot_stuffing_on_output() {
    let cases: &[(&str, &str)] = &[
        (
            ".starts with a dot\r\nx\r\n",
            "..starts with a dot\r\nx\r\n.\r\n",
        ),
        ("a\r\n.\r\nb\r\n", "a\r\n..\r\nb\r\n.\r\n"),
        ("a\r\n..two\r\n", "a\r\n...two\r\n.\r\n"),
        ("no final crlf", "no final crlf\r\n.\r\n"),
        ("", ".\r\n"),
        (".", "..\r\n.\r\n"),
    ];
    for &(body, wire) in cases {
        let mut h = Harness::ready(config(), EHLO_PIPE);
        h.send(msg("a@x.test", &["b@y.test"], body));
        h.client();
        h.server("250 ok\r\n250 ok\r\n354 go\r\n");
        assert_eq!(h.client(), wire, "{body:?}");
        h.server("250 ok\r\n");
        assert!(h.done[0].recipients[0].is_delivered());
    }
}

#[test]
fn big_body_is_handed_out_in_bounded_pieces() {
    let cfg = ClientConfig {
        max_write_chunk: 64 * 1024,
        ..config()
    };
    let mut h = Harness::ready(cfg, EHLO_PIPE);
    let line = "x".repeat(78) + "\r\n";
    let body = line.repeat(10_000); // 800 kB
    h.send(msg("a@x.test", &["b@y.test"], &body));
    h.client();
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    let mut total = Vec::new();
    let mut calls = 0;
    while h.s.has_output() {
        let mut out = Vec::new();
        h.s.write_output(h.now, &mut out);
        assert!(out.len() <= 64 * 1024 + 5);
        total.extend_from_slice(&out);
        calls += 1;
    }
    assert_eq!(calls, body.len().div_ceil(64 * 1024));
    assert_eq!(total.len(), body.len() + 3);
}

#[test]
fn bdat_framing_pipelined() {
    let cfg = ClientConfig {
        use_chunking: true,
        bdat_chunk_size: 4,
        ..config()
    };
    let cases: &[(&str, &str, &str)] = &[
        ("", "BDAT 0 LAST\r\n", "250 ok\r\n"),
        ("abc", "BDAT 3 LAST\r\nabc", "250 ok\r\n"),
        ("abcd", "BDAT 4 LAST\r\nabcd", "250 ok\r\n"),
        (
            "abcdefgh",
            "BDAT 4\r\nabcdBDAT 4 LAST\r\nefgh",
            "250 ok\r\n250 ok\r\n",
        ),
        (
            ".\r\n.x",
            "BDAT 4\r\n.\r\n.BDAT 1 LAST\r\nx",
            "250 ok\r\n250 ok\r\n",
        ),
    ];
    for &(body, wire, replies) in cases {
        let mut h = Harness::ready(cfg.clone(), EHLO_CHUNK);
        h.send(msg("a@x.test", &["b@y.test"], body));
        // The envelope first; BDAT only once a recipient is accepted.
        assert_eq!(h.client(), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
        h.server("250 ok\r\n250 ok\r\n");
        assert_eq!(h.client(), wire, "{body:?}");
        h.server(replies);
        assert_eq!(h.last(), vec![r(250, "", Phase::Bdat, true)], "{body:?}");
        assert_eq!(h.client(), "");
        assert!(h.s.is_idle());
    }
}

#[test]
fn bdat_lock_step_and_refusals() {
    let cfg = ClientConfig {
        use_chunking: true,
        bdat_chunk_size: 4,
        ..config()
    };
    let mut h = Harness::ready(cfg.clone(), EHLO_CHUNK_LOCKSTEP);
    h.send(msg("a@x.test", &["b@y.test"], "abcdefghi"));
    h.client();
    h.server("250 ok\r\n");
    h.client();
    h.server("250 ok\r\n");
    assert_eq!(h.client(), "BDAT 4\r\nabcd");
    h.server("250 2.0.0 chunk ok\r\n");
    assert_eq!(h.client(), "BDAT 4\r\nefgh");
    h.server("250 2.0.0 chunk ok\r\n");
    assert_eq!(h.client(), "BDAT 1 LAST\r\ni");
    h.server("250 2.0.0 message ok\r\n");
    assert_eq!(h.last(), vec![r(250, "2.0.0", Phase::Bdat, true)]);

    // Lock-step: a refused chunk stops the body; RSET follows.
    h.send(msg("a@x.test", &["b@y.test"], "abcdefghi"));
    h.client();
    h.server("250 ok\r\n");
    h.client();
    h.server("250 ok\r\n");
    assert_eq!(h.client(), "BDAT 4\r\nabcd");
    h.server("552 5.3.4 too big\r\n");
    assert_eq!(h.last(), vec![r(552, "5.3.4", Phase::Bdat, true)]);
    assert_eq!(h.client(), "RSET\r\n");
    h.server("250 ok\r\n");
    assert!(h.s.is_idle());

    // Pipelined: the first refused chunk decides; RSET follows.
    let mut h = Harness::ready(cfg, EHLO_CHUNK);
    h.send(msg("a@x.test", &["b@y.test"], "abcdefgh"));
    h.client();
    h.server("250 ok\r\n250 ok\r\n");
    assert_eq!(h.client(), "BDAT 4\r\nabcdBDAT 4 LAST\r\nefgh");
    h.server("452 4.3.1 disk full\r\n");
    assert!(h.done.is_empty());
    h.server("503 5.5.1 no transaction\r\n");
    assert_eq!(h.last(), vec![r(452, "4.3.1", Phase::Bdat, true)]);
    assert_eq!(h.client(), "RSET\r\n");
}

#[test]
fn bdat_with_all_recipients_refused_sends_nothing() {
    let cfg = ClientConfig {
        use_chunking: true,
        ..config()
    };
    let mut h = Harness::ready(cfg, EHLO_CHUNK);
    h.send(msg("a@x.test", &["b@y.test"], "body"));
    h.client();
    h.server("250 ok\r\n550 5.1.1 no\r\n");
    assert_eq!(h.last(), vec![r(550, "5.1.1", Phase::Rcpt, true)]);
    assert_eq!(h.client(), "RSET\r\n");
}

#[test]
fn chunking_off_by_default_uses_data() {
    let mut h = Harness::ready(config(), EHLO_CHUNK);
    h.send(msg("a@x.test", &["b@y.test"], "x\r\n"));
    assert!(h.client().ends_with("DATA\r\n"));
}

#[test]
fn several_transactions_with_rset_between_when_needed() {
    let mut h = Harness::ready(config(), EHLO_PIPE);
    let a = h.send(msg("a@x.test", &["nobody@y.test"], "one\r\n"));
    let b = h.send(msg("a@x.test", &["b@y.test"], "two\r\n"));
    let c = h.send(msg("", &["c@y.test"], "three\r\n"));
    assert_eq!(h.s.queued(), 2);
    // First: every recipient refused -> RSET, and only then the next MAIL.
    assert_eq!(
        h.client(),
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody@y.test>\r\nDATA\r\n"
    );
    h.server("250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n");
    assert_eq!(h.client(), "RSET\r\n");
    h.server("250 2.0.0 ok\r\n");
    assert_eq!(
        h.client(),
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    assert_eq!(h.client(), "two\r\n.\r\n");
    h.server("250 ok\r\n");
    // Second delivered: no RSET, straight to the third.
    assert_eq!(h.client(), "MAIL FROM:<>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n");
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    h.client();
    h.server("250 ok\r\n");
    let ids: Vec<_> = h.done.iter().map(|d| d.id).collect();
    assert_eq!(ids, vec![a, b, c]);
    assert!(!h.done[0].recipients[0].is_delivered());
    assert!(h.done[1].recipients[0].is_delivered() && h.done[2].recipients[0].is_delivered());
    assert_eq!(h.s.transactions(), 3);
    assert!(h.s.is_idle());
    // quit() waits for queued work; here there is none.
    h.s.quit(h.now);
    assert_eq!(h.client(), "QUIT\r\n");
    assert!(h
        .s
        .send_message(h.now, msg("a@x.test", &["d@y.test"], ""))
        .is_err());
}

#[test]
fn message_queued_before_ready_and_quit_after_it() {
    let mut h = Harness::new(config());
    h.send(msg("a@x.test", &["b@y.test"], "x\r\n"));
    h.s.quit(h.now);
    h.server("220 x\r\n");
    assert_eq!(h.client(), "EHLO relay.test\r\n");
    h.server(EHLO_PIPE);
    assert!(h.client().starts_with("MAIL FROM:"));
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    h.client();
    h.server("250 ok\r\n");
    assert_eq!(h.client(), "QUIT\r\n");
    h.server("221 bye\r\n");
    assert_eq!(h.closed_kind(), Some(CloseKind::Quit));
    assert_eq!(h.done.len(), 1);
}

#[test]
fn refusals_before_sending() {
    // (EHLO, message tweak, expected code/enhanced) - nothing goes out.
    type Tweak = fn(&mut OutgoingMessage);
    let eight_bit: Tweak = |m| {
        m.body = "caf\u{e9}\r\n".as_bytes().to_vec().into();
        m.body_type = Some(BodyType::EightBitMime);
    };
    let binary: Tweak = |m| m.body_type = Some(BodyType::BinaryMime);
    let utf8_rcpt: Tweak = |m| m.recipients = vec![rcpt("j\u{f6}rg@y.test")];
    let utf8_header: Tweak = |m| {
        m.smtputf8 = true;
        m.body = "Subject: gr\u{fc}\u{df}e\r\n\r\nx\r\n"
            .as_bytes()
            .to_vec()
            .into();
    };
    let big: Tweak = |m| m.body = vec![b'x'; 101].into();
    let cases: [(&str, Tweak, u16, &str); 5] = [
        (EHLO_PIPE, eight_bit, 554, "5.6.3"),
        (EHLO_PIPE, binary, 554, "5.6.3"),
        (EHLO_PIPE, utf8_rcpt, 554, "5.6.7"),
        (EHLO_PIPE, utf8_header, 554, "5.6.7"),
        ("250-x\r\n250 SIZE 100\r\n", big, 552, "5.3.4"),
    ];
    for (ehlo, tweak, code, enh) in cases {
        let mut h = Harness::ready(config(), ehlo);
        let mut m = msg("a@x.test", &["b@y.test", "c@y.test"], "x\r\n");
        tweak(&mut m);
        let n = m.recipients.len();
        h.send(m);
        assert_eq!(h.client(), "", "{enh}: nothing sent");
        assert_eq!(h.last(), vec![r(code, enh, Phase::Mail, false); n], "{enh}");
        assert!(h.s.is_idle());
        assert_eq!(h.s.transactions(), 0);
    }
}

#[test]
fn eight_bit_and_utf8_accepted_paths() {
    // 8BITMIME declared but the body is ASCII: sent without BODY=.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    let mut m = msg("a@x.test", &["b@y.test"], "plain\r\n");
    m.body_type = Some(BodyType::EightBitMime);
    h.send(m);
    assert!(h.client().starts_with("MAIL FROM:<a@x.test>\r\n"));
    // SendAnyway policy: the 8-bit body goes, without BODY=.
    let cfg = ClientConfig {
        eight_bit: EightBitPolicy::SendAnyway,
        ..config()
    };
    let mut h = Harness::ready(cfg, EHLO_PIPE);
    let mut m = msg("a@x.test", &["b@y.test"], "caf\u{e9}\r\n");
    m.body_type = Some(BodyType::EightBitMime);
    h.send(m);
    assert!(h.client().starts_with("MAIL FROM:<a@x.test>\r\n"));
    // Server with everything: parameters go out.
    let mut h = Harness::ready(config(), EHLO_ALL);
    let mut m = msg("a@x.test", &["j\u{f6}rg@y.test"], "caf\u{e9}\r\n");
    m.body_type = Some(BodyType::EightBitMime);
    h.send(m);
    assert_eq!(
        h.client(),
        "MAIL FROM:<a@x.test> SIZE=7 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<j\u{f6}rg@y.test>\r\nDATA\r\n"
    );
    // SMTPUTF8 declared, ASCII envelope and headers, server without it: sent.
    let mut h = Harness::ready(config(), EHLO_PIPE);
    let mut m = msg("a@x.test", &["b@y.test"], "Subject: x\r\n\r\nb\u{f6}dy\r\n");
    m.smtputf8 = true;
    m.body_type = Some(BodyType::EightBitMime);
    let _ = &mut m;
    let cfg_any = ClientConfig {
        eight_bit: EightBitPolicy::SendAnyway,
        ..config()
    };
    let mut h2 = Harness::ready(cfg_any, EHLO_PIPE);
    h2.send(m.clone());
    assert!(h2.client().starts_with("MAIL FROM:<a@x.test>\r\n"));
    // ... but with the default policy the 8-bit body itself is refused.
    h.send(m);
    assert_eq!(h.last()[0].1, "5.6.3");
}

#[test]
fn dsn_parameters_only_when_offered() {
    let dsn_msg = || {
        let mut m = msg("a@x.test", &["b@y.test"], "x\r\n");
        m.ret = Some(Ret::Headers);
        m.envid = Some("env id+1".into());
        m.recipients[0].notify = Some(Notify {
            success: true,
            failure: true,
            ..Notify::default()
        });
        m.recipients[0].orcpt = Some(Orcpt {
            addr_type: "rfc822".into(),
            address: "orig=b@y.test".into(),
        });
        m
    };
    let mut h = Harness::ready(config(), EHLO_ALL);
    h.send(dsn_msg());
    assert_eq!(
        h.client(),
        "MAIL FROM:<a@x.test> SIZE=3 RET=HDRS ENVID=env+20id+2B1\r\n\
         RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+3Db@y.test\r\nDATA\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    h.client();
    h.server("250 ok\r\n");
    assert!(h.done[0].remote_dsn);

    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(dsn_msg());
    assert_eq!(
        h.client(),
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    );
    h.server("250 ok\r\n250 ok\r\n354 go\r\n");
    h.client();
    h.server("250 ok\r\n");
    assert!(!h.done[0].remote_dsn, "we owe the relayed DSN ourselves");
}

#[test]
fn byte_at_a_time_replies() {
    let mut h = Harness::new(config());
    h.bytewise = true;
    h.server("220-mx.test ESMTP\r\n220 welcome\r\n");
    assert_eq!(h.client(), "EHLO relay.test\r\n");
    h.server(EHLO_ALL);
    assert_eq!(h.ready, 1);
    assert!(h.s.extensions().dsn);
    h.send(msg("a@x.test", &["b@y.test", "c@y.test"], ".x\r\n"));
    h.client();
    h.server("250 2.1.0 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n354 go\r\n");
    assert_eq!(h.client(), "..x\r\n.\r\n");
    h.server("250-2.0.0 queued\r\n250 2.0.0 as X\r\n");
    assert_eq!(
        h.last(),
        vec![
            r(550, "5.1.1", Phase::Rcpt, true),
            r(250, "2.0.0", Phase::EndOfData, true)
        ]
    );
    // Replies split at arbitrary points, bare LF endings tolerated.
    h.bytewise = false;
    h.send(msg("a@x.test", &["b@y.test"], "y\r\n"));
    h.client();
    for piece in ["25", "0 ok\n250", " ok\r", "\n35", "4 go\r\n"] {
        h.server(piece);
    }
    assert_eq!(h.client(), "y\r\n.\r\n");
}

#[test]
fn starttls_seam() {
    let cfg = ClientConfig {
        starttls: StartTlsPolicy::Opportunistic,
        ..config()
    };
    let ehlo_tls = "250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n";
    // Accepted: event, no input until answered, then EHLO again.
    let mut h = Harness::new(cfg.clone());
    h.server("220 x\r\n");
    h.client();
    h.server(ehlo_tls);
    assert_eq!(h.ready, 0);
    assert_eq!(h.client(), "STARTTLS\r\n");
    h.server("220 2.0.0 go ahead\r\n");
    assert_eq!(h.starttls, 1);
    assert_eq!(h.s.poll_timeout(), None, "the driver bounds the handshake");
    h.s.answer_starttls(h.now, true);
    assert!(h.s.is_tls());
    assert_eq!(
        h.s.extensions(),
        &Extensions::default(),
        "plaintext keywords forgotten"
    );
    assert_eq!(h.client(), "EHLO relay.test\r\n");
    h.server("250-mx.test\r\n250 PIPELINING\r\n");
    assert_eq!(h.ready, 1);
    assert_eq!(h.client(), "", "no second STARTTLS");

    // Refused: continue in plain text.
    let mut h = Harness::new(cfg.clone());
    h.server("220 x\r\n");
    h.client();
    h.server(ehlo_tls);
    h.client();
    h.server("454 4.7.0 TLS not available\r\n");
    assert_eq!(h.ready, 1);
    assert!(!h.s.is_tls());

    // Plaintext injected after the 220 (CVE-2011-0411): refused.
    let mut h = Harness::new(cfg.clone());
    h.send(msg("a@x.test", &["b@y.test"], "x"));
    h.server("220 x\r\n");
    h.client();
    h.server(ehlo_tls);
    h.client();
    h.server("220 go ahead\r\n250 injected\r\n");
    h.s.answer_starttls(h.now, true);
    h.collect();
    let (reason, unsent) = h.closed.clone().unwrap();
    assert_eq!(reason.kind, CloseKind::ProtocolError);
    assert!(reason.is_connection_failure());
    assert_eq!(unsent.len(), 1);

    // Handshake failed.
    let mut h = Harness::new(cfg);
    h.server("220 x\r\n");
    h.client();
    h.server(ehlo_tls);
    h.client();
    h.server("220 go ahead\r\n");
    h.s.answer_starttls(h.now, false);
    h.collect();
    assert_eq!(h.closed_kind(), Some(CloseKind::TlsFailed));

    // Disabled (the default): STARTTLS offered but not used.
    let mut h = Harness::ready(config(), ehlo_tls);
    assert!(h.s.extensions().starttls);
    assert_eq!(h.client(), "");
}

#[test]
fn empty_recipient_list_is_an_empty_result() {
    let mut h = Harness::ready(config(), EHLO_PIPE);
    h.send(msg("a@x.test", &[], "x"));
    assert_eq!(h.client(), "");
    assert_eq!(h.done.len(), 1);
    assert!(h.done[0].recipients.is_empty());
    assert!(h.s.is_idle());
    let _ = h.start;
}

mod fuzz_scripts {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The fuzz harness's invariants on random scripts (the cargo-fuzz
        /// target `client_session` runs the same harness much longer).
        #[test]
        fn random_scripts_keep_invariants(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            super::super::fuzz_harness::run(&data);
        }

        /// Scripts made mostly of canned replies reach deep states.
        #[test]
        fn canned_reply_scripts_keep_invariants(
            ctl in any::<u8>(),
            tokens in proptest::collection::vec(prop_oneof![0u8..26, 0xF0u8..=0xFF], 0..80),
        ) {
            let mut data = vec![ctl];
            data.extend(tokens);
            super::super::fuzz_harness::run(&data);
        }
    }
}

#[test]
fn input_during_tls_handshake_is_refused() {
    let cfg = ClientConfig {
        starttls: StartTlsPolicy::Opportunistic,
        ..config()
    };
    let mut h = Harness::new(cfg);
    h.server("220 x\r\n");
    h.client();
    h.server("250-mx.test\r\n250 STARTTLS\r\n");
    h.client();
    h.server("220 go ahead\r\n");
    assert_eq!(h.starttls, 1);
    // A later read, before the driver answered: not ours to parse.
    h.server("250 injected\r\n");
    assert_eq!(h.closed_kind(), Some(CloseKind::ProtocolError));
    h.s.answer_starttls(h.now, true);
    assert_eq!(h.client(), "", "nothing more after the close");
}

#[test]
fn server_421_to_ehlo_is_a_connection_failure() {
    let mut h = Harness::new(config());
    let id = h.send(msg("a@x.test", &["b@y.test"], "x"));
    h.server("220 x\r\n");
    h.client();
    h.server("421 4.7.0 too many connections\r\n");
    let (reason, unsent) = h.closed.clone().unwrap();
    assert_eq!(reason.kind, CloseKind::ServerClosing);
    assert!(reason.is_connection_failure());
    assert_eq!(unsent[0].0, id);
    assert_eq!(h.client(), "");
}
