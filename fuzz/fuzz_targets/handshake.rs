//! Fuzz the handshake parser, both roles, from the first byte and after a valid hello.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealpipe_fuzz::handshake(data));
