//! The document's tables of variant indexes, error codes and constants, checked against the
//! crate: each enum's table must list exactly its variants, at the index bincode writes.

use lockd_protocol::codec::MAX_FRAME_CEILING;
use lockd_protocol::key::{MAX_NAMESPACE_LEN, MAX_NAME_LEN};
use lockd_protocol::ticket::TICKET_LEN;
use lockd_protocol::{
    Acquire, Change, ClientMessage, ErrorCode, Event, Grant, Hello, Key, Limits, ListQuery,
    LostReason, Mode, Op, Reply, Request, Response, ServerMessage, Stats, Wait, Welcome, WireError,
    DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{backup_key, backup_owner, doc_config, ticket};

/// The cells of every table row in the section under `heading` (a heading line whose text
/// after the `#`s is exactly `heading`), up to the next heading. `None` if there is no such
/// heading.
pub fn section_rows(doc: &str, heading: &str) -> Option<Vec<Vec<String>>> {
    let mut lines = doc.lines();
    lines.find(|l| l.starts_with('#') && l.trim_start_matches('#').trim() == heading)?;
    let mut rows = Vec::new();
    let mut in_fence = false;
    for line in lines {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && line.starts_with('#') {
            break;
        } else if !in_fence && line.starts_with('|') {
            let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
            rows.push(inner.split('|').map(|c| c.trim().to_string()).collect());
        }
    }
    Some(rows)
}

/// `(index, variant)` of the rows under `heading` whose first cell is a number.
fn variant_rows(doc: &str, heading: &str) -> Result<Vec<(u32, String)>, String> {
    let rows = section_rows(doc, heading).ok_or(format!("no heading {heading:?}"))?;
    Ok(rows
        .iter()
        .filter_map(|cells| {
            let index = cells.first()?.parse().ok()?;
            let name = cells.get(1)?.trim_matches('`').to_string();
            Some((index, name))
        })
        .collect())
}

/// The variant name of an enum value, from its `Debug` form.
fn variant_name<T: std::fmt::Debug>(value: &T) -> String {
    format!("{value:?}")
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// The variant index bincode writes first for `value` (a one-byte varint for every enum here).
fn variant_index<T: Serialize>(value: &T) -> Result<u32, String> {
    let bytes = bincode::serde::encode_to_vec(value, doc_config()).map_err(|e| e.to_string())?;
    match bytes.first() {
        Some(&b) if b <= 250 => Ok(u32::from(b)),
        _ => Err(format!("unexpected encoding {bytes:02x?}")),
    }
}

/// The table under `heading` lists exactly the variants of `samples` (one value of each
/// variant of `T`) at their indexes, and `T` has no variant beyond them.
fn check_enum<T>(doc: &str, heading: &str, samples: &[T]) -> Result<(), String>
where
    T: Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut actual = samples
        .iter()
        .map(|s| Ok((variant_index(s)?, variant_name(s))))
        .collect::<Result<Vec<_>, String>>()?;
    actual.sort();
    let documented = variant_rows(doc, heading)?;
    if documented != actual {
        return Err(format!(
            "table {heading:?} lists {documented:?}, the code has {actual:?}"
        ));
    }
    // Completeness: the index after the last sample is not a variant of T.
    let next = u8::try_from(samples.len()).map_err(|e| e.to_string())?;
    let err = bincode::serde::decode_from_slice::<T, _>(&[next], doc_config())
        .err()
        .ok_or(format!("{heading}: index {next} decodes"))?;
    if !err.to_string().contains("variant index") {
        return Err(format!(
            "{heading}: index {next} is not refused as an unknown variant ({err}); \
             is a sample missing from this test?"
        ));
    }
    Ok(())
}

const ALL_CODES: [ErrorCode; 11] = [
    ErrorCode::Conflict,
    ErrorCode::Timeout,
    ErrorCode::NotHolder,
    ErrorCode::Deadlock,
    ErrorCode::PermissionDenied,
    ErrorCode::InvalidArgument,
    ErrorCode::LimitExceeded,
    ErrorCode::Unavailable,
    ErrorCode::VersionMismatch,
    ErrorCode::Protocol,
    ErrorCode::Internal,
];

fn ops() -> Vec<Op> {
    let key = backup_key;
    vec![
        Op::Acquire(Acquire {
            key: key(),
            mode: Mode::Exclusive,
            wait: Wait::No,
            lease_ms: None,
            detach: false,
            permits: None,
            lock_delay_ms: 0,
            data: Vec::new(),
        }),
        Op::Release { ticket: ticket() },
        Op::Cancel { request: 1 },
        Op::Ping,
        Op::Renew {
            ticket: ticket(),
            lease_ms: None,
        },
        Op::Describe { key: key() },
        Op::List(ListQuery {
            namespace: None,
            prefix: String::new(),
            after: None,
            limit: 1,
        }),
        Op::ForceRelease { key: key() },
        Op::Watch { key: key() },
        Op::Unwatch { key: key() },
        Op::Stats,
    ]
}

fn replies() -> Vec<Reply> {
    use lockd_protocol::{Description, ListPage};
    vec![
        Reply::Granted(Grant {
            ticket: ticket(),
            fence: 1,
            mode: Mode::Exclusive,
            expires_at_ms: None,
        }),
        Reply::Released,
        Reply::Cancelled(false),
        Reply::Pong,
        Reply::Renewed { expires_at_ms: 1 },
        Reply::Described(Description {
            key: backup_key(),
            holders: vec![],
            waiters: vec![],
            omitted_holders: 0,
            omitted_waiters: 0,
            permits: None,
            delayed_until_ms: None,
        }),
        Reply::Listed(ListPage {
            keys: vec![],
            next: None,
        }),
        Reply::ForceReleased { holds: 0 },
        Reply::Watching,
        Reply::Unwatched(false),
        Reply::Stats(Stats::default()),
    ]
}

fn changes() -> Vec<Change> {
    vec![
        Change::Granted {
            fence: 1,
            mode: Mode::Shared,
            owner: backup_owner(None),
        },
        Change::Released { fence: 1 },
        Change::Expired { fence: 1 },
        Change::Forced { fence: 1 },
        Change::Disconnected { fence: 1 },
        Change::Deadlock {
            owner: backup_owner(None),
            cycle: String::new(),
        },
    ]
}

fn client_messages() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: String::new(),
        }),
        ClientMessage::Request(Request {
            id: 1,
            op: Op::Ping,
        }),
    ]
}

