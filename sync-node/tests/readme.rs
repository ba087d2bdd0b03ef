//! The README's walkthrough, run as written: every `sh` block marked
//! `<!-- walkthrough -->` in `README.md`, in order, in one bash shell
//! (`set -euo pipefail`) with the binary under test first on `PATH`. The
//! one change made to the text is the scratch directory, which becomes a
//! temporary one.
//!
//! The walkthrough binds the fixed ports it shows (127.0.0.1:7070 and
//! others). Where the kernel lets an unprivileged user make namespaces
//! (`unshare -rn`), the shell runs in a network namespace of its own with
//! just a loopback interface, so those ports cannot clash with anything on
//! the machine; elsewhere it runs on the machine's loopback.
//!
//! Afterwards the test checks what a newcomer would: the scratch directory,
//! made a git repository holding the project's `.gitignore`, shows nothing
//! untracked (so running the walkthrough in the checkout leaves `git
//! status` clean), and the nodes' log files hold no terminal escape codes.

mod support;

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The scratch directory the README works in.
const SCRATCH: &str = "/tmp/archipelago-walkthrough";
/// The line that marks a walkthrough block.
const MARK: &str = "<!-- walkthrough -->";
/// Longest the whole walkthrough may take.
const WALKTHROUGH_MAX: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `sh` blocks that follow a [`MARK`] line, in order.
fn walkthrough_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.trim() != MARK {
            continue;
        }
        let fence = lines.by_ref().find(|l| !l.trim().is_empty());
        assert_eq!(
            fence.map(str::trim),
            Some("```sh"),
            "a {MARK} line must be followed by a ```sh block"
        );
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            block.push_str(line);
            block.push('\n');
        }
        blocks.push(block);
    }
    blocks
}

/// How to run a command in a network namespace of its own with loopback
/// up, if this machine allows it.
fn namespace_prefix() -> Option<Vec<String>> {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|path| Path::new(path).exists())?;
    let works = Command::new("unshare")
        .args(["-rn", ip, "link", "set", "lo", "up"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    works.then(|| {
        ["unshare", "-rn", "sh", "-c"]
            .into_iter()
            .map(str::to_owned)
            .chain([format!("{ip} link set lo up && exec \"$0\" \"$@\"")])
            .collect()
    })
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let blocks = walkthrough_blocks(&readme);
    // Setup, using a node, HTTP, the conflict in two parts, stopping.
    assert!(
        blocks.len() >= 6,
        "the README marks {} walkthrough blocks",
        blocks.len()
    );
    assert!(
        blocks[0].contains(SCRATCH),
        "the walkthrough starts in {SCRATCH}"
    );

    let temp = tempfile::tempdir().unwrap();
    let bin = temp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(support::BIN, bin.join("sync-node")).unwrap();
    // The scratch directory as the checkout would be: a git repository
    // with the project's .gitignore.
    let scratch = temp.path().join("walkthrough");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::copy(repo_root().join(".gitignore"), scratch.join(".gitignore")).unwrap();
    git(&scratch, &["init", "--quiet"]);

    let mut script = String::from(
        "set -euo pipefail\n\
         # Nodes still running when a command fails are stopped on the way out.\n\
         trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n\
         set -x\n",
    );
    for block in &blocks {
        script.push_str(&block.replace(SCRATCH, scratch.to_str().unwrap()));
    }
    let script_path = temp.path().join("walkthrough.sh");
    std::fs::write(&script_path, &script).unwrap();

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let prefix = namespace_prefix();
    if prefix.is_none() {
        eprintln!("no network namespace here: the walkthrough uses this machine's loopback");
    }
    let mut argv = prefix.unwrap_or_default();
    argv.extend(["bash".to_owned(), script_path.display().to_string()]);
    // stdout and stderr share one file description, so neither overwrites
    // the other.
    let output = temp.path().join("output");
    let transcript_file = std::fs::File::create(&output).unwrap();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(temp.path())
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(transcript_file.try_clone().unwrap())
        .stderr(transcript_file)
        // Its own process group, so a timeout stops the nodes too.
        .process_group(0)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > WALKTHROUGH_MAX {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut transcript = String::new();
    std::fs::File::open(&output)
        .unwrap()
        .read_to_string(&mut transcript)
        .unwrap();
    let logs = ["node-us-east/log", "node-eu-west/log"].map(|log| {
        let text = std::fs::read(scratch.join(log)).unwrap_or_default();
        (log, text)
    });
    let shown = || {
        let mut text = format!(
            "--- walkthrough (script {})\n{transcript}",
            script_path.display()
        );
        for (name, log) in &logs {
            text.push_str(&format!("--- {name}\n{}", String::from_utf8_lossy(log)));
        }
        text
    };
    match status {
        Some(status) => assert!(
            status.success(),
            "the walkthrough failed ({status})\n{}",
            shown()
        ),
        None => panic!("the walkthrough took over {WALKTHROUGH_MAX:?}\n{}", shown()),
    }
    // Shown with --nocapture.
    eprintln!("{}", shown());
    // What the walkthrough shows happening, happened.
    assert!(
        transcript.contains("\"resolved\""),
        "no resolved report in the transcript\n{}",
        shown()
    );

    for (name, log) in &logs {
        assert!(!log.is_empty(), "{name} is empty\n{}", shown());
        assert!(
            !log.contains(&0x1b),
            "{name} holds terminal escape codes\n{}",
            shown()
        );
    }
    let status = git(
        &scratch,
        &["status", "--porcelain", "--untracked-files=all"],
    );
    assert_eq!(
        status.trim(),
        "?? .gitignore",
        "the walkthrough leaves files .gitignore does not cover"
    );
}

/// Runs git in `dir` and returns its stdout; it must succeed.
fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn walkthrough_blocks_are_the_marked_sh_blocks() {
    let readme = "text\n<!-- walkthrough -->\n```sh\necho one\n```\n\n```sh\necho unmarked\n```\n\
                  <!-- walkthrough -->\n\n```sh\necho two\necho three\n```\n";
    assert_eq!(
        walkthrough_blocks(readme),
        ["echo one\n", "echo two\necho three\n"]
    );
}
