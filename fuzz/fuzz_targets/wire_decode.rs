//! Fuzz target: see `archipelago::sim::fuzz::wire_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipelago::sim::fuzz::wire_decode(data));
