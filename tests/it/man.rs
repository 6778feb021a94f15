//! The manual pages and shell completions checked in under `man/` and `completions/` are what
//! the binaries and `docs/config.md` produce now; `--version` works on every binary.
//!
//! Regenerate them with `LOCKD_BLESS=1 cargo test -p lockd --test it man::`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{text, LOCKCTL, LOCKD};

const LOCKD_BENCH: &str = env!("CARGO_BIN_EXE_lockd-bench");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon/ has a parent")
        .to_path_buf()
}

fn run(bin: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        text(&out.stderr)
    );
    out.stdout
}

/// Every generated file, by its path under the repository.
fn generate() -> BTreeMap<String, Vec<u8>> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    run(LOCKD, &["--generate-man", dir]);
    run(LOCKCTL, &["--generate-man", dir]);
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        files.insert(format!("man/{name}"), std::fs::read(&path).unwrap());
    }
    let config_md = std::fs::read_to_string(repo().join("docs/config.md")).unwrap();
    files.insert(
        "man/lockd.toml.5".into(),
        config_page(&config_md).into_bytes(),
    );
    for (shell, name) in [
        ("bash", "lockctl.bash"),
        ("zsh", "_lockctl"),
        ("fish", "lockctl.fish"),
    ] {
        files.insert(
            format!("completions/{name}"),
            run(LOCKCTL, &["completions", shell]),
        );
    }
    files
}

/// The checked-in files under `man/` and `completions/`.
fn checked_in() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for dir in ["man", "completions"] {
        let Ok(entries) = std::fs::read_dir(repo().join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            files.insert(format!("{dir}/{name}"), std::fs::read(&path).unwrap());
        }
    }
    files
}

#[test]
fn man_pages_and_completions_are_current() {
    let want = generate();
    let have = checked_in();
    if std::env::var_os("LOCKD_BLESS").is_some() {
        for stale in have.keys().filter(|k| !want.contains_key(*k)) {
            std::fs::remove_file(repo().join(stale)).unwrap();
        }
        for (path, bytes) in &want {
            let path = repo().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        eprintln!("wrote {} files under man/ and completions/", want.len());
        return;
    }
    let differ: std::collections::BTreeSet<&String> = want
        .keys()
        .chain(have.keys())
        .filter(|k| want.get(*k) != have.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "stale or missing: {differ:?}; regenerate with \
         `LOCKD_BLESS=1 cargo test -p lockd --test it man::` and commit the result"
    );
    for page in [
        "man/lockd.8",
        "man/lockctl.1",
        "man/lockctl-run.1",
        "man/lockd.toml.5",
    ] {
        assert!(want.contains_key(page), "no {page}");
    }
}

/// groff reads every page without a warning (skipped where groff is missing).
#[test]
fn man_pages_render_without_warnings() {
    if !Path::new("/usr/bin/groff").exists() {
        eprintln!("SKIPPED: groff is not installed");
        return;
    }
    for (path, bytes) in generate().iter().filter(|(p, _)| p.starts_with("man/")) {
        let mut child = Command::new("/usr/bin/groff")
            .args(["-man", "-ww", "-z", "-Tutf8"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{path}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn every_binary_prints_its_version() {
    for (bin, name) in [
        (LOCKD, "lockd"),
        (LOCKCTL, "lockctl"),
        (LOCKD_BENCH, "lockd-bench"),
    ] {
        let out = text(&run(bin, &["--version"]));
        assert_eq!(out.trim(), format!("{name} {VERSION}"), "{bin}");
    }
}

/// lockd.toml(5), rendered from `docs/config.md`: its title becomes the NAME line, its
/// paragraphs, code blocks, `##` sections and key table become roff.
fn config_page(md: &str) -> String {
    let mut out = format!(".TH LOCKD.TOML 5 \"\" \"lockd {VERSION}\"\n");
    let mut lines = md.lines().peekable();
    let mut para: Vec<String> = Vec::new();
    let flush = |para: &mut Vec<String>, out: &mut String| {
        if !para.is_empty() {
            out.push_str(".PP\n");
            out.push_str(&para.join("\n"));
            out.push('\n');
            para.clear();
        }
    };
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix("# ") {
            out.push_str(".SH NAME\nlockd.toml \\- ");
            out.push_str(&inline(title.trim_start_matches("lockd ")));
            out.push_str("\n.SH DESCRIPTION\n");
        } else if let Some(heading) = line.strip_prefix("## ") {
            flush(&mut para, &mut out);
            out.push_str(&format!(".SH {}\n", escape(&heading.to_uppercase())));
        } else if line.starts_with("```") {
            flush(&mut para, &mut out);
            out.push_str(".PP\n.RS 4\n.nf\n");
            for code in lines.by_ref().take_while(|l| !l.starts_with("```")) {
                out.push_str(&escape(code));
                out.push('\n');
            }
            out.push_str(".fi\n.RE\n");
        } else if line.starts_with('|') {
            flush(&mut para, &mut out);
            let mut rows = vec![line];
            while let Some(next) = lines.next_if(|l| l.starts_with('|')) {
                rows.push(next);
            }
            // Header, separator, then one `.TP` entry per key: name, default, meaning.
            for row in rows.iter().skip(2) {
                let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
                if let [key, default, meaning] = cells[..] {
                    out.push_str(&format!(
                        ".TP\n{}\n{} (default: {})\n",
                        inline(key),
                        inline(meaning),
                        inline(default)
                    ));
                }
            }
        } else if line.trim().is_empty() {
            flush(&mut para, &mut out);
        } else {
            para.push(inline(line));
        }
    }
    flush(&mut para, &mut out);
    out.push_str(".SH \"SEE ALSO\"\n\\fBlockd\\fR(8), \\fBlockctl\\fR(1)\n");
    out
}

/// One line of Markdown text in roff: `code` in bold, roff's special characters escaped.
fn inline(md: &str) -> String {
    let mut out = String::new();
    for (i, part) in md.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("\\fB{}\\fR", escape(part)));
        } else {
            out.push_str(&escape(part));
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// Text safe in roff: backslashes and hyphens escaped, no line starting a request.
fn escape(text: &str) -> String {
    let out = text.replace('\\', "\\e").replace('-', "\\-");
    if out.starts_with('.') || out.starts_with('\'') {
        format!("\\&{out}")
    } else {
        out
    }
}
