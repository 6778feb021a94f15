//! The byte-exact examples of `docs/protocol.md`, checked against the real codec, so the
//! document cannot drift from the code.
//!
//! Every fenced block whose info string is `hex frame=NAME` is one whole frame (length prefix
//! and payload) written as hexadecimal byte pairs; `#` starts a comment running to the end of
//! the line. For each one this test:
//! 1. checks the length prefix counts exactly the payload bytes that follow;
//! 2. decodes the frame with the codec of the receiving side into the real message type and
//!    compares it with the value [`expected`] builds for `NAME`;
//! 3. encodes that value with the sending side's codec (its hand-written fast path where it
//!    has one) and with the plain bincode path, and requires the document's exact bytes from
//!    both;
//! 4. encodes and decodes the payload with bincode directly, configured as the document says
//!    (standard configuration, big-endian), so the stated configuration is checked too.
//!
//! The names in the document and the names known here must be the same set, each used once.
//! The document's tables of error codes and of limits are checked against the crate as well.

use std::collections::BTreeSet;

use bytes::BytesMut;
use lockd_protocol::codec::encode_frame;
use lockd_protocol::{
    Acquire, Change, ClientCodec, ClientMessage, Description, ErrorCode, Event, Grant, Hello,
    HolderInfo, Key, Limits, ListQuery, LostReason, Mode, Op, OwnerInfo, Reply, Request, Response,
    ServerCodec, ServerMessage, Ticket, Wait, Welcome, WireError, DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

#[path = "doc_examples/encoding.rs"]
mod encoding;
#[path = "doc_examples/tables.rs"]
mod tables;

/// The info-string prefix that marks an example frame.
const FENCE_TAG: &str = "hex frame=";

/// An example's message, in the direction it travels.
#[derive(Debug)]
enum Example {
    /// Sent by the client, read by the daemon.
    Client(ClientMessage),
    /// Sent by the daemon, read by the client.
    Server(ServerMessage),
}

/// One fenced example of the document.
struct Block {
    name: String,
    /// Line of the document where the block's fence opens (1-based), for failure messages.
    line: usize,
    bytes: Vec<u8>,
}

fn read_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Every `hex frame=NAME` block of `doc`, in document order.
fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim();
        match &mut open {
            None => {
                if let Some(name) = trimmed
                    .strip_prefix("```")
                    .and_then(|info| info.trim().strip_prefix(FENCE_TAG))
                {
                    open = Some(Block {
                        name: name.trim().to_string(),
                        line: i + 1,
                        bytes: Vec::new(),
                    });
                }
            }
            Some(block) if trimmed.starts_with("```") => {
                assert!(
                    !block.bytes.is_empty(),
                    "example {:?} (line {}) is empty",
                    block.name,
                    block.line
                );
                out.extend(open.take());
            }
            Some(block) => parse_hex_line(line, i + 1, &mut block.bytes),
        }
    }
    if let Some(block) = open {
        panic!(
            "example {:?} (line {}) is never closed",
            block.name, block.line
        );
    }
    out
}

/// Appends the bytes of one line: pairs of hex digits separated by spaces, then an optional
/// `# comment`.
fn parse_hex_line(line: &str, number: usize, bytes: &mut Vec<u8>) {
    let data = line.split('#').next().unwrap_or_default();
    for token in data.split_whitespace() {
        let byte = (token.len() == 2)
            .then(|| u8::from_str_radix(token, 16).ok())
            .flatten()
            .unwrap_or_else(|| panic!("line {number}: {token:?} is not a byte in hex"));
        bytes.push(byte);
    }
}

/// The key most examples use.
fn backup_key() -> Key {
    Key::new("default", "nightly-backup").expect("a valid key")
}

/// The ticket the examples use (a real one is 16 random bytes).
fn ticket() -> Ticket {
    Ticket::from_bytes([
        0x3f, 0x9c, 0x51, 0x0e, 0xa2, 0x77, 0x4b, 0xd8, 0x06, 0xe1, 0x2a, 0x95, 0xc4, 0x68, 0xbb,
        0x10,
    ])
}

/// The owner the watch and describe examples show.
fn backup_owner(pid: Option<i32>) -> OwnerInfo {
    OwnerInfo {
        pid,
        uid: 1000,
        gid: 1000,
        client_name: "backup.sh".into(),
    }
}

