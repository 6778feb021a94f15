//! Manual pages rendered from the binaries' clap definitions (clap_mangen), plus the sections
//! clap knows nothing of (signals, environment, files, see also), written as roff by the caller.
//!
//! Reached through each binary's hidden `--generate-man DIR`. The
//! pages under `man/` in the repository are this output: `LOCKD_BLESS=1 cargo test -p lockd
//! --test it man::` rewrites them, and the same test fails while they are stale.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap_mangen::Man;

/// What a page adds to clap's sections.
pub struct Extra<'a> {
    /// Manual section: "1" for user commands, "8" for daemons.
    pub section: &'a str,
    /// Heading for the command's `after_help` text (clap_mangen would say "EXTRA").
    pub after_help_heading: &'a str,
    /// Roff appended after clap's sections (`.SH` sections of its own).
    pub roff: &'a str,
}

/// Writes `NAME.SECTION` for `cmd` and `NAME-SUB.SECTION` for each visible subcommand (each of
/// which points back to the main page); returns the files written, main page first.
///
/// # Errors
/// A page could not be written to `dir`.
pub fn write_pages(cmd: clap::Command, extra: &Extra, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut written = vec![write_page(
        &cmd,
        extra.section,
        extra.after_help_heading,
        extra.roff,
        dir,
    )?];
    let see_also = format!(".SH \"SEE ALSO\"\n\\fB{name}\\fR({})\n", extra.section);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(write_page(sub, extra.section, "NOTES", &see_also, dir)?);
    }
    Ok(written)
}

/// One page: clap's title, name, synopsis, description, options and subcommands; the
/// `after_help` text under `after_help_heading`; then `roff`.
fn write_page(
    cmd: &clap::Command,
    section: &str,
    after_help_heading: &str,
    roff: &str,
    dir: &Path,
) -> io::Result<PathBuf> {
    let man = Man::new(cmd.clone()).section(section);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }
    if cmd.get_after_help().is_some() || cmd.get_after_long_help().is_some() {
        let mut after = Vec::new();
        man.render_extra_section(&mut after)?;
        let after = String::from_utf8_lossy(&after).replacen(
            ".SH EXTRA",
            &format!(".SH \"{after_help_heading}\""),
            1,
        );
        page.extend_from_slice(after.as_bytes());
    }
    page.extend_from_slice(roff.as_bytes());
    let path = dir.join(man.get_filename());
    let mut file = std::fs::File::create(&path)?;
    file.write_all(&page)?;
    file.flush()?;
    Ok(path)
}
