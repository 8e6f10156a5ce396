//! DSN tests. The message is parsed back with a small MIME walker written
//! here from RFC 5322 / RFC 2046 (independent of the builder's code), and
//! cross-checked with the `mail-parser` crate.

use super::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// A small, strict parser for what `build` produces.

/// A header field: name and unfolded value (CRLF + WSP -> WSP, RFC 5322 §2.2.3).
type Field = (String, String);

#[derive(Debug)]
struct Entity<'a> {
    fields: Vec<Field>,
    body: &'a [u8],
}

impl Entity<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Header fields up to the empty line, then the body. Panics on anything
/// malformed: a line without a colon, a continuation before any field.
fn parse_entity(bytes: &[u8]) -> Entity<'_> {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &bytes[pos..];
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("header line ends with CRLF");
        let line = std::str::from_utf8(&rest[..end]).expect("header is UTF-8");
        pos += end + 2;
        if line.is_empty() {
            break;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            let last = fields.last_mut().expect("continuation after a field");
            last.1.push_str(line);
        } else {
            let (name, value) = line.split_once(':').expect("field has a colon");
            assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()));
            fields.push((name.to_owned(), value.to_owned()));
        }
    }
    for f in &mut fields {
        f.1 = f.1.trim().to_owned();
    }
    Entity {
        fields,
        body: &bytes[pos..],
    }
}

/// A parameter of a structured field such as Content-Type (quotes removed).
fn param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// RFC 2046 §5.1.1: body parts between `CRLF--boundary` delimiters (the
/// CRLF belongs to the delimiter), the last followed by `--`.
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delim = format!("\r\n--{boundary}");
    let mut work = Vec::with_capacity(body.len() + 2);
    work.extend_from_slice(b"\r\n");
    work.extend_from_slice(body);
    let finder = memchr::memmem::Finder::new(delim.as_bytes());
    let hits: Vec<usize> = finder.find_iter(&work).collect();
    assert!(hits.len() >= 2, "at least one part");
    let mut parts = Vec::new();
    for (k, &h) in hits.iter().enumerate() {
        let after = h + delim.len();
        let tail = &work[after..];
        if tail.starts_with(b"--") {
            assert_eq!(k, hits.len() - 1, "close delimiter is the last one");
            assert_eq!(&tail[2..], b"\r\n", "nothing after the close delimiter");
            break;
        }
        assert!(tail.starts_with(b"\r\n"), "delimiter line ends with CRLF");
        let start = after + 2;
        let end = *hits.get(k + 1).expect("a part is followed by a delimiter");
        // Offsets in `work` are one CRLF ahead of `body`.
        parts.push(&body[start - 2..end - 2]);
    }
    parts
}

/// The groups of a delivery-status body: per-message, then per-recipient.
fn status_groups(body: &[u8]) -> Vec<Vec<Field>> {
    let text = std::str::from_utf8(body).expect("status is UTF-8");
    let text = text
        .strip_suffix("\r\n")
        .expect("last field ends with CRLF");
    text.split("\r\n\r\n")
        .map(|group| {
            let mut g = group.to_owned();
            g.push_str("\r\n\r\n");
            let e = parse_entity(g.as_bytes());
            assert!(e.body.is_empty(), "no empty line inside a group");
            assert!(!e.fields.is_empty(), "no empty group");
            e.fields
        })
        .collect()
}

fn field<'a>(group: &'a [Field], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// CRLF only, no line over 998 octets (without its CRLF).
fn assert_well_formed_lines(msg: &[u8]) {
    assert!(msg.ends_with(b"\r\n"));
    let mut start = 0;
    for (i, &b) in msg.iter().enumerate() {
        match b {
            b'\n' => {
                assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
                assert!(i - 1 - start <= 998, "line of {} octets", i - 1 - start);
                start = i + 1;
            }
            b'\r' => assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            _ => {}
        }
    }
}

/// The three parts, after checking the top-level structure.
struct Parsed<'a> {
    top: Entity<'a>,
    text: Entity<'a>,
    status: Entity<'a>,
    original: Entity<'a>,
    boundary: String,
}

fn parse_dsn(msg: &[u8]) -> Parsed<'_> {
    assert_well_formed_lines(msg);
    let top = parse_entity(msg);
    let ct = top.get("Content-Type").expect("Content-Type");
    assert!(ct.starts_with("multipart/report;"), "{ct}");
    assert_eq!(param(ct, "report-type").as_deref(), Some("delivery-status"));
    let boundary = param(ct, "boundary").expect("boundary");
    assert!(!boundary.is_empty() && boundary.len() <= 70);
    let parts = split_multipart(top.body, &boundary);
    assert_eq!(parts.len(), 3, "three parts");
    let [text, status, original] = [parts[0], parts[1], parts[2]].map(parse_entity);
    Parsed {
        top,
        text,
        status,
        original,
        boundary,
    }
}

// ---------------------------------------------------------------------------
// Fixtures.

const HOST: &str = "mx1.sluice.test";

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn id(n: u64) -> SpoolId {
    SpoolId::from_u64(n)
}

