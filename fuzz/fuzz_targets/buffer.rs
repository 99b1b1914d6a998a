//! Fuzz the reactor's Buffer: operation programs checked against a Vec model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealpipe_fuzz::buffer(data));