/// 2026-01-01T00:00:00Z in milliseconds since the Unix epoch.
const JAN_2026_MS: u64 = 1_767_225_600_000;

/// The value the document's example `name` must decode to, or `None` for an unknown name.
fn expected(name: &str) -> Option<Example> {
    use Example::{Client, Server};
    let request = |id, op| Client(ClientMessage::Request(Request { id, op }));
    let response = |id, result| Server(ServerMessage::Response(Response { id, result }));
    let example = match name {
        "hello" => Client(ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: "backup.sh".into(),
        })),
        "welcome" => Server(ServerMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: "0.1.0".into(),
            limits: Limits {
                max_frame: 65_536,
                max_data: 1024,
                max_lease_ms: 86_400_000,
            },
        })),
        "rejected-version" => Server(ServerMessage::Rejected(WireError::new(
            ErrorCode::VersionMismatch,
            "this lockd speaks protocol version 2, the client 3; upgrade the older side",
        ))),
        "acquire" => request(
            7,
            Op::Acquire(Acquire {
                key: backup_key(),
                mode: Mode::Exclusive,
                wait: Wait::Millis(5000),
                lease_ms: Some(90_000),
                detach: false,
                permits: None,
                lock_delay_ms: 0,
                data: b"host-a".to_vec(),
            }),
        ),
        "granted" => response(
            7,
            Ok(Reply::Granted(Grant {
                ticket: ticket(),
                fence: 16_777_217,
                mode: Mode::Exclusive,
                expires_at_ms: Some(JAN_2026_MS),
            })),
        ),
        "release" => request(8, Op::Release { ticket: ticket() }),
        "released" => response(8, Ok(Reply::Released)),
        "error-conflict" => response(
            9,
            Err(WireError::new(
                ErrorCode::Conflict,
                "default/nightly-backup is busy",
            )),
        ),
        "ping" => request(300, Op::Ping),
        "pong" => response(300, Ok(Reply::Pong)),
        "renew" => request(
            10,
            Op::Renew {
                ticket: ticket(),
                lease_ms: None,
            },
        ),
        "cancel" => request(11, Op::Cancel { request: 7 }),
        "cancelled" => response(11, Ok(Reply::Cancelled(true))),
        "watch" => request(12, Op::Watch { key: backup_key() }),
        "list" => request(
            13,
            Op::List(ListQuery {
                namespace: None,
                prefix: "nightly-".into(),
                after: None,
                limit: 100,
            }),
        ),
        "described" => response(
            14,
            Ok(Reply::Described(Description {
                key: backup_key(),
                holders: vec![HolderInfo {
                    mode: Mode::Exclusive,
                    fence: 16_777_217,
                    owner: backup_owner(None),
                    acquired_at_ms: JAN_2026_MS - 90_000,
                    expires_at_ms: Some(JAN_2026_MS),
                    detached: true,
                    data: b"host-a".to_vec(),
                }],
                waiters: vec![],
                omitted_holders: 0,
                omitted_waiters: 0,
                permits: None,
                delayed_until_ms: None,
            })),
        ),
        "event-hold-lost" => Server(ServerMessage::Event(Event::HoldLost {
            key: backup_key(),
            fence: 16_777_217,
            reason: LostReason::Expired,
        })),
        "event-watch-granted" => Server(ServerMessage::Event(Event::Watch {
            key: backup_key(),
            change: Change::Granted {
                fence: 16_777_218,
                mode: Mode::Shared,
                owner: backup_owner(Some(4242)),
            },
        })),
        "event-shutting-down" => Server(ServerMessage::Event(Event::ShuttingDown)),
        _ => return None,
    };
    Some(example)
}

/// Every name [`expected`] knows; the document must use each exactly once.
const NAMES: &[&str] = &[
    "hello",
    "welcome",
    "rejected-version",
    "acquire",
    "granted",
    "release",
    "released",
    "error-conflict",
    "ping",
    "pong",
    "renew",
    "cancel",
    "cancelled",
    "watch",
    "list",
    "described",
    "event-hold-lost",
    "event-watch-granted",
    "event-shutting-down",
];

/// The configuration the document states: bincode 2's standard configuration (variable-length
/// integers) with big-endian byte order.
fn doc_config() -> impl bincode::config::Config {
    bincode::config::standard().with_big_endian()
}

