//! Fuzz target: see `archipelago::sim::fuzz::session_input`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: archipelago::sim::fuzz::contain_panics(), |data: &[u8]| {
    archipelago::sim::fuzz::session_input(data)
});
