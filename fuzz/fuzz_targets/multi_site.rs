//! Fuzz target: see `archipelago::sim::fuzz::multi_site`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: archipelago::sim::fuzz::contain_panics(), |data: &[u8]| {
    archipelago::sim::fuzz::multi_site(data)
});
