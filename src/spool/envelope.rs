//! The message metadata record: envelope plus per-recipient delivery state.
//!
//! Stored as a version byte followed by JSON. JSON is slower than a binary
//! format but the record is small (hundreds of bytes next to a multi-KiB
//! body), it stays readable with `sled` debugging tools, and serde's
//! field-name matching lets later versions add `Option` fields without a
//! migration.

use super::id::SpoolId;
use super::SpoolError;

/// Format tag in front of every encoded envelope, so a future binary format
/// can be told apart from this one without guessing.
const FORMAT_JSON_V1: u8 = 1;

/// Envelope + per-recipient state, serialised as the message's metadata
/// record. Plain strings for addresses (the SMTP layer's typed Address
/// renders to these and parses back).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// The message's spool id (also its key).
    pub id: SpoolId,
    /// MAIL FROM address; `""` is the null sender `<>`.
    pub sender: String,
    /// RCPT TO recipients with their delivery state.
    pub recipients: Vec<Recipient>,
    /// When the message was accepted (Unix ms).
    pub received_at_ms: u64,
    /// Body size in bytes.
    pub size: u64,
    /// BODY=8BITMIME was given.
    pub body_8bit: bool,
    /// SMTPUTF8 was given.
    pub smtputf8: bool,
    /// DSN RET: `Some(true)` = FULL, `Some(false)` = HDRS.
    pub ret_full: Option<bool>,
    /// DSN ENVID.
    pub envid: Option<String>,
    /// The submitting client's IP address.
    pub client_ip: Option<String>,
    /// The client's EHLO/HELO name.
    pub helo: Option<String>,
}

/// One recipient and where its delivery stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipient {
    /// RCPT TO address.
    pub address: String,
    /// DSN NOTIFY: `"NEVER"` or a subset of `"SUCCESS,FAILURE,DELAY"`.
    pub notify: Option<String>,
    /// DSN ORCPT.
    pub orcpt: Option<String>,
    /// Delivery state.
    pub state: RecipientState,
    /// The host that gave the last reply in `state` (`name [ip]:port`), for
    /// the DSN's Remote-MTA field. `None` before any attempt and for local
    /// verdicts (DNS failures, expiry). Older records lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
}

/// Delivery state of one recipient.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RecipientState {
    /// Not yet attempted.
    Pending,
    /// Accepted by the next hop.
    Delivered {
        /// When (Unix ms).
        at_ms: u64,
        /// The remote reply, as text.
        reply: String,
    },
    /// Temporarily failed; retry later.
    Deferred {
        /// Attempts so far.
        attempts: u32,
        /// The last remote reply, as text.
        last_reply: String,
        /// When to try next (Unix ms).
        next_attempt_ms: u64,
    },
    /// Permanently failed (a DSN is owed unless NOTIFY says otherwise).
    Failed {
        /// When (Unix ms).
        at_ms: u64,
        /// The remote or local reply, as text.
        reply: String,
    },
}

impl RecipientState {
    /// Delivered or failed: nothing more to do for this recipient.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Delivered { .. } | Self::Failed { .. })
    }
}

impl Envelope {
    /// Every recipient reached a final state, so the message can be removed.
    pub fn is_done(&self) -> bool {
        self.recipients.iter().all(|r| r.state.is_final())
    }

    /// The stored form: format byte + JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(FORMAT_JSON_V1);
        // Serialising plain strings/ints/enums into a Vec cannot fail.
        serde_json::to_writer(&mut out, self).expect("envelope serialises to JSON");
        out
    }

    /// Parses the stored form.
    pub fn decode(bytes: &[u8]) -> Result<Self, SpoolError> {
        match bytes.split_first() {
            Some((&FORMAT_JSON_V1, json)) => {
                serde_json::from_slice(json).map_err(|e| SpoolError::Corrupt {
                    what: "envelope".into(),
                    reason: e.to_string(),
                })
            }
            Some((tag, _)) => Err(SpoolError::Corrupt {
                what: "envelope".into(),
                reason: format!("unknown format tag {tag}"),
            }),
            None => Err(SpoolError::Corrupt {
                what: "envelope".into(),
                reason: "empty record".into(),
            }),
        }
    }
}
