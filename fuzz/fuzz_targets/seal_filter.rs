//! Fuzz SealFilter decoding: handshakes, garbage records and tampered sealed streams, cut
//! into pieces as a socket delivers them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealpipe_fuzz::seal_filter(data));
