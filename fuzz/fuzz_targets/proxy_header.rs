//! Fuzz the PROXY protocol (v1/v2) parser: arbitrary bytes as a load balancer's header.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealpipe_fuzz::proxy_header(data));
