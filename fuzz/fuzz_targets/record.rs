//! Fuzz the record decoder: arbitrary bytes as a sealed stream, and sealed round trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealpipe_fuzz::record(data));
