//! RFC 3464 delivery status notifications (bounces). Being written.