fn envelope() -> Envelope {
    Envelope {
        id: id(0x0123_4567_89AB_CDEF),
        sender: "alice@example.org".into(),
        recipients: vec![
            Recipient {
                address: "bob@example.net".into(),
                notify: None,
                orcpt: Some("rfc822;Bob@Example.NET".into()),
                state: RecipientState::Failed {
                    at_ms: 1_709_251_000_000,
                    reply: "550 5.1.1 <bob@example.net>: Recipient address rejected".into(),
                },
                remote_mta: None,
            },
            Recipient {
                address: "carol@example.net".into(),
                notify: Some("SUCCESS,FAILURE".into()),
                orcpt: None,
                state: RecipientState::Delivered {
                    at_ms: 1_709_251_000_000,
                    reply: "250 2.0.0 Ok".into(),
                },
                remote_mta: None,
            },
        ],
        received_at_ms: 1_709_250_000_000,
        size: 0,
        body_8bit: false,
        smtputf8: false,
        ret_full: None,
        envid: Some("QQ314159".into()),
        client_ip: Some("192.0.2.7".into()),
        helo: Some("client.example.org".into()),
    }
}

const ORIGINAL: &[u8] = b"Received: from client.example.org ([192.0.2.7])\r\n\
\tby mx1.sluice.test (Sluice) with ESMTP id 028T5CY4TQKFF\r\n\
From: Alice <alice@example.org>\r\n\
To: Bob <bob@example.net>\r\n\
Subject: Lunch\r\n\
Message-ID: <lunch-1@example.org>\r\n\
\r\n\
Shall we meet at noon?\r\n\
-- \r\n\
Alice\r\n";

fn failed(addr: &str, reply: Reply) -> DsnRecipient {
    DsnRecipient {
        address: addr.into(),
        orcpt: None,
        action: Action::Failed,
        reply,
        status: None,
        remote_host: Some("mx.example.net".into()),
        remote_ip: Some("192.0.2.25".parse().unwrap()),
        last_attempt: Some(t(1_709_251_000)),
        will_retry_until: None,
    }
}

fn bob() -> DsnRecipient {
    DsnRecipient {
        orcpt: Some("rfc822;Bob@Example.NET".into()),
        ..failed(
            "bob@example.net",
            reply_from_text(
                "550 5.1.1 <bob@example.net>: Recipient address rejected",
                true,
            ),
        )
    }
}

fn input<'a>(env: &'a Envelope, rcpts: &'a [DsnRecipient], original: &'a [u8]) -> DsnInput<'a> {
    DsnInput {
        hostname: HOST,
        dsn_id: id(0x0FED_CBA9_8765_4321),
        date: t(1_709_251_199),
        envelope: env,
        recipients: rcpts,
        original,
        return_size_limit: DEFAULT_RETURN_SIZE_LIMIT,
    }
}

// ---------------------------------------------------------------------------
// Structure and fields.

#[test]
fn failure_dsn_structure_and_fields() {
    let env = envelope();
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).expect("a DSN");
    assert!(!dsn.body_8bit && !dsn.smtputf8);
    assert!(dsn.message.is_ascii());
    let p = parse_dsn(&dsn.message);

    assert_eq!(
        p.top.get("From"),
        Some("Mail Delivery System <MAILER-DAEMON@mx1.sluice.test>")
    );
    assert_eq!(p.top.get("To"), Some("<alice@example.org>"));
    assert_eq!(
        p.top.get("Subject"),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(p.top.get("Date"), Some("Thu, 29 Feb 2024 23:59:59 +0000"));
    let mid = p.top.get("Message-ID").unwrap();
    assert!(
        mid.starts_with('<') && mid.ends_with("@mx1.sluice.test>"),
        "{mid}"
    );
    assert_eq!(p.top.get("Auto-Submitted"), Some("auto-replied"));
    assert_eq!(p.top.get("MIME-Version"), Some("1.0"));
    for name in [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
    ] {
        assert_eq!(p.top.all(name).len(), 1, "{name} exactly once");
    }
    assert_eq!(p.top.fields.len(), 8, "no other top-level field");

    // Part 1: text naming the recipient and the remote reply.
    assert_eq!(
        p.text.get("Content-Type"),
        Some("text/plain; charset=us-ascii")
    );
    let text = std::str::from_utf8(p.text.body).unwrap();
    let unwrapped = text.replace("\r\n    ", " ");
    assert!(
        unwrapped.contains(
            "<bob@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1 \
             <bob@example.net>: Recipient address rejected"
        ),
        "{text}"
    );
    assert!(text.contains("This is the mail system at host mx1.sluice.test."));

    // Part 2: the delivery status.
    assert_eq!(
        p.status.get("Content-Type"),
        Some("message/delivery-status")
    );
    let groups = status_groups(p.status.body);
    assert_eq!(groups.len(), 2);
    let m = &groups[0];
    assert_eq!(field(m, "Original-Envelope-Id"), Some("QQ314159"));
    assert_eq!(field(m, "Reporting-MTA"), Some("dns; mx1.sluice.test"));
    assert_eq!(
        field(m, "Received-From-MTA"),
        Some("dns; client.example.org ([192.0.2.7])")
    );
    assert_eq!(
        field(m, "Arrival-Date"),
        Some("Thu, 29 Feb 2024 23:40:00 +0000")
    );
    assert_eq!(field(m, "X-Sluice-Queue-ID"), Some(&*env.id.to_string()));
    assert_eq!(m[0].0, "Original-Envelope-Id", "RFC 3464 §2.2 order");
    assert_eq!(m[1].0, "Reporting-MTA");
    let r = &groups[1];
    let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Original-Recipient",
            "Final-Recipient",
            "Action",
            "Status",
            "Remote-MTA",
            "Diagnostic-Code",
            "Last-Attempt-Date"
        ]
    );
    assert_eq!(
        field(r, "Original-Recipient"),
        Some("rfc822;Bob@Example.NET")
    );
    assert_eq!(field(r, "Final-Recipient"), Some("rfc822; bob@example.net"));
    assert_eq!(field(r, "Action"), Some("failed"));
    assert_eq!(field(r, "Status"), Some("5.1.1"));
    assert_eq!(field(r, "Remote-MTA"), Some("dns; mx.example.net"));
    assert_eq!(
        field(r, "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected")
    );
    assert_eq!(
        field(r, "Last-Attempt-Date"),
        Some("Thu, 29 Feb 2024 23:56:40 +0000")
    );

    // Part 3: the headers only (no RET given), exactly as spooled.
    assert_eq!(p.original.get("Content-Type"), Some("text/rfc822-headers"));
    assert_eq!(
        p.original.get("Content-Description"),
        Some("Undelivered Message Headers")
    );
    let headers_end = ORIGINAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    assert_eq!(p.original.body, &ORIGINAL[..headers_end]);
}

