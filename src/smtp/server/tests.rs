//! Session tests: an in-memory driver on a virtual clock.

use super::*;
use crate::smtp::address::Address;

/// An in-memory driver: accepts recipients unless their local part starts
/// with "deny", stores messages under sequential ids.
struct Harness {
    s: Session,
    now: Instant,
    stored: Vec<IncomingMessage>,
    rejected: Vec<(Stage, u16)>,
    starttls_events: usize,
    /// Answer messages with this reply instead of storing them.
    store_failure: Option<Reply>,
}

impl Harness {
    fn new() -> Self {
        Self::with(SessionConfig::default(), false)
    }

    fn with(config: SessionConfig, starttls: bool) -> Self {
        let now = Instant::now();
        let mut peer = PeerInfo::plain("192.0.2.7:40000".parse().unwrap());
        peer.starttls_available = starttls;
        let s = Session::new(Arc::new(config), peer, now);
        Self {
            s,
            now,
            stored: Vec::new(),
            rejected: Vec::new(),
            starttls_events: 0,
            store_failure: None,
        }
    }

    /// Feeds `input` (as one read), answering events, and returns the output
    /// produced (everything the driver would write).
    fn send(&mut self, input: &[u8]) -> String {
        let mut pending = input.to_vec();
        let mut out = Vec::new();
        loop {
            let n = self.s.handle_input(self.now, &pending);
            pending.drain(..n);
            let answered = self.answer_events();
            if self.s.is_closed() || (pending.is_empty() && !answered) {
                break;
            }
            if !answered && n == 0 {
                break;
            }
        }
        self.s.write_output(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// Feeds one byte at a time.
    fn send_bytewise(&mut self, input: &[u8]) -> String {
        let mut all = String::new();
        for b in input {
            all.push_str(&self.send(std::slice::from_ref(b)));
        }
        all
    }

    fn answer_events(&mut self) -> bool {
        let mut answered = false;
        while let Some(ev) = self.s.poll_event() {
            match ev {
                Event::CheckRecipient { recipient, .. } => {
                    let deny = matches!(&recipient.to, ForwardPath::Address(a) if a.local_part().starts_with("deny"));
                    let verdict = if deny {
                        Err(reply!(554, 5, 7, 1, "Relay access denied"))
                    } else {
                        Ok(())
                    };
                    self.s.answer_recipient(self.now, verdict);
                    answered = true;
                }
                Event::Message(m) => {
                    let verdict = match &self.store_failure {
                        Some(r) => Err(r.clone()),
                        None => {
                            self.stored.push(*m);
                            Ok(format!("ID{}", self.stored.len()))
                        }
                    };
                    self.s.answer_message(self.now, verdict);
                    answered = true;
                }
                Event::StartTls => self.starttls_events += 1,
                Event::Rejected { stage, code } => self.rejected.push((stage, code)),
            }
        }
        answered
    }

    fn greeting(&mut self) -> String {
        self.send(b"")
    }

    fn ehlo(&mut self) {
        let g = self.greeting();
        assert!(g.starts_with("220 "), "{g}");
        let r = self.send(b"EHLO client.example\r\n");
        assert!(r.starts_with("250-"), "{r}");
    }
}

/// Every reply line in `out` (after the greeting and EHLO) carries an
/// enhanced code whose class matches the reply code.
fn assert_enhanced(out: &str) {
    for line in out.split("\r\n").filter(|l| !l.is_empty()) {
        let code = &line[..3];
        if code == "354" {
            continue;
        }
        let enhanced = line[4..].split(' ').next().unwrap();
        let class = enhanced.split('.').next().unwrap();
        assert_eq!(
            &code[..1],
            class,
            "enhanced code class mismatch in {line:?}"
        );
        assert!(
            EnhancedCodeCheck::ok(enhanced),
            "bad enhanced code in {line:?}"
        );
    }
}

struct EnhancedCodeCheck;
impl EnhancedCodeCheck {
    fn ok(s: &str) -> bool {
        crate::smtp::reply::EnhancedCode::parse(s).is_some()
    }
}

fn codes(out: &str) -> Vec<&str> {
    out.split("\r\n")
        .filter(|l| l.len() >= 4 && &l[3..4] == " ")
        .map(|l| &l[..3])
        .collect()
}

#[test]
fn greeting_and_ehlo_keywords() {
    let mut h = Harness::new();
    assert_eq!(h.greeting(), "220 localhost ESMTP Sluice\r\n");
    let r = h.send(b"EHLO client.example\r\n");
    for kw in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "SMTPUTF8",
        "DSN",
    ] {
        assert!(
            r.contains(&format!("250-{kw}\r\n")) || r.contains(&format!("250 {kw}\r\n")),
            "{kw} missing: {r}"
        );
    }
    assert!(
        !r.contains("STARTTLS"),
        "STARTTLS advertised without TLS: {r}"
    );
    assert!(
        !r.contains("AUTH"),
        "AUTH advertised without mechanisms: {r}"
    );
    assert!(r.starts_with("250-localhost\r\n"));
}

#[test]
fn starttls_and_auth_advertised_only_when_available() {
    let mut h = Harness::with(SessionConfig::default(), true);
    h.s.peer.auth_mechanisms = vec!["PLAIN".into(), "LOGIN".into()];
    h.greeting();
    let r = h.send(b"EHLO x\r\n");
    assert!(
        r.contains("250-STARTTLS\r\n") || r.contains("250 STARTTLS\r\n"),
        "{r}"
    );
    assert!(r.contains("AUTH PLAIN LOGIN"), "{r}");
    let help = h.send(b"HELP\r\n");
    assert!(
        help.contains(" STARTTLS") && help.contains(" AUTH"),
        "{help}"
    );
}

#[test]
fn helo_gives_single_line() {
    let mut h = Harness::new();
    h.greeting();
    assert_eq!(h.send(b"HELO client\r\n"), "250 localhost\r\n");
}

#[test]
fn full_transaction_stores_unstuffed_body() {
    let mut h = Harness::new();
    h.ehlo();
    let mut all = String::new();
    all += &h.send(b"MAIL FROM:<a@example.com>\r\n");
    all += &h.send(b"RCPT TO:<b@example.net>\r\n");
    all += &h.send(b"DATA\r\n");
    assert!(
        all.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
        "{all}"
    );
    let r = h.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n");
    assert_eq!(r, "250 2.0.0 Ok: queued as ID1\r\n");
    let m = &h.stored[0];
    assert_eq!(m.body, b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(
        m.mail.from,
        ReversePath::Address(Address::parse("a@example.com").unwrap())
    );
    assert_eq!(m.recipients.len(), 1);
    assert_eq!(m.protocol, "ESMTP");
    assert_eq!(h.send(b"QUIT\r\n"), "221 2.0.0 Bye\r\n");
    assert!(h.s.is_closed());
}

#[test]
fn pipelined_batch_is_answered_in_order_in_one_write() {
    let mut h = Harness::new();
    h.ehlo();
    let r = h.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<deny@example.org>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n",
    );
    assert_eq!(codes(&r), ["250", "250", "554", "250", "354"], "{r}");
    let r = h.send(b"hello\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<x@y.example>\r\nNOOP\r\n");
    assert_eq!(codes(&r), ["250", "250", "250", "250"], "{r}");
    assert_eq!(h.stored[0].recipients.len(), 2);
}

#[test]
fn message_text_before_354_is_pipelining_abuse() {
    let mut h = Harness::new();
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n");
    assert!(
        r.ends_with("554 5.5.0 Error: improper use of SMTP command pipelining\r\n"),
        "{r}"
    );
    assert!(h.s.is_closed());
    assert!(h.stored.is_empty());
}

#[test]
fn talking_before_the_greeting_disconnects() {
    let cfg = SessionConfig {
        greeting_delay: Duration::from_millis(500),
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    assert_eq!(h.greeting(), "", "greeting must wait for the delay");
    let r = h.send(b"EHLO early\r\n");
    assert!(r.starts_with("554 5.5.0 "), "{r}");
    assert!(h.s.is_closed());
}

#[test]
fn delayed_greeting_comes_at_the_timeout() {
    let cfg = SessionConfig {
        greeting_delay: Duration::from_millis(500),
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    let at = h.s.poll_timeout().unwrap();
    h.now = at;
    h.s.handle_timeout(at);
    assert!(h.send(b"").starts_with("220 "));
    assert!(h.send(b"EHLO ok\r\n").starts_with("250-"));
}

#[test]
fn command_order_is_enforced() {
    let mut h = Harness::new();
    h.greeting();
    let cases: &[(&[u8], &str)] = &[
        (
            b"MAIL FROM:<a@b.example>\r\n",
            "503 5.5.1 Error: send HELO/EHLO first\r\n",
        ),
        (
            b"RCPT TO:<a@b.example>\r\n",
            "503 5.5.1 Error: need MAIL command\r\n",
        ),
        (b"DATA\r\n", "503 5.5.1 Error: need MAIL command\r\n"),
    ];
    for (cmd, want) in cases {
        assert_eq!(&h.send(cmd), want);
    }
    h.send(b"EHLO x\r\n");
    h.send(b"MAIL FROM:<a@b.example>\r\n");
    assert_eq!(
        h.send(b"MAIL FROM:<a@b.example>\r\n"),
        "503 5.5.1 Error: nested MAIL command\r\n"
    );
    assert_eq!(
        h.send(b"DATA\r\n"),
        "554 5.5.1 Error: no valid recipients\r\n"
    );
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 Ok\r\n");
    assert_eq!(
        h.send(b"RCPT TO:<a@b.example>\r\n"),
        "503 5.5.1 Error: need MAIL command\r\n"
    );
}

#[test]
fn unknown_verb_and_bad_syntax() {
    let mut h = Harness::new();
    h.ehlo();
    assert!(h.send(b"FROB\r\n").starts_with("500 5.5.1 "));
    assert!(h.send(b"MAIL FROM:a@b\r\n").starts_with("501 "));
    assert!(
        h.send(b"NOOP\r\n").starts_with("250 2.0.0"),
        "session goes on"
    );
}

#[test]
fn long_command_line_is_rejected_and_session_goes_on() {
    let mut h = Harness::new();
    h.ehlo();
    let mut line = b"NOOP ".to_vec();
    line.resize(600, b'x');
    line.extend_from_slice(b"\r\n");
    let r = h.send(&line);
    assert_eq!(
        r,
        "500 5.5.2 Error: command line too long (limit 512 octets)\r\n"
    );
    assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
    // Exactly at the limit (512 with CRLF) is fine.
    let mut line = b"NOOP ".to_vec();
    line.resize(510, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(h.send(&line), "250 2.0.0 Ok\r\n");
}

#[test]
fn ten_megabyte_line_does_not_grow_memory() {
    let mut h = Harness::new();
    h.ehlo();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..160 {
        assert_eq!(h.send(&chunk), "");
        assert!(
            h.s.line.capacity() <= 4096,
            "line buffer grew to {}",
            h.s.line.capacity()
        );
    }
    let r = h.send(b"\r\nNOOP\r\n");
    assert_eq!(codes(&r), ["500", "250"], "{r}");
}

#[test]
fn line_split_across_reads_is_reassembled() {
    let mut h = Harness::new();
    h.ehlo();
    assert_eq!(h.send(b"MAIL FROM:<a@exa"), "");
    assert_eq!(h.send(b"mple.com>\r"), "");
    assert_eq!(h.send(b"\n"), "250 2.1.0 Ok\r\n");
}

#[test]
fn too_many_recipients() {
    let cfg = SessionConfig {
        max_recipients: 2,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<1@c.example>\r\nRCPT TO:<2@c.example>\r\nRCPT TO:<3@c.example>\r\n");
    assert_eq!(codes(&r), ["250", "250", "250", "452"], "{r}");
    assert!(r.contains("452 4.5.3 "));
}

#[test]
fn declared_size_too_big_at_mail() {
    let cfg = SessionConfig {
        max_message_size: 1000,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n");
    assert!(r.starts_with("552 5.3.4 "), "{r}");
    assert!(h
        .send(b"MAIL FROM:<a@b.example> SIZE=1000\r\n")
        .starts_with("250 2.1.0"));
}

#[test]
fn body_over_size_rejected_at_the_dot_without_buffering() {
    let cfg = SessionConfig {
        max_message_size: 1000,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    let line = [b'x'; 98];
    for _ in 0..1000 {
        let mut l = line.to_vec();
        l.extend_from_slice(b"\r\n");
        assert_eq!(h.send(&l), "");
    }
    let body_cap = h.s.tx.as_ref().unwrap().body.capacity();
    assert!(body_cap <= 4096, "body buffered past the limit: {body_cap}");
    let r = h.send(b".\r\n");
    assert!(r.starts_with("552 5.3.4 "), "{r}");
    assert!(h.stored.is_empty());
    assert!(h.send(b"NOOP\r\n").starts_with("250"), "session goes on");
}

#[test]
fn max_errors_closes_with_421() {
    let cfg = SessionConfig {
        max_errors: 3,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    let r = h.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n");
    assert_eq!(codes(&r), ["500", "500", "500", "421"], "{r}");
    assert!(r.ends_with("421 4.7.0 localhost Error: too many errors\r\n"));
    assert!(h.s.is_closed());
}

#[test]
fn simple_commands() {
    let mut h = Harness::new();
    h.ehlo();
    assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
    assert_eq!(h.send(b"rset\r\n"), "250 2.0.0 Ok\r\n");
    assert!(h.send(b"VRFY postmaster\r\n").starts_with("252 2.5.0 "));
    let help = h.send(b"HELP\r\n");
    assert!(help.starts_with("214 2.0.0 "), "{help}");
    // Regression: HELP named STARTTLS although EHLO did not offer it.
    assert!(
        !help.contains("STARTTLS") && !help.contains("AUTH"),
        "{help}"
    );
    assert!(h.send(b"EXPN list\r\n").starts_with("502 5.5.1 "));
    assert!(h.send(b"AUTH PLAIN\r\n").starts_with("503 5.5.1 "));
    assert!(h.send(b"STARTTLS\r\n").starts_with("502 5.5.1 "));
    assert_eq!(h.send(b"QUIT\r\n"), "221 2.0.0 Bye\r\n");
}

#[test]
fn every_reply_after_ehlo_has_a_matching_enhanced_code() {
    let mut h = Harness::new();
    h.ehlo();
    let mut out = String::new();
    for cmd in [
        &b"NOOP\r\n"[..],
        b"FROB\r\n",
        b"MAIL FROM:<bad\r\n",
        b"RCPT TO:<x@y.example>\r\n",
        b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
        b"RCPT TO:<deny@y.example>\r\n",
        b"RCPT TO:<\xc3\xa9@y.example>\r\n",
        b"RCPT TO:<ok@y.example>\r\n",
        b"BDAT 3\r\nabc",
        b"DATA\r\n",
        b"BDAT 0 LAST\r\n",
        b"VRFY x\r\n",
        b"RSET\r\n",
        b"QUIT\r\n",
    ] {
        out += &h.send(cmd);
    }
    assert_enhanced(&out);
}

#[test]
fn utf8_recipient_needs_smtputf8() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\n");
    let r = h.send("RCPT TO:<j\u{f6}rg@b\u{fc}cher.example>\r\n".as_bytes());
    assert!(r.starts_with("553 5.6.7 "), "{r}");
    h.send(b"RSET\r\n");
    h.send(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n");
    let r = h.send("RCPT TO:<j\u{f6}rg@b\u{fc}cher.example>\r\n".as_bytes());
    assert_eq!(r, "250 2.1.5 Ok\r\n");
    h.send(b"DATA\r\n");
    h.send(b"x\r\n.\r\n");
    assert_eq!(h.stored[0].protocol, "UTF8SMTP");
}

#[test]
fn relay_denied_recipient_and_no_valid_recipients() {
    let mut h = Harness::new();
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<deny@evil.example>\r\n");
    assert_eq!(codes(&r), ["250", "554"]);
    assert!(r.contains("554 5.7.1 Relay access denied"));
    assert_eq!(
        h.send(b"DATA\r\n"),
        "554 5.5.1 Error: no valid recipients\r\n"
    );
    assert!(h.rejected.contains(&(Stage::Rcpt, 554)));
}

#[test]
fn bdat_chunks_make_one_message() {
    let mut h = Harness::new();
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 7\r\nSubjectBDAT 11 LAST\r\n: x\r\n\r\nhi\r\n");
    assert_eq!(codes(&r), ["250", "250", "250", "250"], "{r}");
    assert!(r.contains("250 2.0.0 Ok: 7 octets received\r\n"));
    assert!(r.ends_with("250 2.0.0 Ok: queued as ID1\r\n"));
    assert_eq!(h.stored[0].body, b"Subject: x\r\n\r\nhi\r\n");
}

#[test]
fn bdat_chunk_split_across_reads_and_dots_are_literal() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    assert_eq!(h.send(b"BDAT 9 LAST\r\n.\r\n"), "");
    let r = h.send(b"..x\r\n.");
    assert_eq!(r, "250 2.0.0 Ok: queued as ID1\r\n");
    // BDAT is not dot-stuffed; the final line got its missing CRLF.
    assert_eq!(h.stored[0].body, b".\r\n..x\r\n.\r\n");
}

#[test]
fn bdat_zero_last_ends_the_message() {
    let mut h = Harness::new();
    h.ehlo();
    let r = h.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 4\r\nab\r\nBDAT 0 LAST\r\n",
    );
    assert!(r.ends_with("250 2.0.0 Ok: queued as ID1\r\n"), "{r}");
    assert_eq!(h.stored[0].body, b"ab\r\n");
}

#[test]
fn data_after_bdat_is_503() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 2\r\nab");
    assert_eq!(h.send(b"DATA\r\n"), "503 5.5.1 Error: DATA after BDAT\r\n");
}

#[test]
fn bdat_without_transaction_swallows_its_chunk() {
    let mut h = Harness::new();
    h.ehlo();
    let r = h.send(b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        codes(&r),
        ["503", "250"],
        "chunk octets must not run as commands: {r}"
    );
    assert!(!h.s.is_closed());
}

#[test]
fn bdat_over_size_is_discarded_and_rejected() {
    let cfg = SessionConfig {
        max_message_size: 10,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    let r = h.send(b"BDAT 20 LAST\r\n0123456789012345678\n");
    assert!(r.starts_with("552 5.3.4 "), "{r}");
    assert!(h.stored.is_empty());
    assert!(h.send(b"NOOP\r\n").starts_with("250"));
}

#[test]
fn command_timeout_closes_with_421() {
    let mut h = Harness::new();
    h.ehlo();
    let deadline = h.s.poll_timeout().unwrap();
    assert_eq!(deadline, h.now + Duration::from_secs(300));
    h.s.handle_timeout(deadline - Duration::from_secs(1));
    assert!(!h.s.is_closed(), "not before the deadline");
    h.now = deadline;
    h.s.handle_timeout(deadline);
    assert!(h.send(b"").starts_with("421 4.4.2 "));
    assert!(h.s.is_closed());
}

#[test]
fn data_timeout_is_used_inside_data() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(180)));
}

#[test]
fn shutdown_when_idle_says_421_at_once() {
    let mut h = Harness::new();
    h.ehlo();
    h.s.shutdown(h.now);
    let r = h.send(b"");
    assert!(r.starts_with("421 4.3.2 "), "{r}");
    assert!(h.s.is_closed());
}

#[test]
fn shutdown_lets_the_transaction_in_flight_finish() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.s.shutdown(h.now);
    assert_eq!(
        h.send(b"DATA\r\n"),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    let r = h.send(b"hi\r\n.\r\n");
    assert_eq!(codes(&r), ["250", "421"], "{r}");
    assert_eq!(h.stored.len(), 1);
    assert!(h.s.is_closed());
}

#[test]
fn store_failure_is_passed_through() {
    let mut h = Harness::new();
    h.store_failure = Some(reply!(452, 4, 3, 1, "Insufficient system storage"));
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    assert_eq!(
        h.send(b"x\r\n.\r\n"),
        "452 4.3.1 Insufficient system storage\r\n"
    );
    // The transaction is over; a new one can start.
    assert!(h.send(b"MAIL FROM:<a@b.example>\r\n").starts_with("250"));
}

#[test]
fn starttls_rules() {
    let mut h = Harness::with(SessionConfig::default(), true);
    h.greeting();
    assert!(
        h.send(b"STARTTLS\r\n").starts_with("503 5.5.1 "),
        "needs EHLO"
    );
    h.send(b"EHLO x\r\n");
    assert_eq!(h.send(b"STARTTLS\r\n"), "220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(h.starttls_events, 1);
    assert!(!h.s.wants_input());
    h.s.answer_starttls(h.now, true);
    assert!(
        h.send(b"MAIL FROM:<a@b.example>\r\n").starts_with("503"),
        "EHLO again after TLS"
    );
    let r = h.send(b"EHLO x\r\n");
    assert!(!r.contains("STARTTLS"), "{r}");
}

#[test]
fn plaintext_pipelined_after_starttls_is_refused() {
    let mut h = Harness::with(SessionConfig::default(), true);
    h.ehlo();
    let r = h.send(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n");
    assert!(r.starts_with("554 5.5.0 "), "{r}");
    assert!(h.s.is_closed());
    assert_eq!(h.starttls_events, 0);
}

#[test]
fn bare_lf_normalized_by_default_and_rejected_by_policy() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    let r = h.send(b"a\nb\r\n.\n.\r\n\r\n.\r\n");
    assert!(r.starts_with("250 "), "{r}");
    // The dot opening "\r\n.\n" is at a line start and is unstuffed; the dot
    // after the bare LF is not at a line start and stays. Nothing ended early.
    assert_eq!(h.stored[0].body, b"a\r\nb\r\n\r\n.\r\n\r\n");

    let cfg = SessionConfig {
        line_endings: LineEndingPolicy::Reject,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    let r = h.send(b"a\nb\r\n.\r\n");
    assert!(r.starts_with("550 5.6."), "{r}");
    assert!(h.stored.is_empty());
}

#[test]
fn long_body_line_rejected_and_session_goes_on() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    let mut body = vec![b'x'; 999];
    body.extend_from_slice(b"\r\n.\r\n");
    let r = h.send(&body);
    assert!(r.starts_with("550 5.6."), "{r}");
    assert!(h.send(b"NOOP\r\n").starts_with("250"));
}

#[test]
fn bytewise_feeding_gives_the_same_dialogue() {
    let script: &[u8] = b"EHLO x\r\nMAIL FROM:<a@b.example> SIZE=100\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<deny@d.example>\r\n";
    let tail: &[u8] = b"DATA\r\n";
    let body: &[u8] = b"x\r\n..y\r\n.\r\nBDAT 1\r\nQUIT\r\n";
    let mut a = Harness::new();
    a.greeting();
    let mut out_a = a.send(script);
    out_a += &a.send(tail);
    out_a += &a.send(body);
    let mut b = Harness::new();
    b.greeting();
    let mut out_b = b.send_bytewise(script);
    out_b += &b.send_bytewise(tail);
    out_b += &b.send_bytewise(body);
    assert_eq!(out_a, out_b);
    assert_eq!(a.stored[0].body, b.stored[0].body);
}

#[test]
fn received_header_names_single_recipient_only() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    h.send(b"x\r\n.\r\n");
    let hdr = h.stored[0].received_header("mx.example", "ID1", "Sun, 22 Nov 2026 04:00:00 +0000");
    assert_eq!(
        hdr,
        "Received: from client.example ([192.0.2.7])\r\n\tby mx.example (Sluice) with ESMTP id ID1\r\n\tfor <c@d.example>;\r\n\tSun, 22 Nov 2026 04:00:00 +0000\r\n"
    );
}

#[test]
fn received_header_quotes_a_helo_that_is_not_a_host() {
    for (helo, from) in [
        ("client.example", "from client.example ([192.0.2.7])"),
        ("[192.0.2.9]", "from [192.0.2.9] ([192.0.2.7])"),
        ("a(b", "from [192.0.2.7] ([192.0.2.7] helo=a\\(b)"),
        ("x;y)", "from [192.0.2.7] ([192.0.2.7] helo=x;y\\))"),
    ] {
        let mut h = Harness::new();
        h.greeting();
        h.send(format!("EHLO {helo}\r\n").as_bytes());
        h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n");
        h.send(b"x\r\n.\r\n");
        let hdr = h.stored[0].received_header("mx.example", "ID1", "date");
        assert!(
            hdr.starts_with(&format!("Received: {from}\r\n")),
            "{helo}: {hdr}"
        );
    }
}

#[test]
fn eof_mid_data_stores_nothing() {
    let mut h = Harness::new();
    h.ehlo();
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    h.send(b"DATA\r\n");
    h.send(b"partial\r\n");
    h.s.handle_eof(h.now);
    assert!(h.s.is_closed());
    assert!(h.stored.is_empty());
}

#[test]
fn smuggling_variants_never_end_data_in_a_session() {
    // Each variant is followed by a pipelined "second message"; if the variant
    // ended the data, that text would run as commands and be stored on its own.
    let variants: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n\0.\r\n",
    ];
    for variant in variants {
        let name = String::from_utf8_lossy(variant).escape_debug().to_string();
        let mut h = Harness::new();
        h.ehlo();
        h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
        assert!(h.send(b"DATA\r\n").starts_with("354 "), "{name}");
        let mut body = b"Subject: x\r\n\r\nhello".to_vec();
        body.extend_from_slice(variant);
        body.extend_from_slice(
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nsmuggled\r\n.\r\n",
        );
        let r = h.send(&body);
        assert_eq!(codes(&r), ["250"], "{name}: {r}");
        assert_eq!(h.stored.len(), 1, "{name}");
        let stored = &h.stored[0];
        assert_eq!(stored.recipients.len(), 1, "{name}");
        let text = String::from_utf8_lossy(&stored.body);
        assert!(
            text.contains("MAIL FROM:<evil@x.example>") && text.ends_with("smuggled\r\n"),
            "{name}: the smuggled text must stay in the first message: {text:?}"
        );
    }
}

#[test]
fn a_state_waiting_for_the_driver_consumes_nothing() {
    let now = Instant::now();
    let peer = PeerInfo::plain("192.0.2.7:40000".parse().unwrap());
    let mut s = Session::new(Arc::new(SessionConfig::default()), peer, now);
    let mut out = Vec::new();
    s.write_output(&mut out);
    let ehlo = b"EHLO x\r\n";
    assert_eq!(s.handle_input(now, ehlo), ehlo.len());
    let mail = b"MAIL FROM:<a@b.example>\r\n";
    let rcpt1 = b"RCPT TO:<c@d.example>\r\n";
    let rest = b"RCPT TO:<e@d.example>\r\nNOOP\r\n";
    let batch = [&mail[..], rcpt1, rest].concat();
    // Everything up to the first RCPT is taken, then the session waits.
    let n = s.handle_input(now, &batch);
    assert_eq!(n, mail.len() + rcpt1.len());
    assert!(matches!(s.poll_event(), Some(Event::CheckRecipient { .. })));
    assert!(!s.wants_input());
    assert_eq!(
        s.handle_input(now, &batch[n..]),
        0,
        "no input while waiting"
    );
    s.answer_recipient(now, Ok(()));
    assert!(s.wants_input());
    let m = s.handle_input(now, &batch[n..]);
    assert_eq!(m, b"RCPT TO:<e@d.example>\r\n".len());
    assert_eq!(s.handle_input(now, &batch[n + m..]), 0);
    s.answer_recipient(now, Ok(()));
    assert_eq!(s.handle_input(now, &batch[n + m..]), b"NOOP\r\n".len());
    out.clear();
    s.write_output(&mut out);
    let out = String::from_utf8(out).unwrap();
    assert_eq!(codes(&out), ["250", "250", "250", "250", "250"], "{out}");
}

#[test]
fn command_line_limit_is_exact_and_configurable() {
    for limit in [512usize, 64] {
        let cfg = SessionConfig {
            max_command_line: limit,
            ..Default::default()
        };
        let mut h = Harness::with(cfg, false);
        h.ehlo();
        let line = |len: usize| {
            let mut l = b"NOOP ".to_vec();
            l.resize(len - 2, b'x');
            l.extend_from_slice(b"\r\n");
            l
        };
        assert_eq!(h.send(&line(limit)), "250 2.0.0 Ok\r\n", "limit {limit}");
        let r = h.send(&line(limit + 1));
        assert_eq!(
            r,
            format!("500 5.5.2 Error: command line too long (limit {limit} octets)\r\n")
        );
        // Split across reads, still counted as one line.
        let long = line(limit + 1);
        let (a, b) = long.split_at(limit / 2);
        assert_eq!(h.send(a), "");
        assert!(h.send(b).starts_with("500 5.5.2 "));
        assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 Ok\r\n", "session goes on");
    }
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = SessionConfig::default();
    assert_eq!(c.max_command_line, 512);
    assert_eq!(c.max_recipients, 1000);
    assert_eq!(c.max_errors, 20);
    assert_eq!(c.max_line_length, 998);
    assert_eq!(c.line_endings, LineEndingPolicy::Normalize);
    assert_eq!(c.command_timeout, Duration::from_secs(300));
    assert_eq!(c.data_timeout, Duration::from_secs(180));
    let d = crate::smtp::data::DataLimits::default();
    assert_eq!(d.max_line_length, 998);
    assert_eq!(d.line_endings, LineEndingPolicy::Normalize);
}

#[test]
fn data_phase_rejections_carry_matching_enhanced_codes() {
    let cfg = SessionConfig {
        max_message_size: 100,
        max_line_length: 50,
        line_endings: LineEndingPolicy::Reject,
        max_errors: 6,
        ..Default::default()
    };
    let mut h = Harness::with(cfg, false);
    h.ehlo();
    let mut out = String::new();
    let tx = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n";
    for body in [
        vec![b'x'; 200],      // too big: 552 5.3.4
        [b'y'; 60].to_vec(),  // line too long: 550 5.6.0
        b"bare\nlf".to_vec(), // bare LF under reject: 550 5.6.0
    ] {
        out += &h.send(tx);
        out += &h.send(b"DATA\r\n");
        let mut b = body;
        b.extend_from_slice(b"\r\n.\r\n");
        out += &h.send(&b);
    }
    out += &h.send(b"MAIL FROM:<a@b.example> SIZE=101\r\n");
    out += &h.send(b"FOO\r\nBAR\r\nBAZ\r\n");
    let codes_seen = codes(&out);
    for want in ["552", "550", "421"] {
        assert!(codes_seen.contains(&want), "{want} missing: {out}");
    }
    assert!(h.s.is_closed());
    assert!(h.stored.is_empty());
    assert_enhanced(&out);
}
