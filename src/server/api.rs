//! The session core and spool items the runtime uses, in one place.

pub(crate) use crate::smtp::address::{ForwardPath, ReversePath};
pub(crate) use crate::smtp::command::{BodyType, MailFrom, RcptTo, Ret};
pub(crate) use crate::smtp::server::{
    Event, IncomingMessage, PeerInfo, Session, SessionConfig, Stage,
};
pub(crate) use crate::spool::{
    Envelope, Partition, Recipient, RecipientState, Spool, SpoolId, SpoolIdGenerator,
};
