//! DNS resolution for delivery (MX, A/AAAA; RFC 5321 §5.1, RFC 7505). Being written.
