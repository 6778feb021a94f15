//! Human output: aligned columns, durations like `12.3s`, ages like `3m ago`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `850ms`, `12.3s`, `3m12s`, `2h5m`, `3d4h`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{}s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `3m ago` for a past instant, `in 12.3s` for a future one (milliseconds since the epoch).
pub fn relative(at_ms: u64) -> String {
    let now = now_ms();
    if at_ms <= now {
        format!("{} ago", duration(now - at_ms))
    } else {
        format!("in {}", duration(at_ms - now))
    }
}

/// Prints rows as left-aligned columns separated by two spaces (the last column unpadded).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Shows opaque hold data: as text when it is UTF-8 with nothing [`lockd_protocol::display`]
/// would escape (no control or bidirectional characters), else as hex.
pub fn data(bytes: &[u8]) -> String {
    use lockd_protocol::display::needs_escape;
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(needs_escape) => s.to_string(),
        _ => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_the_contract() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(12_300), "12.3s");
        assert_eq!(duration(192_000), "3m12s");
        assert_eq!(duration(7_500_000), "2h5m");
        assert_eq!(duration(3 * 86_400_000 + 4 * 3_600_000), "3d4h");
    }

    #[test]
    fn data_with_controls_or_bidi_characters_is_shown_as_hex() {
        assert_eq!(data(b"host-a:1234"), "host-a:1234");
        assert_eq!(data(b"a\x1b[2Jb"), "611b5b324a62");
        assert_eq!(data("a\u{202e}b".as_bytes()), "61e280ae62");
        assert_eq!(data(b"\xff"), "ff");
    }
}
