//! The README's examples, run as a newcomer runs them: every ```sh block, in order, against one
//! test daemon, and its Rust example, compiled and run from a copy kept here that must match it.
//!
//! The convention (also stated in an HTML comment at the top of README.md):
//! - Every block fenced ```sh runs as `sh -e BLOCK`, in one scratch directory shared by all
//!   blocks, with the directory of the built `lockd`, `lockctl` and `lockd-bench` first on
//!   `PATH`, `LOCKD_SOCKET` set to the test daemon, stdin from /dev/null, and at most
//!   [`BLOCK_TIMEOUT`]; it must exit 0. Blocks do not share shell variables.
//! - `<!-- readme-test: skip REASON -->` on the line just above the opening fence: the block is
//!   not run (commands that need root, a toolchain, minutes, or run until interrupted). REASON
//!   is required.
//! - `<!-- readme-test: exit N -->` on that line: the block must exit N (an example that shows
//!   a failure).
//! - A fence for another shell (bash, shell, console, zsh) is an error, so that no example
//!   escapes the test by its language; rust, toml and unlabelled fences are not run as shell.
//! - Any other `readme-test:` directive, or a marker that is not directly above a ```sh fence,
//!   is an error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::{daemon, text};

/// The README, as the test binary was built with it.
const README: &str = include_str!("../../README.md");

/// This file: it holds the copy of the README's Rust example.
const THIS_FILE: &str = include_str!("readme.rs");

/// How long one block may run (the longest example sleeps a few seconds).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// The marker's prefix inside its HTML comment.
const MARKER: &str = "readme-test:";

/// Shells whose fences would escape the test: examples must use ```sh.
const OTHER_SHELLS: &[&str] = &["bash", "shell", "console", "zsh", "shell-session"];

/// Variables a surrounding `lockctl run` or an earlier `eval` could leak into the blocks.
const LEAKY_VARS: &[&str] = &[
    "LOCKD_FD",
    "LOCKD_FENCE",
    "LOCKD_LOCK",
    "LOCKD_NAMESPACE",
    "LOCKD_TICKET",
    "LOCKD_EXPIRES_AT_MS",
];

/// What a block must do.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Run it; it must exit with this status.
    Exit(i32),
    /// Do not run it, for this reason.
    Skip(String),
}

/// One fenced block of the README.
#[derive(Debug, Clone, PartialEq)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The fence's language (the first word after the backticks), possibly empty.
    lang: String,
    /// The lines between the fences, each ending in a newline.
    body: String,
    /// From the marker above the fence; `Exit(0)` without one.
    expect: Expect,
}

/// Parses a marker line, if `line` is one: `Ok(None)` when it is not a marker at all.
fn marker(line: &str) -> Result<Option<Expect>, String> {
    let line = line.trim();
    let Some(inner) = line
        .strip_prefix("<!--")
        .and_then(|l| l.strip_suffix("-->"))
        .map(str::trim)
    else {
        return Ok(None);
    };
    let Some(directive) = inner.strip_prefix(MARKER).map(str::trim) else {
        return Ok(None);
    };
    let (word, rest) = directive
        .split_once(char::is_whitespace)
        .map(|(w, r)| (w, r.trim()))
        .unwrap_or((directive, ""));
    match word {
        "skip" if rest.is_empty() => Err(format!("`{line}`: say why: `skip REASON`")),
        "skip" => Ok(Some(Expect::Skip(rest.to_string()))),
        "exit" => rest
            .parse::<i32>()
            .map(|n| Some(Expect::Exit(n)))
            .map_err(|_| format!("`{line}`: `exit` takes a status, e.g. `exit 1`")),
        _ => Err(format!(
            "`{line}`: unknown directive (use `skip REASON` or `exit N`)"
        )),
    }
}

