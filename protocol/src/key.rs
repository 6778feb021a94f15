//! Validated lock keys: `(namespace, name)` as the contract defines them.

use serde::{Deserialize, Serialize};

/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Maximum namespace length in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Maximum name length in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 256;

/// Why a namespace or name was refused. Nothing is ever truncated or normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("namespace must be 1 to {MAX_NAMESPACE_LEN} bytes of [a-z0-9._-], got {0:?}")]
    BadNamespace(String),
    #[error("lock name must be 1 to {MAX_NAME_LEN} bytes of UTF-8 without control characters, got {len} bytes")]
    BadName { len: usize },
}

/// A lock's identity. Decoding does not validate; call [`Key::validate`] (the daemon does on
/// every request) or build one with [`Key::new`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    /// Builds a validated key.
    ///
    /// # Errors
    /// [`KeyError`] when either part breaks the contract's rules.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Key, KeyError> {
        let key = Key {
            namespace: namespace.into(),
            name: name.into(),
        };
        key.validate()?;
        Ok(key)
    }

    /// Builds a validated key in the `default` namespace.
    ///
    /// # Errors
    /// [`KeyError`] when the name breaks the contract's rules.
    pub fn in_default(name: impl Into<String>) -> Result<Key, KeyError> {
        Key::new(DEFAULT_NAMESPACE, name)
    }

    /// Checks both parts against the contract.
    ///
    /// # Errors
    /// [`KeyError`] naming the part at fault.
    pub fn validate(&self) -> Result<(), KeyError> {
        validate_namespace(&self.namespace)?;
        validate_name(&self.name)
    }
}

/// `namespace/name`, with the characters [`crate::display`] escapes escaped (a decoded key may
/// not be valid, and a valid name may still hold bidirectional controls).
impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::display::Escaped;
        write!(f, "{}/{}", Escaped(&self.namespace), Escaped(&self.name))
    }
}

/// Checks a namespace: 1–64 bytes of `[a-z0-9._-]`.
///
/// # Errors
/// [`KeyError::BadNamespace`].
pub fn validate_namespace(ns: &str) -> Result<(), KeyError> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadNamespace(ns.chars().take(80).collect()))
    }
}

/// Checks a name: 1–256 bytes of UTF-8 with no control characters.
///
/// # Errors
/// [`KeyError::BadName`].
pub fn validate_name(name: &str) -> Result<(), KeyError> {
    // ASCII names (nearly all) are checked a byte at a time; only the others need decoding
    // (C1 controls, U+0080 to U+009F, are two bytes in UTF-8).
    let control = if name.is_ascii() {
        name.bytes().any(|b| b.is_ascii_control())
    } else {
        name.chars().any(char::is_control)
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN || control {
        Err(KeyError::BadName { len: name.len() })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_contract_examples() {
        assert!(Key::new("default", "job").is_ok());
        assert!(Key::new("a.b_c-1", "ünïcode name / with spaces").is_ok());
        assert!(Key::new("x".repeat(64), "n".repeat(256)).is_ok());
    }

    #[test]
    fn refuses_bad_namespaces() {
        for ns in ["", "UPPER", "sp ace", "slash/", &"x".repeat(65)] {
            assert!(
                matches!(Key::new(ns, "n"), Err(KeyError::BadNamespace(_))),
                "{ns:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_names_without_truncating() {
        for name in [
            "",
            "tab\there",
            "nl\n",
            "del\u{7f}",
            "c1 \u{85} é",
            &"n".repeat(257),
        ] {
            assert!(
                matches!(Key::new("default", name), Err(KeyError::BadName { .. })),
                "{name:?}"
            );
        }
    }
}