#[test]
fn status_without_enhanced_code_is_derived_from_the_reply_code() {
    let env = envelope();
    let cases = [
        (
            Action::Failed,
            Reply::from_parts(550, None, vec!["no".into()]),
            "5.0.0",
        ),
        (
            Action::Failed,
            Reply::from_parts(421, None, vec!["gone".into()]),
            "4.0.0",
        ),
        // A failure with a success reply cannot happen, but must not say 2.x.x.
        (
            Action::Failed,
            Reply::from_parts(250, None, vec!["ok?".into()]),
            "5.0.0",
        ),
        (
            Action::Delayed,
            Reply::from_parts(451, None, vec!["later".into()]),
            "4.0.0",
        ),
        (
            Action::Delayed,
            reply_from_text("452 4.2.2 full", false),
            "4.2.2",
        ),
        (
            Action::Relayed,
            reply_from_text("250 2.1.5 ok", true),
            "2.1.5",
        ),
    ];
    for (action, reply, want) in cases {
        let mut r = failed("bob@example.net", reply);
        r.action = action;
        let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
        let p = parse_dsn(&dsn.message);
        let groups = status_groups(p.status.body);
        assert_eq!(field(&groups[1], "Status"), Some(want), "{action:?}");
        assert_eq!(field(&groups[1], "Action"), Some(action.as_str()));
    }
    // The override wins when its class fits (expiry: 4.4.7 with the last 4xx).
    let mut r = failed(
        "bob@example.net",
        reply_from_text("451 4.3.0 try later", false),
    );
    r.status = Some(EnhancedCode::new(4, 4, 7));
    assert_eq!(r.status_code().to_string(), "4.4.7");
    r.status = Some(EnhancedCode::new(2, 0, 0));
    assert_eq!(
        r.status_code().to_string(),
        "4.3.0",
        "misfit override ignored"
    );
}

#[test]
fn local_failure_has_no_remote_mta_and_an_x_sluice_diagnostic() {
    let env = envelope();
    let mut r = failed(
        "bob@nowhere.test",
        crate::reply!(550, 5, 1, 2, "Domain nowhere.test does not exist"),
    );
    r.remote_host = None;
    r.remote_ip = None;
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    let g = status_groups(p.status.body);
    assert_eq!(field(&g[1], "Remote-MTA"), None);
    assert_eq!(
        field(&g[1], "Diagnostic-Code"),
        Some("X-Sluice; 550 5.1.2 Domain nowhere.test does not exist")
    );
    assert_eq!(field(&g[1], "Status"), Some("5.1.2"));
    let text = std::str::from_utf8(p.text.body).unwrap();
    assert!(text.contains("<bob@nowhere.test>: 550 5.1.2 Domain nowhere.test does not exist"));
}