/// Every fenced block of `markdown`, with its expectation. Errors name the line at fault.
fn blocks(markdown: &str) -> Result<Vec<Block>, String> {
    let mut found = Vec::new();
    let mut pending: Option<(usize, Expect)> = None;
    let mut open: Option<Block> = None;
    for (i, line) in markdown.lines().enumerate() {
        let n = i + 1;
        if let Some(block) = open.as_mut() {
            if line.trim_end() == "```" {
                found.push(open.take().expect("an open block"));
            } else {
                block.body.push_str(line);
                block.body.push('\n');
            }
            continue;
        }
        let fence = line.strip_prefix("```");
        if let Some((at, expect)) = pending.take() {
            let is_sh = fence.is_some_and(|info| info.split_whitespace().next() == Some("sh"));
            if !is_sh {
                return Err(format!(
                    "README.md:{at}: a readme-test marker must be on the line just above a ```sh fence"
                ));
            }
            pending = Some((at, expect));
        }
        if let Some(info) = fence {
            let lang = info.split_whitespace().next().unwrap_or("").to_string();
            if OTHER_SHELLS.contains(&lang.as_str()) {
                return Err(format!(
                    "README.md:{n}: ```{lang} is not run by this test; use ```sh (and a \
                     `<!-- readme-test: skip REASON -->` line above it if it must not run)"
                ));
            }
            let expect = pending.take().map(|(_, e)| e).unwrap_or(Expect::Exit(0));
            open = Some(Block {
                line: n,
                lang,
                body: String::new(),
                expect,
            });
        } else if let Some(expect) = marker(line).map_err(|e| format!("README.md:{n}: {e}"))? {
            pending = Some((n, expect));
        }
    }
    if let Some(block) = open {
        return Err(format!(
            "README.md:{}: this fence is never closed",
            block.line
        ));
    }
    if let Some((at, _)) = pending {
        return Err(format!(
            "README.md:{at}: a readme-test marker must be on the line just above a ```sh fence"
        ));
    }
    Ok(found)
}

/// Where and how the blocks run.
struct Setting {
    /// The scratch directory every block runs in.
    work: PathBuf,
    /// Where the scripts are written (outside `work`, so examples see only their own files).
    scripts: PathBuf,
    /// Prepended to `PATH`.
    bin_dir: PathBuf,
    /// `LOCKD_SOCKET`.
    socket: PathBuf,
    /// Longest a block may run.
    limit: Duration,
}

/// The directory of the built binaries, checked to hold all three the README uses.
fn bin_dir() -> PathBuf {
    let lockctl = Path::new(env!("CARGO_BIN_EXE_lockctl"));
    let dir = lockctl
        .parent()
        .expect("lockctl has a directory")
        .to_path_buf();
    for bin in [
        env!("CARGO_BIN_EXE_lockd"),
        env!("CARGO_BIN_EXE_lockd-bench"),
    ] {
        assert_eq!(
            Path::new(bin).parent(),
            Some(dir.as_path()),
            "{bin} is not beside lockctl; PATH would miss it"
        );
    }
    dir
}

