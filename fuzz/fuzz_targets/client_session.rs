//! Fuzzes the SMTP client session: arbitrary server replies (canned ones,
//! raw bytes) interleaved with driver actions (time passing, EOF, new
//! messages, QUIT, partial writes). The session must never panic, never lose
//! a message, never wait without a deadline, and keep its writes bounded;
//! the checks live in `sluice::smtp::client::fuzz_harness` (built with
//! `cfg(fuzzing)`), which the unit tests also run through proptest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice::smtp::client::fuzz_harness::run(data);
});
