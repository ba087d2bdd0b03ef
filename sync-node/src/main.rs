//! The `sync-node` binary: parses the command line and runs the command;
//! everything lives in the `sync_node` library.

fn main() -> std::process::ExitCode {
    sync_node::cli::main()
}