/// Runs `block` with `sh -e` as the module doc says. `Err` describes what went wrong: the
/// README line, the block, the status and the block's output.
async fn run_block(block: &Block, setting: &Setting) -> Result<(), String> {
    let Expect::Exit(want) = block.expect else {
        return Ok(());
    };
    let script = setting
        .scripts
        .join(format!("readme-line-{}.sh", block.line));
    std::fs::write(&script, &block.body).map_err(|e| format!("write {script:?}: {e}"))?;
    let path = match std::env::var_os("PATH") {
        Some(old) => {
            let mut dirs = vec![setting.bin_dir.clone()];
            dirs.extend(std::env::split_paths(&old));
            std::env::join_paths(dirs).map_err(|e| format!("PATH: {e}"))?
        }
        None => setting.bin_dir.clone().into_os_string(),
    };
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-e")
        .arg(&script)
        .current_dir(&setting.work)
        .env("PATH", path)
        .env("LOCKD_SOCKET", &setting.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for var in LEAKY_VARS {
        cmd.env_remove(var);
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start sh: {e}"))?;
    let group = child.id();
    let outcome = tokio::time::timeout(setting.limit, child.wait_with_output()).await;
    // Whatever the block left running (a `cmd &` it did not wait for) ends with it.
    if let Some(pgid) = group {
        // SAFETY: kill has no memory-safety preconditions; a negative pid names the group.
        unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
    }
    let describe = |what: String, out: Option<&std::process::Output>| {
        let (stdout, stderr) = out
            .map(|o| (text(&o.stdout), text(&o.stderr)))
            .unwrap_or_default();
        format!(
            "README.md:{}: the ```sh block {what}\n--- block ---\n{}--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
            block.line, block.body
        )
    };
    let out = match outcome {
        Err(_) => {
            return Err(describe(
                format!("ran longer than {:?}", setting.limit),
                None,
            ))
        }
        Ok(Err(e)) => return Err(describe(format!("could not be waited for: {e}"), None)),
        Ok(Ok(out)) => out,
    };
    match out.status.code() {
        Some(code) if code == want => Ok(()),
        Some(code) => Err(describe(
            format!("exited {code}, expected {want}"),
            Some(&out),
        )),
        None => Err(describe(
            format!(
                "was killed by a signal ({}), expected exit {want}",
                out.status
            ),
            Some(&out),
        )),
    }
}

/// The README's shell examples, top to bottom, against one daemon, as a newcomer who started
/// lockd in another terminal would paste them.
#[tokio::test]
async fn every_shell_example_in_the_readme_runs_as_written() {
    let all = blocks(README).unwrap_or_else(|e| panic!("{e}"));
    let sh: Vec<&Block> = all.iter().filter(|b| b.lang == "sh").collect();
    let runnable = sh
        .iter()
        .filter(|b| matches!(b.expect, Expect::Exit(_)))
        .count();
    // A parser that finds nothing must not pass: the README has more examples than this.
    assert!(
        runnable >= 5,
        "only {runnable} runnable ```sh blocks found in README.md; is the parser broken?"
    );
    let d = daemon().await;
    let dir = tempfile::Builder::new()
        .prefix("lockd-readme-")
        .tempdir()
        .expect("temp dir");
    let setting = Setting {
        work: dir.path().join("work"),
        scripts: dir.path().join("scripts"),
        bin_dir: bin_dir(),
        socket: d.socket.clone(),
        limit: BLOCK_TIMEOUT,
    };
    for sub in [&setting.work, &setting.scripts] {
        std::fs::create_dir(sub).expect("create scratch dir");
    }
    let mut failures = Vec::new();
    for block in sh {
        if let Err(e) = run_block(block, &setting).await {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} README example(s) failed:\n\n{}\n\n--- daemon log ---\n{}",
        failures.len(),
        failures.join("\n\n"),
        d.log_tail()
    );
}

/// The runner itself: a failing block, a wrong status and a block that hangs are each
/// reported with their line; a block with its expected status passes; skipped ones never run.
#[tokio::test]
async fn a_broken_example_fails_with_its_line() {
    let markdown = "\
```sh
echo fine
```
```sh
false
echo not reached
```
<!-- readme-test: exit 3 -->
```sh
exit 3
```
<!-- readme-test: exit 0 -->
```sh
exit 3
```
<!-- readme-test: skip would hang -->
```sh
sleep 600
```
```sh
sleep 600
```
";
    let dir = tempfile::tempdir().expect("temp dir");
    let setting = Setting {
        work: dir.path().to_path_buf(),
        scripts: dir.path().to_path_buf(),
        bin_dir: bin_dir(),
        socket: dir.path().join("no-daemon.sock"),
        limit: Duration::from_secs(2),
    };
    let mut results = Vec::new();
    for block in blocks(markdown).expect("parses") {
        results.push((block.line, run_block(&block, &setting).await));
    }
    let failed: Vec<usize> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(line, _)| *line)
        .collect();
    assert_eq!(failed, vec![4, 13, 20], "results: {results:#?}");
    let hang = results[5].1.as_ref().expect_err("the hang fails");
    assert!(
        hang.contains("README.md:20") && hang.contains("ran longer than"),
        "{hang}"
    );
    let status = results[1].1.as_ref().expect_err("false fails");
    assert!(status.contains("exited 1, expected 0"), "{status}");
}

#[test]
fn markers_and_fences_parse() {
    let markdown = "\
text
<!-- readme-test: skip needs root -->
```sh
a
```
```rust
fn main() {}
```
<!-- readme-test: exit 2 -->
```sh
b
c
```
```
plain
```
";
    let got = blocks(markdown).expect("parses");
    let summary: Vec<(usize, &str, &str, Expect)> = got
        .iter()
        .map(|b| (b.line, b.lang.as_str(), b.body.as_str(), b.expect.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (3, "sh", "a\n", Expect::Skip("needs root".into())),
            (6, "rust", "fn main() {}\n", Expect::Exit(0)),
            (10, "sh", "b\nc\n", Expect::Exit(2)),
            (14, "", "plain\n", Expect::Exit(0)),
        ]
    );
}

#[test]
fn mistakes_in_markers_are_errors_not_silent_skips() {
    let cases = [
        ("<!-- readme-test: skip -->\n```sh\nx\n```\n", "say why"),
        (
            "<!-- readme-test: skipp x -->\n```sh\nx\n```\n",
            "unknown directive",
        ),
        (
            "<!-- readme-test: exit one -->\n```sh\nx\n```\n",
            "takes a status",
        ),
        (
            "<!-- readme-test: skip x -->\n\n```sh\nx\n```\n",
            "just above",
        ),
        (
            "<!-- readme-test: skip x -->\n```rust\nx\n```\n",
            "just above",
        ),
        ("```bash\nx\n```\n", "use ```sh"),
        ("```console\n$ x\n```\n", "use ```sh"),
        ("```sh\nx\n", "never closed"),
    ];
    for (markdown, want) in cases {
        match blocks(markdown) {
            Ok(b) => panic!("accepted {markdown:?} as {b:?}"),
            Err(e) => assert!(e.contains(want), "{markdown:?}: {e}"),
        }
    }
}

// The README's Rust example, compiled with the tests: the lines between the two marker
// comments must be the README's ```rust block (checked below), and a child process runs it.
mod rust_example {
    // README example: begin
    use std::time::Duration;

    use lockd_client::{Client, Error};

    #[tokio::main]
    async fn main() -> Result<(), Error> {
        let client = Client::connect_default().await?; // $LOCKD_SOCKET, else the default path
        let guard = client
            .acquire("nightly-backup")
            .wait(Duration::from_secs(30))
            .await?;
        let fence = guard.fence(); // pass it to what you write to
        tokio::select! {
            lost = guard.lost() => eprintln!("stop writing: {lost}"),
            () = backup(fence) => {}
        }
        guard.release().await // or just drop the guard
    }

    /// Stands in for your job; a real one hands `fence` to what it writes to.
    async fn backup(fence: u64) {
        println!("backing up under fence {fence}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // README example: end

    pub fn run() -> Result<(), Error> {
        main()
    }
}

/// The copy above, without its marker lines and its module's indentation.
fn rust_example_copy() -> String {
    let begin = "    // README example: begin\n";
    let end = "    // README example: end\n";
    let start = THIS_FILE.find(begin).expect("begin marker") + begin.len();
    let stop = THIS_FILE.find(end).expect("end marker");
    THIS_FILE[start..stop]
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect()
}

/// Set for the child process that runs the Rust example.
const CHILD_ENV: &str = "LOCKD_README_RUST_EXAMPLE";

#[test]
fn the_readme_rust_example_is_the_one_compiled_here() {
    let all = blocks(README).unwrap_or_else(|e| panic!("{e}"));
    let rust: Vec<&Block> = all.iter().filter(|b| b.lang == "rust").collect();
    assert_eq!(
        rust.len(),
        1,
        "README.md should have one ```rust block, the example copied into tests/it/readme.rs \
         (module rust_example); found {}",
        rust.len()
    );
    assert_eq!(
        rust[0].body,
        rust_example_copy(),
        "README.md:{}: the Rust example differs from its compiled copy in tests/it/readme.rs; \
         change both",
        rust[0].line
    );
}

/// Runs this test binary again, with only [`rust_example_in_this_process`] selected and
/// `LOCKD_SOCKET` set: the example's `main` connects by the default rule, as in the README.
#[tokio::test]
async fn the_readme_rust_example_runs() {
    let d = daemon().await;
    let me = std::env::current_exe().expect("the test binary's path");
    let child = tokio::process::Command::new(me)
        .args([
            "readme::rust_example_in_this_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("LOCKD_SOCKET", &d.socket)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = lockd_tests::within(BLOCK_TIMEOUT, "the Rust example", child)
        .await
        .expect("run the test binary");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("backing up under fence "),
        "the README's Rust example failed ({})\n--- stdout ---\n{stdout}--- stderr ---\n{}\n--- daemon log ---\n{}",
        out.status,
        text(&out.stderr),
        d.log_tail()
    );
}

/// The Rust example's `main`, when started by [`the_readme_rust_example_runs`]; otherwise it
/// does nothing (it needs `LOCKD_SOCKET` pointing at a test daemon).
#[test]
fn rust_example_in_this_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    if let Err(e) = rust_example::run() {
        panic!("the README's Rust example returned an error: {e}");
    }
}

/// The repository's root (the `it` target belongs to the daemon package, one level down).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The targets of the inline links `[text](target)` in `markdown`, with their lines.
fn links(markdown: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in markdown.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            found.push((i + 1, after[..end].to_string()));
            rest = &after[end..];
        }
    }
    found
}

/// GitHub's anchor for a heading: lower case, spaces to hyphens, other punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The issue's newcomer found the README pointing at a file outside the repository: every
/// relative link in the README and the CHANGELOG names a file of this repository, and every
/// `#anchor` in the README a heading of it.
#[test]
fn readme_and_changelog_links_point_into_the_repository() {
    let root = repo_root();
    let headings: Vec<String> = README
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let changelog = include_str!("../../CHANGELOG.md");
    let mut bad = Vec::new();
    for (file, text) in [("README.md", README), ("CHANGELOG.md", changelog)] {
        for (line, target) in links(text) {
            if target.starts_with("https://") || target.starts_with("http://") {
                continue;
            }
            if let Some(fragment) = target.strip_prefix('#') {
                if file == "README.md" && !headings.iter().any(|h| h == fragment) {
                    bad.push(format!("{file}:{line}: no heading makes #{fragment}"));
                }
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            let inside = !path.starts_with('/') && !path.split('/').any(|part| part == "..");
            if !inside || !root.join(path).exists() {
                bad.push(format!(
                    "{file}:{line}: {target} is not a file of this repository"
                ));
            }
        }
    }
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
}

#[test]
fn links_and_anchors_are_found() {
    assert_eq!(
        links("see [a](docs/a.md) and [b](#run-it-as-a-system-service).\n[c](x)"),
        vec![
            (1, "docs/a.md".to_string()),
            (1, "#run-it-as-a-system-service".to_string()),
            (2, "x".to_string())
        ]
    );
    assert_eq!(
        anchor(" Run it as a system service"),
        "run-it-as-a-system-service"
    );
    assert_eq!(
        anchor(" `lockctl run` in place of flock(1)"),
        "lockctl-run-in-place-of-flock1"
    );
}