#[test]
fn delay_dsn_has_its_subject_and_will_retry_until() {
    let env = envelope();
    let mut r = failed(
        "bob@example.net",
        reply_from_text("451 4.7.1 greylisted", false),
    );
    r.action = Action::Delayed;
    r.will_retry_until = Some(t(1_709_250_000 + 5 * 86_400));
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(
        p.top.get("Subject"),
        Some("Delivery Status Notification (Delay)")
    );
    let g = status_groups(p.status.body);
    assert_eq!(field(&g[1], "Action"), Some("delayed"));
    assert_eq!(field(&g[1], "Status"), Some("4.7.1"));
    assert_eq!(
        field(&g[1], "Will-Retry-Until"),
        Some("Tue, 5 Mar 2024 23:40:00 +0000")
    );
    assert_eq!(
        p.original.get("Content-Description"),
        Some("Delayed Message Headers")
    );
    let text = std::str::from_utf8(p.text.body)
        .unwrap()
        .replace("\r\n", " ");
    assert!(text.contains("keep trying until Tue, 5 Mar 2024 23:40:00 +0000"));
    // Will-Retry-Until only for delayed recipients.
    let mut f = bob();
    f.will_retry_until = Some(t(1));
    let dsn = build(&input(&env, std::slice::from_ref(&f), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(
        field(&status_groups(p.status.body)[1], "Will-Retry-Until"),
        None
    );
}

#[test]
fn mixed_recipients_are_each_reported_in_order() {
    let env = envelope();
    let mut delayed = failed(
        "dave@example.com",
        reply_from_text("421 4.4.2 timeout", false),
    );
    delayed.action = Action::Delayed;
    let rcpts = [
        bob(),
        delayed,
        failed(
            "erin@example.com",
            reply_from_text("552 5.2.2 mailbox full", true),
        ),
    ];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(
        p.top.get("Subject"),
        Some("Undelivered Mail Returned to Sender")
    );
    let g = status_groups(p.status.body);
    assert_eq!(g.len(), 4);
    let finals: Vec<_> = g[1..]
        .iter()
        .map(|g| field(g, "Final-Recipient").unwrap())
        .collect();
    assert_eq!(
        finals,
        [
            "rfc822; bob@example.net",
            "rfc822; dave@example.com",
            "rfc822; erin@example.com"
        ]
    );
    // No ORCPT given -> no Original-Recipient.
    assert_eq!(field(&g[2], "Original-Recipient"), None);
    assert_eq!(field(&g[3], "Original-Recipient"), None);
    let text = std::str::from_utf8(p.text.body).unwrap();
    for a in [
        "<bob@example.net>:",
        "<dave@example.com>:",
        "<erin@example.com>:",
    ] {
        assert!(text.contains(a), "{a}");
    }
}

#[test]
fn success_report_for_relayed_recipients() {
    let env = envelope();
    let mut r = failed(
        "carol@example.net",
        reply_from_text("250 2.0.0 Ok: queued", true),
    );
    r.action = Action::Relayed;
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(
        p.top.get("Subject"),
        Some("Successful Mail Delivery Report")
    );
    let g = status_groups(p.status.body);
    assert_eq!(field(&g[1], "Action"), Some("relayed"));
    assert_eq!(field(&g[1], "Status"), Some("2.0.0"));
    let text = std::str::from_utf8(p.text.body).unwrap();
    assert!(text.contains("<carol@example.net>: relayed via mx.example.net[192.0.2.25]: 250"));
    // RET=FULL never returns the whole message with a success report.
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.original.get("Content-Type"), Some("text/rfc822-headers"));
}

// ---------------------------------------------------------------------------
// What is returned: RET, size cap.

#[test]
fn ret_full_returns_the_whole_message() {
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.original.get("Content-Type"), Some("message/rfc822"));
    assert_eq!(
        p.original.get("Content-Description"),
        Some("Undelivered Message")
    );
    assert_eq!(p.original.get("Content-Transfer-Encoding"), Some("7bit"));
    assert_eq!(p.original.body, ORIGINAL);
    // And the returned message parses as a message.
    let inner = parse_entity(p.original.body);
    assert_eq!(inner.get("Subject"), Some("Lunch"));
}

#[test]
fn ret_hdrs_returns_headers() {
    let env = Envelope {
        ret_full: Some(false),
        ..envelope()
    };
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.original.get("Content-Type"), Some("text/rfc822-headers"));
    assert!(!p.original.body.windows(5).any(|w| w == b"noon?"));
    assert!(p
        .original
        .body
        .ends_with(b"Message-ID: <lunch-1@example.org>\r\n"));
}

#[test]
fn ret_full_above_the_size_limit_returns_headers_and_says_so() {
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let rcpts = [bob()];
    let mut i = input(&env, &rcpts, ORIGINAL);
    i.return_size_limit = ORIGINAL.len();
    let p_at = build(&i).unwrap();
    assert_eq!(
        parse_dsn(&p_at.message).original.get("Content-Type"),
        Some("message/rfc822"),
        "at the limit: full"
    );
    i.return_size_limit = ORIGINAL.len() - 1;
    let dsn = build(&i).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.original.get("Content-Type"), Some("text/rfc822-headers"));
    let text = std::str::from_utf8(p.text.body)
        .unwrap()
        .replace("\r\n", " ");
    assert!(
        text.contains(&format!(
            "larger than {} octets, so only its headers are returned",
            ORIGINAL.len() - 1
        )),
        "{text}"
    );
}