fn server_messages() -> Vec<ServerMessage> {
    vec![
        ServerMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: String::new(),
            limits: Limits {
                max_frame: 0,
                max_data: 0,
                max_lease_ms: 0,
            },
        }),
        ServerMessage::Rejected(WireError::new(ErrorCode::Protocol, "")),
        ServerMessage::Response(Response {
            id: 1,
            result: Ok(Reply::Pong),
        }),
        ServerMessage::Event(Event::ShuttingDown),
    ]
}

fn events() -> Vec<Event> {
    vec![
        Event::HoldLost {
            key: backup_key(),
            fence: 1,
            reason: LostReason::Expired,
        },
        Event::ShuttingDown,
        Event::Watch {
            key: Key::in_default("k").expect("a valid key"),
            change: Change::Released { fence: 1 },
        },
    ]
}

/// Every enum table of the document; `Err` lists what differs.
pub fn check_enum_tables(doc: &str) -> Vec<String> {
    let results = [
        check_enum(doc, "`ClientMessage`", &client_messages()),
        check_enum(doc, "`ServerMessage`", &server_messages()),
        check_enum(doc, "`Op`", &ops()),
        check_enum(doc, "`Wait`", &[Wait::No, Wait::Millis(1), Wait::Forever]),
        check_enum(doc, "`Mode`", &[Mode::Exclusive, Mode::Shared]),
        check_enum(doc, "`Reply`", &replies()),
        check_enum(doc, "`Event`", &events()),
        check_enum(
            doc,
            "`LostReason`",
            &[
                LostReason::Expired,
                LostReason::ForceReleased,
                LostReason::ReleasedElsewhere,
            ],
        ),
        check_enum(doc, "`Change`", &changes()),
        check_enum(doc, "Error codes", &ALL_CODES),
        check_code_names(doc),
    ];
    results.into_iter().filter_map(Result::err).collect()
}

/// The error code table's third column is each code's stable name.
fn check_code_names(doc: &str) -> Result<(), String> {
    let rows = section_rows(doc, "Error codes").ok_or("no heading \"Error codes\"")?;
    for code in ALL_CODES {
        let variant = format!("`{code:?}`");
        let name = format!("`{}`", code.as_str());
        let found = rows
            .iter()
            .any(|cells| cells.get(1) == Some(&variant) && cells.get(2) == Some(&name));
        if !found {
            return Err(format!(
                "the error code table has no row {variant} | {name}"
            ));
        }
    }
    Ok(())
}

/// The constants table under "Limits" gives each constant its value in the crate.
pub fn check_constants(doc: &str) -> Vec<String> {
    let Some(rows) = section_rows(doc, "Limits") else {
        return vec!["no heading \"Limits\"".into()];
    };
    let expected: [(&str, u64); 6] = [
        ("PROTOCOL_VERSION", u64::from(PROTOCOL_VERSION)),
        ("DEFAULT_MAX_FRAME", DEFAULT_MAX_FRAME as u64),
        ("MAX_FRAME_CEILING", MAX_FRAME_CEILING as u64),
        ("MAX_NAMESPACE_LEN", MAX_NAMESPACE_LEN as u64),
        ("MAX_NAME_LEN", MAX_NAME_LEN as u64),
        ("TICKET_LEN", TICKET_LEN as u64),
    ];
    expected
        .iter()
        .filter_map(|(name, value)| {
            let cell = format!("`{name}`");
            let row = rows.iter().find(|cells| cells.first() == Some(&cell));
            match row.and_then(|cells| cells.get(1)) {
                Some(v) if *v == value.to_string() => None,
                Some(v) => Some(format!("the limits table says {name} is {v}, not {value}")),
                None => Some(format!("the limits table has no row for {name}")),
            }
        })
        .collect()
}
