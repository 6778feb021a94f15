//! The Debian package: `cargo deb` builds it, it holds the files it should, and (as root, where
//! dpkg works) it installs, the installed `lockctl` talks to the installed `lockd`, and it purges.
//!
//! Building is a release build of minutes, so the test is ignored by `cargo test`; `.ci/run`
//! runs it with `cargo test -p lockd --test it package:: -- --ignored` and
//! `LOCKD_REQUIRE_PACKAGE_TEST=1`, which turns a missing `cargo-deb` into a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use lockd_tests::TestDaemon;

use crate::{code, text, LOCKD, PROMPT};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon/ has a parent")
        .to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Every path the package must install (as `dpkg-deb -c` shows them, without the leading `.`);
/// a man page may be gzipped.
const EXPECTED: &[&str] = &[
    "/usr/bin/lockd",
    "/usr/bin/lockctl",
    "/usr/bin/lockd-bench",
    "/usr/lib/systemd/system/lockd.service",
    "/usr/lib/systemd/system/lockd.socket",
    "/usr/lib/sysusers.d/lockd.conf",
    "/etc/lockd/lockd.toml",
    "/usr/share/man/man8/lockd.8",
    "/usr/share/man/man5/lockd.toml.5",
    "/usr/share/man/man1/lockctl.1",
    "/usr/share/man/man1/lockctl-run.1",
    "/usr/share/bash-completion/completions/lockctl",
    "/usr/share/zsh/vendor-completions/_lockctl",
    "/usr/share/fish/vendor_completions.d/lockctl.fish",
    "/usr/share/doc/lockd/copyright",
    "/usr/share/doc/lockd/README.md",
    "/usr/share/doc/lockd/config.md",
    "/usr/share/doc/lockd/examples/systemd/nightly-backup.service",
    "/usr/share/doc/lockd/examples/systemd/etcd-backend.conf",
];

#[test]
#[ignore = "builds a release .deb (minutes); .ci/run runs it with --ignored"]
fn debian_package_builds_installs_serves_and_purges() {
    let required = std::env::var_os("LOCKD_REQUIRE_PACKAGE_TEST").is_some();
    if !run(&cargo(), &["deb", "--version"]).status.success() {
        assert!(
            !required,
            "cargo-deb is not installed (.ci/run installs it)"
        );
        eprintln!(
            "\n*** SKIPPED: cargo-deb is not installed: cargo install cargo-deb --locked ***\n"
        );
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    // A target directory of its own: the one this test runs from is cargo test's.
    let target = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .expect("the test runs from TARGET/PROFILE/deps/")
        .join("debian-build");
    let out = Command::new(cargo())
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target)
        .args(["deb", "-p", "lockd", "--locked", "--output"])
        .arg(out_dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo deb: {}", text(&out.stderr));
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb wrote a .deb");
    let deb = deb.to_str().unwrap();

    let listing = ok("dpkg-deb", &["-c", deb]);
    eprintln!("{listing}");
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    for want in EXPECTED {
        assert!(
            files
                .iter()
                .any(|f| f == want || *f == format!("{want}.gz")),
            "{want} is not in the package:\n{listing}"
        );
    }
    let conffiles = ok("dpkg-deb", &["-I", deb, "conffiles"]);
    assert!(conffiles.contains("/etc/lockd/lockd.toml"), "{conffiles}");
    for script in ["postinst", "prerm", "postrm"] {
        ok("dpkg-deb", &["-I", deb, script]);
    }

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/dpkg").exists() {
        assert!(!required, "installing the package needs root and dpkg");
        eprintln!("\n*** SKIPPED installing the package: needs root and dpkg ***\n");
        return;
    }
    install_and_use(deb);
}

/// `dpkg -i`, then the installed binaries against each other, then `dpkg --purge`.
fn install_and_use(deb: &str) {
    ok("dpkg", &["-i", deb]);
    let used = std::panic::catch_unwind(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(use_installed());
    });
    let purged = run("dpkg", &["--purge", "lockd"]);
    if let Err(panic) = used {
        std::panic::resume_unwind(panic);
    }
    assert!(purged.status.success(), "{}", text(&purged.stderr));
    assert!(!Path::new("/usr/bin/lockd").exists(), "purge removed lockd");
    assert!(
        !Path::new("/etc/lockd/lockd.toml").exists(),
        "purge removed the conffile"
    );
}

async fn use_installed() {
    assert!(
        run("getent", &["passwd", "lockd"]).status.success(),
        "postinst created the lockd user"
    );
    assert!(run("getent", &["group", "lockd"]).status.success());
    ok(
        "/usr/bin/lockd",
        &["--check-config", "/etc/lockd/lockd.toml"],
    );
    for bin in ["lockd", "lockctl", "lockd-bench"] {
        let version = ok(&format!("/usr/bin/{bin}"), &["--version"]);
        assert_eq!(
            version.trim(),
            format!("{bin} {}", env!("CARGO_PKG_VERSION"))
        );
    }
    // No systemd as PID 1 here: start the installed daemon on a temporary socket and data
    // directory, and use it with the installed lockctl.
    let d = TestDaemon::start("/usr/bin/lockd").await;
    let socket = d.socket.to_str().unwrap().to_string();
    let lockctl = |args: &'static [&'static str]| {
        let socket = socket.clone();
        async move {
            let run = tokio::process::Command::new("/usr/bin/lockctl")
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .stdin(Stdio::null())
                .output();
            lockd_tests::within(PROMPT, "installed lockctl", run)
                .await
                .unwrap()
        }
    };
    let out = lockctl(&[
        "run",
        "-n",
        "package-test",
        "--",
        "sh",
        "-c",
        "echo fence=$LOCKD_FENCE",
    ])
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("fence="),
        "{}",
        text(&out.stdout)
    );
    let out = lockctl(&["stats"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    // The man pages are where man finds them.
    if Path::new("/usr/bin/man").exists() {
        let page = ok("man", &["-w", "lockd.toml"]);
        assert!(page.contains("/usr/share/man/man5/"), "{page}");
    }
}

/// The example configuration the package installs loads, and so does every setting in it once
/// uncommented (except the user and group names, which need those accounts).
#[test]
fn example_config_loads_with_every_setting_uncommented() {
    let example = repo().join("debian/lockd.toml");
    ok(LOCKD, &["--check-config", example.to_str().unwrap()]);
    let uncommented: String = std::fs::read_to_string(&example)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting)
                if (setting.starts_with('[') || setting.contains(" = "))
                    && !setting.starts_with("users")
                    && !setting.starts_with("groups") =>
            {
                setting
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(uncommented.contains("\n[limits]\n"), "{uncommented}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lockd.toml");
    std::fs::write(&path, uncommented).unwrap();
    ok(LOCKD, &["--check-config", path.to_str().unwrap()]);
}
