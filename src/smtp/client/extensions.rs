//! The server's EHLO keywords (RFC 5321 §4.1.1.1) that the client acts on.

use crate::smtp::reply::Reply;

/// SMTP service extensions a server offered in its EHLO reply. All false
/// after a HELO fallback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870) was offered, with or without a limit.
    pub size: bool,
    /// The SIZE limit in octets; `None` when absent or `SIZE 0` (no fixed limit).
    pub size_limit: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// BINARYMIME (RFC 3030).
    pub binary_mime: bool,
    /// CHUNKING (RFC 3030): BDAT.
    pub chunking: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// AUTH mechanisms (RFC 4954), upper-cased; empty when AUTH is not offered.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Reads the keywords of a `250` EHLO reply. The first line is the
    /// server's name and greeting; keywords are matched case-insensitively and
    /// unknown ones are ignored. The obsolete `AUTH=mech` spelling that some
    /// servers still send is understood too.
    pub fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let is = |name: &str| keyword.eq_ignore_ascii_case(name);
            if is("PIPELINING") {
                ext.pipelining = true;
            } else if is("SIZE") {
                ext.size = true;
                // "SIZE" alone or "SIZE 0" declare no fixed limit (RFC 1870 §4);
                // an unreadable number is treated the same rather than guessed.
                ext.size_limit = words
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|&n| n > 0);
            } else if is("8BITMIME") {
                ext.eight_bit_mime = true;
            } else if is("BINARYMIME") {
                ext.binary_mime = true;
            } else if is("CHUNKING") {
                ext.chunking = true;
            } else if is("ENHANCEDSTATUSCODES") {
                ext.enhanced_status_codes = true;
            } else if is("SMTPUTF8") {
                ext.smtputf8 = true;
            } else if is("DSN") {
                ext.dsn = true;
            } else if is("STARTTLS") {
                ext.starttls = true;
            } else if is("AUTH")
                || (keyword.len() > 5 && keyword.as_bytes()[..5].eq_ignore_ascii_case(b"AUTH="))
            {
                let first = keyword.get(5..).filter(|m| !m.is_empty());
                for mech in first.into_iter().chain(words) {
                    let mech = mech.to_ascii_uppercase();
                    if !ext.auth.contains(&mech) {
                        ext.auth.push(mech);
                    }
                }
            }
        }
        ext
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Extensions {
        let (reply, _) = Reply::parse(text.as_bytes()).unwrap().unwrap();
        Extensions::from_ehlo(&reply)
    }

    #[test]
    fn keywords_case_insensitive() {
        let e = parse(
            "250-mx.example greets you\r\n250-pipelining\r\n250-Size 1000\r\n250-8bitmime\r\n\
             250-ENHANCEDSTATUSCODES\r\n250-chunking\r\n250-BINARYMIME\r\n250-SmtpUtf8\r\n\
             250-dsn\r\n250-STARTTLS\r\n250 AUTH plain LOGIN\r\n",
        );
        assert_eq!(
            e,
            Extensions {
                pipelining: true,
                size: true,
                size_limit: Some(1000),
                eight_bit_mime: true,
                binary_mime: true,
                chunking: true,
                enhanced_status_codes: true,
                smtputf8: true,
                dsn: true,
                starttls: true,
                auth: vec!["PLAIN".into(), "LOGIN".into()],
            }
        );
    }

    #[test]
    fn size_forms_and_first_line_ignored() {
        // The first line is the server name even if it looks like a keyword.
        let e = parse("250-PIPELINING\r\n250 SIZE\r\n");
        assert!(!e.pipelining);
        assert!(e.size);
        assert_eq!(e.size_limit, None);
        assert_eq!(parse("250-x\r\n250 SIZE 0\r\n").size_limit, None);
        assert_eq!(parse("250-x\r\n250 SIZE lots\r\n").size_limit, None);
        assert_eq!(parse("250 x\r\n"), Extensions::default());
    }

    #[test]
    fn old_auth_equals_form() {
        let e = parse("250-x\r\n250-AUTH=LOGIN\r\n250 AUTH LOGIN CRAM-MD5\r\n");
        assert_eq!(e.auth, vec!["LOGIN".to_string(), "CRAM-MD5".into()]);
        // "AUTHX" is not AUTH.
        assert!(parse("250-x\r\n250 AUTHX\r\n").auth.is_empty());
    }
}
