//! The SMTP client session: a sans-IO state machine for outbound delivery. Being written.
