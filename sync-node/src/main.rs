//! The `sync-node` binary: parses the command line and runs the command;
//! everything lives in the `sync_node` library.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Freed memory goes back to the system in the background; without the
    // thread, jemalloc purges only while the process allocates.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    sync_node::cli::main()
}
