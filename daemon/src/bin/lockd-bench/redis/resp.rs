//! RESP2, the little of it lockd-bench speaks: commands are arrays of bulk strings; replies
//! are simple strings, errors, integers, bulk strings and arrays.

use bytes::{Buf, BufMut, BytesMut};

/// The longest reply lockd-bench accepts (`INFO server` is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// One reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the nil bulk string (`$-1`), e.g. `SET ... NX` on a taken key.
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A short, escaped description for error messages (the server's text is not trusted).
    pub fn describe(&self) -> String {
        match self {
            Reply::Simple(s) => format!("+{}", s.escape_debug()),
            Reply::Error(s) => format!("error {:?}", s),
            Reply::Int(i) => format!(":{i}"),
            Reply::Bulk(None) => "nil".to_string(),
            Reply::Bulk(Some(b)) => format!("{:?}", String::from_utf8_lossy(&b[..b.len().min(80)])),
            Reply::Array(None) => "nil array".to_string(),
            Reply::Array(Some(v)) => format!("an array of {}", v.len()),
        }
    }
}

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode(args: &[&[u8]], out: &mut BytesMut) {
    out.put_u8(b'*');
    put_decimal(out, args.len());
    for a in args {
        out.put_u8(b'$');
        put_decimal(out, a.len());
        out.put_slice(a);
        out.put_slice(b"\r\n");
    }
}

fn put_decimal(out: &mut BytesMut, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

/// Takes one complete reply off the front of `buf`; `Ok(None)` if it is not all there yet.
///
/// # Errors
/// A malformed or oversized reply.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Reply>, String> {
    match parse(buf, 0)? {
        Some((reply, used)) => {
            buf.advance(used);
            Ok(Some(reply))
        }
        None => Ok(None),
    }
}

/// Parses the reply starting at `at`: the reply and the offset just past it.
fn parse(buf: &[u8], at: usize) -> Result<Option<(Reply, usize)>, String> {
    let Some((line, next)) = line(buf, at)? else {
        return Ok(None);
    };
    let Some((&kind, text)) = line.split_first() else {
        return Err("an empty reply line".into());
    };
    let text_str = || String::from_utf8_lossy(text).into_owned();
    match kind {
        b'+' => Ok(Some((Reply::Simple(text_str()), next))),
        b'-' => Ok(Some((Reply::Error(text_str()), next))),
        b':' => Ok(Some((Reply::Int(integer(text)?), next))),
        b'$' => {
            let Some(len) = length(text, "bytes in a bulk string")? else {
                return Ok(Some((Reply::Bulk(None), next)));
            };
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err("a bulk string without its CRLF".into());
            }
            let bytes = buf[next..next + len].to_vec();
            Ok(Some((Reply::Bulk(Some(bytes)), next + len + 2)))
        }
        b'*' => {
            let Some(n) = length(text, "replies in an array")? else {
                return Ok(Some((Reply::Array(None), next)));
            };
            let mut items = Vec::with_capacity(n.min(64));
            let mut at = next;
            for _ in 0..n {
                let Some((item, after)) = parse(buf, at)? else {
                    return Ok(None);
                };
                items.push(item);
                at = after;
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(format!("a reply starting with byte {other:#04x}")),
    }
}

/// The line at `at` without its CRLF, and the offset after the CRLF.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = buf.get(at..).unwrap_or_default();
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if rest.len() > MAX_REPLY => Err("a reply line without an end".into()),
        None => Ok(None),
    }
}

/// A bulk string's or an array's length: `None` for nil (negative), at most [`MAX_REPLY`].
fn length(text: &[u8], what: &str) -> Result<Option<usize>, String> {
    let n = integer(text)?;
    if n < 0 {
        return Ok(None);
    }
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_REPLY)
        .map(Some)
        .ok_or_else(|| format!("{n} {what}"))
}

fn integer(text: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("not an integer: {:?}", String::from_utf8_lossy(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Reply> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(r) = decode(&mut buf).expect("well formed") {
            out.push(r);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        encode(&[b"SET", b"k", b"", b"PX", b"30000"], &mut out);
        assert_eq!(
            &out[..],
            b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n$2\r\nPX\r\n$5\r\n30000\r\n"
        );
    }

    #[test]
    fn every_reply_kind() {
        let replies = decode_all(
            b"+OK\r\n-ERR no\r\n:1\r\n$-1\r\n$3\r\na\r\n\r\n*2\r\n:0\r\n$0\r\n\r\n*-1\r\n",
        );
        assert_eq!(
            replies,
            [
                Reply::Simple("OK".into()),
                Reply::Error("ERR no".into()),
                Reply::Int(1),
                Reply::Bulk(None),
                Reply::Bulk(Some(b"a\r\n".to_vec())),
                Reply::Array(Some(vec![Reply::Int(0), Reply::Bulk(Some(Vec::new()))])),
                Reply::Array(None),
            ]
        );
    }

    #[test]
    fn partial_replies_wait_for_more() {
        let whole = b"*2\r\n$5\r\nhello\r\n:42\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b":x\r\n",
            b"$3\r\nabcde\r\n",
            b"$99999999999\r\n",
        ] {
            assert!(decode(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
    }
}