/// Checks one example frame in both directions; `Err` says what differs.
fn check_frame<T>(frame: &[u8], value: &T, decoded: T, encoded: &[&[u8]]) -> Result<(), String>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if &decoded != value {
        return Err(format!(
            "decodes to\n  {decoded:?}\nnot the expected\n  {value:?}"
        ));
    }
    for (i, bytes) in encoded.iter().enumerate() {
        if *bytes != frame {
            return Err(format!(
                "encoder {i} writes\n  {}\nnot the document's\n  {}",
                hex(bytes),
                hex(frame)
            ));
        }
    }
    let payload = &frame[4..];
    let direct = bincode::serde::encode_to_vec(value, doc_config())
        .map_err(|e| format!("bincode cannot encode it: {e}"))?;
    if direct != payload {
        return Err(format!(
            "bincode with the documented configuration writes the payload\n  {}\nnot\n  {}",
            hex(&direct),
            hex(payload)
        ));
    }
    let (back, used): (T, usize) = bincode::serde::decode_from_slice(payload, doc_config())
        .map_err(|e| format!("bincode cannot decode the payload: {e}"))?;
    if used != payload.len() || &back != value {
        return Err(format!(
            "bincode reads {used} of {} payload bytes as {back:?}",
            payload.len()
        ));
    }
    Ok(())
}

fn check_block(block: &Block) -> Result<(), String> {
    let frame = block.bytes.as_slice();
    let (prefix, payload) = frame
        .split_first_chunk::<4>()
        .ok_or("shorter than its 4-byte length prefix")?;
    let claimed = u32::from_be_bytes(*prefix) as usize;
    if claimed != payload.len() {
        return Err(format!(
            "its length prefix says {claimed} bytes, {} follow",
            payload.len()
        ));
    }
    let example = expected(&block.name).ok_or("the test does not know this name")?;
    let mut buf = BytesMut::from(frame);
    match example {
        Example::Client(value) => {
            let decoded = ServerCodec::default()
                .decode(&mut buf)
                .map_err(|e| format!("the daemon's codec refuses it: {e}"))?
                .ok_or("the daemon's codec finds no whole frame")?;
            let mut codec = ClientCodec::default();
            let mut fast = BytesMut::new();
            codec.encode(&value, &mut fast).map_err(|e| e.to_string())?;
            let mut by_ref = BytesMut::new();
            if let ClientMessage::Request(r) = &value {
                codec
                    .encode_request(r.id, &r.op, &mut by_ref)
                    .map_err(|e| e.to_string())?;
            } else {
                by_ref = fast.clone();
            }
            let mut plain = BytesMut::new();
            encode_frame(&value, &mut plain, DEFAULT_MAX_FRAME).map_err(|e| e.to_string())?;
            check_frame(frame, &value, decoded, &[&fast, &by_ref, &plain])
        }
        Example::Server(value) => {
            let decoded = ClientCodec::default()
                .decode(&mut buf)
                .map_err(|e| format!("the client's codec refuses it: {e}"))?
                .ok_or("the client's codec finds no whole frame")?;
            let mut fast = BytesMut::new();
            ServerCodec::default()
                .encode(&value, &mut fast)
                .map_err(|e| e.to_string())?;
            let mut plain = BytesMut::new();
            encode_frame(&value, &mut plain, DEFAULT_MAX_FRAME).map_err(|e| e.to_string())?;
            check_frame(frame, &value, decoded, &[&fast, &plain])
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_example_frame_decodes_and_reencodes_byte_for_byte() {
    let doc = read_doc();
    let blocks = blocks(&doc);
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    for block in &blocks {
        if !seen.insert(block.name.as_str()) {
            failures.push(format!("example {:?} appears twice", block.name));
        }
        if let Err(why) = check_block(block) {
            failures.push(format!(
                "example {:?} (docs/protocol.md line {}): {why}\n  document: {}",
                block.name,
                block.line,
                hex(&block.bytes)
            ));
        }
    }
    for name in NAMES {
        if !seen.contains(name) {
            failures.push(format!("example {name:?} is missing from the document"));
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n\n"));
}

#[test]
fn the_enum_tables_list_every_variant_at_its_index() {
    let failures = tables::check_enum_tables(&read_doc());
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

#[test]
fn the_constants_table_matches_the_crate() {
    let failures = tables::check_constants(&read_doc());
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}
