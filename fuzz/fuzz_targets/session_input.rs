//! Fuzz target: see `archipelago::sim::fuzz::session_input`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipelago::sim::fuzz::session_input(data));