#[test]
fn huge_headers_are_cut_at_a_field_boundary() {
    let mut original = Vec::new();
    for i in 0..100 {
        original.extend_from_slice(
            format!("X-Filler-{i}: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\tbbbbbbbbbbbbbbb\r\n").as_bytes(),
        );
    }
    original.extend_from_slice(b"\r\nbody\r\n");
    let env = envelope();
    let rcpts = [bob()];
    let mut i = input(&env, &rcpts, &original);
    i.return_size_limit = 1000;
    let dsn = build(&i).unwrap();
    let p = parse_dsn(&dsn.message);
    assert!(p.original.body.len() <= 1000);
    assert!(p.original.body.starts_with(b"X-Filler-0:"));
    // Ends with a complete folded field.
    assert!(p.original.body.ends_with(b"\tbbbbbbbbbbbbbbb\r\n"));
    let text = std::str::from_utf8(p.text.body)
        .unwrap()
        .replace("\r\n", " ");
    assert!(text.contains("only their start is returned"), "{text}");
}

#[test]
fn message_without_body_or_headers() {
    let env = envelope();
    let rcpts = [bob()];
    // Headers only, no empty line.
    let dsn = build(&input(&env, &rcpts, b"Subject: x\r\n")).unwrap();
    assert_eq!(parse_dsn(&dsn.message).original.body, b"Subject: x\r\n");
    // Body only.
    let dsn = build(&input(&env, &rcpts, b"\r\nbody\r\n")).unwrap();
    assert_eq!(parse_dsn(&dsn.message).original.body, b"");
    // Nothing at all.
    let dsn = build(&input(&env, &rcpts, b"")).unwrap();
    assert_eq!(parse_dsn(&dsn.message).original.body, b"");
}

#[test]
fn bare_line_endings_and_long_lines_in_the_original_are_normalised() {
    let mut original = b"Subject: a\nX-B: b\rX-C: c\r\n\r\nline\n".to_vec();
    original.extend(std::iter::repeat_n(b'x', 2500));
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, &original)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert!(p
        .original
        .body
        .starts_with(b"Subject: a\r\nX-B: b\r\nX-C: c\r\n\r\nline\r\n"));
    let xs = p.original.body.iter().filter(|&&b| b == b'x').count();
    assert_eq!(xs, 2500, "nothing lost when splitting");
}

#[test]
fn eight_bit_original_sets_body_8bit() {
    let original = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n".as_bytes();
    let env = Envelope {
        ret_full: Some(true),
        body_8bit: true,
        ..envelope()
    };
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, original)).unwrap();
    assert!(dsn.body_8bit);
    assert!(
        !dsn.smtputf8,
        "ASCII addresses, no SMTPUTF8 on the original"
    );
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.original.get("Content-Type"), Some("message/rfc822"));
    assert_eq!(p.original.get("Content-Transfer-Encoding"), Some("8bit"));
    assert_eq!(p.text.get("Content-Transfer-Encoding"), Some("7bit"));
    assert_eq!(p.original.body, original);
}

#[test]
fn utf8_addresses_make_a_global_dsn() {
    let env = Envelope {
        sender: "j\u{f6}rg@b\u{fc}cher.example".into(),
        smtputf8: true,
        ..envelope()
    };
    let mut r = failed(
        "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.example",
        reply_from_text("550 5.1.1 \u{672a}\u{77e5} user", true),
    );
    r.orcpt = Some("utf-8;\u{7528}\u{6237}@\u{4f8b}\u{5b50}.example".into());
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    assert!(dsn.smtputf8 && dsn.body_8bit);
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.top.get("To"), Some("<j\u{f6}rg@b\u{fc}cher.example>"));
    assert_eq!(
        p.text.get("Content-Type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(p.text.get("Content-Transfer-Encoding"), Some("8bit"));
    assert_eq!(
        p.status.get("Content-Type"),
        Some("message/global-delivery-status")
    );
    assert_eq!(
        p.original.get("Content-Type"),
        Some("message/global-headers")
    );
    let g = status_groups(p.status.body);
    assert_eq!(
        field(&g[1], "Final-Recipient"),
        Some("utf-8; \u{7528}\u{6237}@\u{4f8b}\u{5b50}.example")
    );
    assert_eq!(
        field(&g[1], "Original-Recipient"),
        Some("utf-8;\u{7528}\u{6237}@\u{4f8b}\u{5b50}.example")
    );
    assert_eq!(
        field(&g[1], "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 \u{672a}\u{77e5} user")
    );
}

#[test]
fn non_ascii_reply_text_is_replaced_in_an_ascii_dsn() {
    let env = envelope();
    let r = failed(
        "bob@example.net",
        Reply::from_parts(550, None, vec!["caf\u{e9}\r\nX-Injected: yes\u{7}".into()]),
    );
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    assert!(dsn.message.is_ascii());
    let p = parse_dsn(&dsn.message);
    let g = status_groups(p.status.body);
    assert_eq!(
        field(&g[1], "Diagnostic-Code"),
        Some("smtp; 550 caf? X-Injected: yes")
    );
    assert!(field(&g[1], "X-Injected").is_none());
}

#[test]
fn envid_orcpt_and_addresses_are_echoed_exactly() {
    // The server stores ENVID and ORCPT xtext-decoded (`a+2Bb+3Dc+20+20D`
    // arrives as `a+b=c  D`); case and spacing are kept (RFC 3464 §2.2.1).
    let env = Envelope {
        envid: Some("a+b=c  D".into()),
        sender: "\"Odd  Sender\"@example.org".into(),
        ..envelope()
    };
    let mut r = bob();
    r.address = "\"two  spaces\"@Example.NET".into();
    r.orcpt = Some("rfc822;\"Two  Spaces\"@EXAMPLE.net".into());
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.top.get("To"), Some("<\"Odd  Sender\"@example.org>"));
    let g = status_groups(p.status.body);
    assert_eq!(field(&g[0], "Original-Envelope-Id"), Some("a+b=c  D"));
    assert_eq!(
        field(&g[1], "Original-Recipient"),
        Some("rfc822;\"Two  Spaces\"@EXAMPLE.net")
    );
    assert_eq!(
        field(&g[1], "Final-Recipient"),
        Some("rfc822; \"two  spaces\"@Example.NET")
    );
}

