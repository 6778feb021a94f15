//! Durations as the shell contract writes them: `500ms`, `30s`, `5m`, `1h`, or plain seconds.

use std::time::Duration;

/// Parses `500ms`, `1.5s`, `30s`, `5m`, `1h`, `2d`, or a plain (possibly fractional) number of
/// seconds.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad(text)),
    };
    let value: f64 = num.parse().map_err(|_| bad(text))?;
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e12).contains(&secs) {
        return Err(bad(text));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn bad(text: &str) -> String {
    format!("invalid duration {text:?}: use e.g. 500ms, 30s, 5m, 1h or plain seconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_forms() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse("0.25").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn rejects_garbage() {
        for t in ["", "s", "5x", "-1", "1.2.3s", "ms5"] {
            assert!(parse(t).is_err(), "{t:?}");
        }
    }
}
