//! Fuzzes the parser behind the spool's start-up replay: arbitrary bytes as a
//! body-log segment never panic and yield only records inside the input,
//! in order, whose bodies match their CRC; records encoded from the input
//! parse back exactly, with the input appended after them as a torn tail.
//! The checks live in `sluice::spool::fuzz_harness` (built with
//! `cfg(fuzzing)`), which a unit test also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice::spool::fuzz_harness::segment(data);
});