// ---------------------------------------------------------------------------
// Folding and limits.

#[test]
fn long_diagnostic_is_folded_and_unfolds_to_the_original() {
    let env = envelope();
    let words: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
    let text = words.join(" ");
    let r = failed("bob@example.net", crate::reply!(550, 5, 7, 1, text.clone()));
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message);
    let raw = std::str::from_utf8(p.status.body).unwrap();
    let start = raw.find("Diagnostic-Code:").unwrap();
    let end = raw[start..].find("\r\nLast-Attempt-Date").unwrap() + start;
    let raw_field = &raw[start..end];
    assert!(raw_field.contains("\r\n "), "folded");
    for line in raw_field.split("\r\n") {
        assert!(line.len() <= 78, "{line:?}");
        assert!(!line.trim().is_empty());
    }
    let g = status_groups(p.status.body);
    assert_eq!(
        field(&g[1], "Diagnostic-Code").unwrap(),
        format!("smtp; 550 5.7.1 {text}")
    );
}

#[test]
fn diagnostic_is_capped_and_giant_words_are_split() {
    let env = envelope();
    let giant = "z".repeat(5000);
    let r = failed("bob@example.net", Reply::from_parts(550, None, vec![giant]));
    let dsn = build(&input(&env, std::slice::from_ref(&r), ORIGINAL)).unwrap();
    let p = parse_dsn(&dsn.message); // checks <= 998 per line
    let g = status_groups(p.status.body);
    let diag = field(&g[1], "Diagnostic-Code").unwrap();
    assert!(diag.ends_with("..."));
    let zs = diag.bytes().filter(|&b| b == b'z').count();
    assert_eq!(zs, MAX_DIAGNOSTIC_LEN);
}

#[test]
fn boundary_absent_from_the_original_even_when_planted() {
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let rcpts = [bob()];
    let dsn_id = id(0x0FED_CBA9_8765_4321);
    let planted = format!("Subject: x\r\n\r\n--=_sluice-{dsn_id}\r\n--=_sluice-{dsn_id}.1--\r\n");
    let dsn = build(&input(&env, &rcpts, planted.as_bytes())).unwrap();
    let p = parse_dsn(&dsn.message);
    assert_eq!(p.boundary, format!("=_sluice-{dsn_id}.2"));
    assert_eq!(p.original.body, planted.as_bytes());
    // Without a plant, the plain id.
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    assert_eq!(
        parse_dsn(&dsn.message).boundary,
        format!("=_sluice-{dsn_id}")
    );
}

// ---------------------------------------------------------------------------
// Who gets reported.

#[test]
fn no_dsn_for_null_sender_or_no_recipients() {
    let env = Envelope {
        sender: String::new(),
        ..envelope()
    };
    let rcpts = [bob()];
    assert!(build(&input(&env, &rcpts, ORIGINAL)).is_none());
    assert!(recipients_to_report(&env, Action::Failed).is_empty());
    let env = envelope();
    assert!(build(&input(&env, &[], ORIGINAL)).is_none());
}

#[test]
fn notify_table() {
    use Action::*;
    let cases: &[(Option<&str>, Action, bool)] = &[
        (None, Failed, true),
        (None, Delayed, true),
        (None, Delivered, false),
        (None, Relayed, false),
        (Some("NEVER"), Failed, false),
        (Some("NEVER"), Delayed, false),
        (Some("NEVER"), Delivered, false),
        (Some("FAILURE"), Failed, true),
        (Some("FAILURE"), Delayed, false),
        (Some("DELAY"), Failed, false),
        (Some("DELAY"), Delayed, true),
        (Some("SUCCESS"), Failed, false),
        (Some("SUCCESS"), Relayed, true),
        (Some("SUCCESS,FAILURE"), Failed, true),
        (Some("SUCCESS,FAILURE"), Expanded, true),
        (Some("failure,delay"), Delayed, true),
    ];
    for &(notify, action, want) in cases {
        assert_eq!(should_notify(notify, action), want, "{notify:?} {action:?}");
    }
}

