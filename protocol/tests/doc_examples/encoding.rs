//! The encoding rules the document states in prose (varint forms, what a reader refuses, zigzag,
//! tags), checked against bincode as the codec configures it and against the codec itself.

use bytes::BytesMut;
use lockd_protocol::{ClientMessage, Op, Request, ServerCodec};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::Decoder;

use super::doc_config;

fn encode<T: Serialize>(value: T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, doc_config()).expect("encodable")
}

/// The value `bytes` decode to, if they decode whole.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bincode::serde::decode_from_slice::<T, _>(bytes, doc_config()) {
        Ok((value, used)) if used == bytes.len() => Some(value),
        _ => None,
    }
}

/// "Writing: use the shortest form": the document's list of examples.
#[test]
fn varints_are_written_in_the_documented_shortest_forms() {
    let cases: [(u64, &[u8]); 6] = [
        (250, &[0xfa]),
        (251, &[0xfb, 0x00, 0xfb]),
        (1000, &[0xfb, 0x03, 0xe8]),
        (65535, &[0xfb, 0xff, 0xff]),
        (65536, &[0xfc, 0x00, 0x01, 0x00, 0x00]),
        (1 << 32, &[0xfd, 0, 0, 0, 1, 0, 0, 0, 0]),
    ];
    for (value, bytes) in cases {
        assert_eq!(encode(value), bytes, "u64 {value}");
        if let Ok(v) = u32::try_from(value) {
            assert_eq!(encode(v), bytes, "u32 {value}");
        }
        assert_eq!(decode::<u64>(bytes), Some(value));
    }
    // A u8 is one byte as is, even above 250.
    assert_eq!(encode(255u8), [0xff]);
}

/// "Reading": longer forms are accepted, too-wide markers and 0xFF refused.
#[test]
fn readers_accept_longer_forms_and_refuse_markers_too_wide_for_the_type() {
    assert_eq!(decode::<u64>(&[0xfb, 0x00, 0x05]), Some(5));
    assert_eq!(decode::<u32>(&[0xfc, 0x00, 0x00, 0x00, 0x05]), Some(5));
    assert_eq!(decode::<u16>(&[0xfc, 0, 0, 0, 5]), None);
    assert_eq!(decode::<u32>(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 5]), None);
    assert_eq!(decode::<u64>(&[0xfe; 17]), None);
    assert_eq!(decode::<u64>(&[0xff]), None);
    // The codec reads a request whose id is in a longer form than needed.
    let mut frame = BytesMut::from(&[0, 0, 0, 5, 0x01, 0xfb, 0x00, 0x05, 0x03][..]);
    let decoded = ServerCodec::default().decode(&mut frame).expect("decodes");
    assert_eq!(
        decoded,
        Some(ClientMessage::Request(Request {
            id: 5,
            op: Op::Ping
        }))
    );
}

/// "Signed integers are zigzag-mapped": the document's examples.
#[test]
fn signed_integers_are_zigzag_varints() {
    let cases: [(i32, &[u8]); 4] = [
        (0, &[0x00]),
        (-1, &[0x01]),
        (1, &[0x02]),
        (4242, &[0xfb, 0x21, 0x24]),
    ];
    for (value, bytes) in cases {
        assert_eq!(encode(value), bytes, "i32 {value}");
    }
}

/// `bool` and `option` tags other than 0 and 1 are invalid; strings must be UTF-8; lengths
/// are varints.
#[test]
fn tags_strings_and_lengths_are_as_documented() {
    assert_eq!(decode::<bool>(&[0x01]), Some(true));
    assert_eq!(decode::<bool>(&[0x02]), None);
    assert_eq!(decode::<Option<u8>>(&[0x00]), Some(None));
    assert_eq!(decode::<Option<u8>>(&[0x01, 0x07]), Some(Some(7)));
    assert_eq!(decode::<Option<u8>>(&[0x02, 0x07]), None);
    assert_eq!(decode::<String>(&[0x02, 0xc3, 0x28]), None);
    let long = "x".repeat(300);
    assert_eq!(encode(&long)[..3], [0xfb, 0x01, 0x2c]);
    assert_eq!(encode(vec![(String::from("a"), 1u64)]), [1, 1, b'a', 1]);
    assert_eq!(
        encode(Result::<u8, u8>::Err(3)),
        [1, 3],
        "result: Ok is variant 0, Err variant 1"
    );
}
