//! Tests of the admin commands' output (JSON fields, escaping, time formatting).

use super::*;

#[test]
fn describe_json_always_says_how_many_were_omitted() {
    let mut d = Description {
        key: Key::new("default", "job").unwrap(),
        holders: vec![],
        waiters: vec![],
        omitted_holders: 0,
        omitted_waiters: 0,
        permits: None,
        delayed_until_ms: None,
    };
    let v = describe_json(&d);
    assert_eq!(
        (&v["omitted_holders"], &v["omitted_waiters"]),
        (&json!(0), &json!(0))
    );
    d.omitted_holders = 12;
    d.omitted_waiters = 3;
    let v = describe_json(&d);
    assert_eq!(
        (&v["omitted_holders"], &v["omitted_waiters"]),
        (&json!(12), &json!(3))
    );
}

#[test]
fn describe_json_has_permits_and_lock_delay_null_when_absent() {
    let mut d = Description {
        key: Key::new("default", "pool").unwrap(),
        holders: vec![],
        waiters: vec![],
        omitted_holders: 0,
        omitted_waiters: 0,
        permits: None,
        delayed_until_ms: None,
    };
    let v = describe_json(&d);
    assert_eq!(v["permits"], serde_json::Value::Null);
    assert_eq!(v["delayed_until_ms"], serde_json::Value::Null);
    assert!(v.as_object().unwrap().contains_key("permits"));
    assert!(v.as_object().unwrap().contains_key("delayed_until_ms"));
    d.permits = Some(3);
    d.delayed_until_ms = Some(1_700_000_000_123);
    let v = describe_json(&d);
    assert_eq!(v["permits"], json!(3));
    assert_eq!(v["delayed_until_ms"], json!(1_700_000_000_123u64));
}

#[test]
fn utc_times() {
    assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
    assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
    assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    assert_eq!(utc(4_107_542_399_999), "2100-02-28 23:59:59.999 UTC");
}

fn deadlock() -> Change {
    Change::Deadlock {
        owner: lockd_client::OwnerInfo {
            pid: Some(42),
            uid: 1000,
            gid: 1000,
            client_name: "evil\x1b[2Jname\n".into(),
        },
        cycle: "waiting would close a cycle: pid 42 uid 1000 client \"a\"\x1b[31m waits for default/k2\nfake".into(),
    }
}

#[test]
fn deadlock_events_are_shown_with_control_characters_escaped() {
    let line = change_line(&deadlock());
    assert!(
        line.starts_with("deadlock refused pid=42 uid=1000 "),
        "{line}"
    );
    assert!(!line.chars().any(char::is_control), "{line}");
    assert!(line.contains("client=\"evil\\u{1b}[2Jname\\n\""), "{line}");
    assert!(
        line.contains("client \"a\"\\x1b[31m waits for default/k2\\nfake"),
        "{line}"
    );

    let v = change_json(&Key::new("default", "k2").unwrap(), &deadlock(), 7);
    assert_eq!(v["event"], "deadlock");
    assert_eq!(v["fence"], serde_json::Value::Null);
    assert_eq!(v["pid"], 42);
    assert_eq!(v["uid"], 1000);
    assert_eq!(v["client"], "evil\x1b[2Jname\n");
    assert!(v["cycle"].as_str().unwrap().ends_with("default/k2\nfake"));
    assert!(!v.to_string().chars().any(char::is_control));
}

#[test]
fn printable_leaves_ordinary_text_alone() {
    assert_eq!(printable("lockctl run make"), "lockctl run make");
    assert_eq!(printable("ünï \"q\" \\"), "ünï \"q\" \\");
    assert_eq!(printable("a\tb\u{7f}"), "a\\tb\\x7f");
    assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
}