#[test]
fn recipients_to_report_follows_state_and_notify() {
    let failed_state = RecipientState::Failed {
        at_ms: 1,
        reply: "550 5.1.1 no".into(),
    };
    let mk = |addr: &str, notify: Option<&str>, state: RecipientState| Recipient {
        address: addr.into(),
        notify: notify.map(Into::into),
        orcpt: None,
        state,
        remote_mta: None,
    };
    let env = Envelope {
        recipients: vec![
            mk("a@x", None, failed_state.clone()),
            mk("b@x", Some("NEVER"), failed_state.clone()),
            mk("c@x", Some("SUCCESS"), failed_state.clone()),
            mk("d@x", Some("FAILURE,DELAY"), failed_state.clone()),
            mk("e@x", None, RecipientState::Pending),
            mk(
                "f@x",
                None,
                RecipientState::Deferred {
                    attempts: 2,
                    last_reply: "451 4.3.0 later".into(),
                    next_attempt_ms: 5,
                },
            ),
            mk(
                "g@x",
                Some("SUCCESS"),
                RecipientState::Delivered {
                    at_ms: 3,
                    reply: "250 2.0.0 ok".into(),
                },
            ),
            mk(
                "h@x",
                None,
                RecipientState::Delivered {
                    at_ms: 3,
                    reply: "250 2.0.0 ok".into(),
                },
            ),
        ],
        ..envelope()
    };
    assert_eq!(recipients_to_report(&env, Action::Failed), [0, 3]);
    assert_eq!(recipients_to_report(&env, Action::Delayed), [5]);
    assert_eq!(recipients_to_report(&env, Action::Delivered), [6]);
    assert_eq!(recipients_to_report(&env, Action::Relayed), [6]);
}

#[test]
fn from_spool_fills_the_recipient() {
    let env = envelope();
    let r = DsnRecipient::from_spool(&env.recipients[0]).unwrap();
    assert_eq!(r.address, "bob@example.net");
    assert_eq!(r.orcpt.as_deref(), Some("rfc822;Bob@Example.NET"));
    assert_eq!(r.action, Action::Failed);
    assert_eq!(r.reply.code(), 550);
    assert_eq!(r.status_code().to_string(), "5.1.1");
    assert_eq!(
        r.last_attempt,
        Some(UNIX_EPOCH + Duration::from_millis(1_709_251_000_000))
    );
    assert_eq!(
        DsnRecipient::from_spool(&env.recipients[1]).unwrap().action,
        Action::Delivered
    );
    let pending = Recipient {
        state: RecipientState::Pending,
        ..env.recipients[0].clone()
    };
    assert!(DsnRecipient::from_spool(&pending).is_none());
}

#[test]
fn reply_from_text_round_trips_display_and_tolerates_prose() {
    let multi = Reply::from_parts(
        550,
        Some(EnhancedCode::new(5, 7, 1)),
        vec!["first".into(), "second".into()],
    );
    assert_eq!(reply_from_text(&multi.to_string(), true), multi);
    let prose = reply_from_text("connection refused by all hosts", false);
    assert_eq!(prose.code(), 451);
    assert_eq!(prose.text(), "connection refused by all hosts");
    assert_eq!(reply_from_text("", true).code(), 550);
}

#[test]
fn dsn_envelope_is_null_sender_to_the_original_sender() {
    let env = envelope();
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    let e = dsn.envelope(id(42), 1000, &env.sender);
    assert_eq!(e.sender, "");
    assert_eq!(e.recipients.len(), 1);
    assert_eq!(e.recipients[0].address, "alice@example.org");
    assert_eq!(e.size, dsn.message.len() as u64);
    assert!(!e.body_8bit && !e.smtputf8);
}

// ---------------------------------------------------------------------------
// Cross-check with an independent parser, and the golden sample.

