//! Peer-supplied text made safe to show: the one escaping rule for `lockctl`'s human output and
//! the daemon's log lines.
//!
//! Client names, lock names, hold data and error messages come from other local users (or,
//! through a daemon, from their programs). Shown raw, a name like `"x\x1b[31mRED\nfake"` would
//! colour an administrator's terminal and forge a table row or a log line. Every human-facing
//! path therefore shows such text through [`escape`] (or [`Escaped`], or [`escape_bytes`]);
//! JSON output needs nothing more (serde_json escapes control characters itself) and must stay
//! exact, so it never goes through here.
//!
//! The rule, for each character:
//! - `\t`, `\n`, `\r` are shown as those two-character escapes;
//! - every other ASCII control character and DEL (U+0000–U+001F, U+007F) as `\xNN`;
//! - C1 controls (U+0080–U+009F), the Unicode bidirectional controls (U+061C, U+200E, U+200F,
//!   U+202A–U+202E, U+2066–U+2069) and the line and paragraph separators (U+2028, U+2029) as
//!   `\u{NNNN}`;
//! - everything else, printable Unicode and the backslash included, is unchanged.
//!
//! So the output holds no byte that a terminal or a line-oriented log reader acts on, and text
//! without such characters (nearly all of it) is shown exactly as given, without copying.
//! Bytes that are not UTF-8 ([`escape_bytes`]) are shown as `\xNN`. The backslash is not
//! doubled: the result is for eyes, not for parsing back, and escaping is idempotent (escaping
//! an escaped string changes nothing).

use std::borrow::Cow;
use std::fmt::{self, Write};

/// True for a character [`escape`] replaces.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// `s` with every character [`needs_escape`] names replaced by its escape; borrowed (no copy)
/// when there is none.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.chars().any(needs_escape) {
        Cow::Owned(Escaped(s).to_string())
    } else {
        Cow::Borrowed(s)
    }
}

/// Bytes shown as text: UTF-8 runs escaped as by [`escape`], every byte that is not part of
/// valid UTF-8 as `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return escape(s);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        // Writing to a String cannot fail.
        let _ = write!(out, "{}", Escaped(chunk.valid()));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

/// Formats its string escaped (see the module doc), for `format!` and log fields without an
/// intermediate `String`: `tracing::info!(client = %Escaped(&name))`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\t' => f.write_str("\\t")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                c if c.is_ascii() => write!(f, "\\x{:02x}", c as u32)?,
                c => write!(f, "\\u{{{:04x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in [
            "",
            "nightly-backup",
            "ünïcode / with spaces",
            "C:\\path",
            "日本語 ✓",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn the_attack_name_loses_its_escape_and_its_line() {
        let e = escape("x\x1b[31mRED\nfake-line");
        assert_eq!(e, "x\\x1b[31mRED\\nfake-line");
        assert!(!e.contains('\x1b') && !e.contains('\n'));
    }

    #[test]
    fn every_class_is_escaped_as_documented() {
        assert_eq!(escape("\t\r\0\x07\x7f"), "\\t\\r\\x00\\x07\\x7f");
        assert_eq!(escape("a\u{85}b\u{9b}c"), "a\\u{0085}b\\u{009b}c");
        assert_eq!(escape("exe\u{202e}txt.sh"), "exe\\u{202e}txt.sh");
        assert_eq!(
            escape("\u{2028}\u{2029}\u{2066}\u{061c}"),
            "\\u{2028}\\u{2029}\\u{2066}\\u{061c}"
        );
    }

    #[test]
    fn escaping_is_idempotent() {
        let once = escape("a\x1b\nb\u{202e}").into_owned();
        assert_eq!(escape(&once), once);
    }

    #[test]
    fn invalid_utf8_bytes_are_shown_as_hex_escapes() {
        assert_eq!(escape_bytes(b"ok"), "ok");
        assert_eq!(escape_bytes(b"a\xffb\x1b\xc3"), "a\\xffb\\x1b\\xc3");
        assert_eq!(escape_bytes("é\n".as_bytes()), "é\\n");
    }

    #[test]
    fn no_output_byte_is_a_control() {
        let all: String = (0..0x3000u32).filter_map(char::from_u32).collect();
        assert!(!escape(&all).chars().any(needs_escape));
    }
}
