//! The JSON-lines accounting log of receptions, deliveries, deferrals and bounces. Being written.