#[test]
fn mail_parser_reads_the_report() {
    use mail_parser::{MessageParser, MimeHeaders};
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let rcpts = [bob()];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    let msg = MessageParser::default()
        .parse(&dsn.message)
        .expect("mail-parser parses the DSN");
    assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
    let ct = msg.content_type().unwrap();
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let root_parts = match &msg.parts[0].body {
        mail_parser::PartType::Multipart(p) => p.clone(),
        other => panic!("root is not multipart: {other:?}"),
    };
    assert_eq!(root_parts.len(), 3);
    let types: Vec<String> = root_parts
        .iter()
        .map(|&i| {
            let ct = msg.parts[i as usize].content_type().unwrap();
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        types,
        ["text/plain", "message/delivery-status", "message/rfc822"]
    );
    let inner = msg
        .attachment(1)
        .and_then(|a| a.message())
        .expect("returned message");
    assert_eq!(inner.subject(), Some("Lunch"));
}

/// Regenerate with `SLUICE_UPDATE_GOLDEN=1 cargo test -p sluice --lib dsn`
/// and review the diff by hand.
#[test]
fn golden_sample() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/delivery/dsn/golden_failure.eml"
    );
    let env = Envelope {
        ret_full: Some(true),
        ..envelope()
    };
    let rcpts = [
        bob(),
        DsnRecipient {
            remote_host: None,
            remote_ip: None,
            ..failed(
                "dave@nowhere.test",
                crate::reply!(
                    550,
                    5,
                    1,
                    2,
                    "Domain nowhere.test does not exist (NXDOMAIN)"
                ),
            )
        },
    ];
    let dsn = build(&input(&env, &rcpts, ORIGINAL)).unwrap();
    if std::env::var_os("SLUICE_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &dsn.message).unwrap();
    }
    let golden = std::fs::read(path).expect("golden file");
    assert!(
        dsn.message == golden,
        "DSN differs from the golden sample:\n{}",
        String::from_utf8_lossy(&dsn.message)
    );
}

// ---------------------------------------------------------------------------
// Property test: whatever the input, the output is well formed.

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,300}",
        any::<String>().prop_map(|s| s.chars().take(400).collect()),
        "[a-z ]{0,40}\r\n[A-Z]{0,5}: [\u{0}-\u{ff}]{0,50}",
        // One giant word (cheap to generate, unlike a regex of that length).
        (900usize..1500).prop_map(|n| "w".repeat(n)),
    ]
}

fn any_address() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.+=_-]{1,20}@[a-z0-9-]{1,20}\\.test",
        "[\u{80}-\u{2fff}a-z]{1,10}@[\u{80}-\u{2fff}a-z]{1,10}\\.test",
        "\"[ -~]{1,20}\"@x\\.test",
    ]
}

fn any_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Failed),
        Just(Action::Delayed),
        Just(Action::Delivered),
        Just(Action::Relayed),
        Just(Action::Expanded),
    ]
}

fn any_recipient() -> impl Strategy<Value = DsnRecipient> {
    (
        any_address(),
        proptest::option::of(any_address()),
        any_action(),
        200u16..600,
        proptest::collection::vec(any_text(), 1..4),
        proptest::option::of((1u8..3, 0u16..1000, 0u16..1000)),
        proptest::option::of("[a-z.]{1,30}"),
        any::<bool>(),
    )
        .prop_map(|(address, orcpt, action, code, lines, enh, host, ip)| {
            let enhanced = enh.map(|(c, s, d)| EnhancedCode::new([2, 4, 5][c as usize], s, d));
            DsnRecipient {
                address,
                orcpt: orcpt.map(|o| format!("rfc822;{o}")),
                action,
                reply: Reply::from_parts(code, enhanced, lines),
                status: None,
                remote_host: host,
                remote_ip: ip.then(|| "2001:db8::25".parse().unwrap()),
                last_attempt: Some(t(1_700_000_000)),
                will_retry_until: Some(t(1_800_000_000)),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn output_is_always_well_formed(
        sender in any_address(),
        rcpts in proptest::collection::vec(any_recipient(), 1..5),
        original in proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b':'), any::<u8>()],
            0..3000,
        ),
        ret_full in proptest::option::of(any::<bool>()),
        envid in proptest::option::of("[!-~]{1,100}"),
        helo in proptest::option::of(any_text()),
        smtputf8 in any::<bool>(),
        limit in 0usize..4000,
    ) {
        let env = Envelope {
            sender,
            ret_full,
            envid,
            helo,
            smtputf8,
            ..envelope()
        };
        let mut i = input(&env, &rcpts, &original);
        i.return_size_limit = limit;
        let dsn = build(&i).expect("non-null sender, recipients given");
        let p = parse_dsn(&dsn.message);
        prop_assert!(!p.boundary.is_empty());
        // The boundary occurs nowhere but in delimiters.
        let parts = [p.text.body, p.status.body, p.original.body];
        for part in parts {
            prop_assert!(memchr::memmem::find(part, p.boundary.as_bytes()).is_none());
        }
        let groups = status_groups(p.status.body);
        prop_assert_eq!(groups.len(), rcpts.len() + 1);
        for (g, r) in groups[1..].iter().zip(&rcpts) {
            prop_assert_eq!(field(g, "Action"), Some(r.action.as_str()));
            let status = field(g, "Status").unwrap();
            let class = status.as_bytes()[0] - b'0';
            prop_assert!(r.action.status_classes().contains(&class));
        }
        if !dsn.body_8bit {
            prop_assert!(dsn.message.is_ascii());
        }
        if !dsn.smtputf8 {
            let top = &dsn.message[..dsn.message.windows(4).position(|w| w == b"\r\n\r\n").unwrap()];
            prop_assert!(top.is_ascii(), "non-ASCII top-level header without SMTPUTF8");
            prop_assert!(p.status.body.is_ascii());
        }
    }
}
