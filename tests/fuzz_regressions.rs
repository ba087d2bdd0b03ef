//! Replays every input under `tests/fuzz-crashers/TARGET/` through the
//! harness of that fuzz target, so a crash found once stays fixed.

use std::path::Path;

use archipelago::sim::fuzz;

fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-crashers")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        harness(&data);
        count += 1;
    }
    count
}

#[test]
fn wire_decode_crashers_stay_fixed() {
    replay("wire_decode", fuzz::wire_decode);
}

#[test]
fn session_input_crashers_stay_fixed() {
    replay("session_input", fuzz::session_input);
}

#[test]
fn multi_site_crashers_stay_fixed() {
    replay("multi_site", fuzz::multi_site);
}

#[test]
fn harnesses_accept_edge_inputs() {
    for data in [
        &[][..],
        &[0u8; 64][..],
        &[0xffu8; 300][..],
        b"\x00\x00\x00\x05\x01hello",
    ] {
        fuzz::wire_decode(data);
        fuzz::session_input(data);
        fuzz::multi_site(data);
    }
}
