//! The TOML configuration file: parsed strictly (unknown keys are errors), names resolved to
//! ids, and merged into [`Config`]. Every key and its default is documented in docs/config.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockd_protocol::users;
use serde::Deserialize;

use crate::auth::{Allowed, Authz};
use crate::config::{
    Backend, Config, EtcdConfig, Limits, DEFAULT_REQUEST_TIMEOUT, DEFAULT_SESSION_TTL,
};
use crate::duration;

/// The default configuration file, read when present and no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/lockd/lockd.toml";

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A user or group: a name (resolved through the system databases) or a number.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum Id {
    Number(u32),
    Name(String),
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    /// Octal, as a string: "0660".
    socket_mode: Option<String>,
    socket_group: Option<Id>,
    long_hold: Option<String>,
    #[serde(default)]
    admins: Members,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    namespaces: HashMap<String, Members>,
    backend: Option<BackendFile>,
}

/// `[backend]`: where the lock table lives.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    kind: String,
    endpoints: Option<Vec<String>>,
    prefix: Option<String>,
    session_ttl: Option<String>,
    node: Option<String>,
    request_timeout: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Members {
    #[serde(default)]
    users: Vec<Id>,
    #[serde(default)]
    groups: Vec<Id>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_connections: Option<usize>,
    max_connections_per_uid: Option<usize>,
    max_holds_per_connection: Option<usize>,
    max_holds_per_uid: Option<usize>,
    max_waits_per_connection: Option<usize>,
    max_waits_per_uid: Option<usize>,
    max_watches_per_connection: Option<usize>,
    max_frame: Option<usize>,
    max_data: Option<usize>,
    max_lease: Option<String>,
    max_lock_delay: Option<String>,
    write_timeout: Option<String>,
}

/// Reads and validates `path`; the result is applied with [`Loaded::apply`].
///
/// # Errors
/// [`ConfigError`] naming the file and, for syntax and unknown keys, the line.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// A validated file, with names resolved.
#[derive(Debug)]
pub struct Loaded {
    file: File,
    socket_mode: Option<u32>,
    socket_gid: Option<u32>,
    long_hold: Option<Duration>,
    max_lease: Option<Duration>,
    max_lock_delay: Option<Duration>,
    write_timeout: Option<Duration>,
    authz: Authz,
    backend: Option<Backend>,
}

fn parse(text: &str) -> Result<Loaded, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let socket_mode = file
        .socket_mode
        .as_deref()
        .map(|m| {
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| format!("socket_mode = {m:?} is not an octal mode like \"0660\""))
        })
        .transpose()?;
    let socket_gid = file
        .socket_group
        .as_ref()
        .map(|g| gid(g, "socket_group"))
        .transpose()?;
    let dur = |v: &Option<String>, key: &str| {
        v.as_deref()
            .map(|d| duration::parse(d).map_err(|e| format!("{key}: {e}")))
            .transpose()
    };
    let long_hold = dur(&file.long_hold, "long_hold")?;
    let max_lease = dur(&file.limits.max_lease, "limits.max_lease")?;
    let max_lock_delay = dur(&file.limits.max_lock_delay, "limits.max_lock_delay")?;
    // The lock table keeps lock-delays as 32-bit milliseconds (about 49 days).
    if max_lock_delay.is_some_and(|d| d.as_millis() > u128::from(u32::MAX)) {
        return Err(
            "limits.max_lock_delay: at most 49 days (the table keeps lock-delays in 32-bit milliseconds)"
                .to_string(),
        );
    }
    let write_timeout = dur(&file.limits.write_timeout, "limits.write_timeout")?;
    let mut namespaces = HashMap::new();
    for (ns, members) in &file.namespaces {
        lockd_protocol::key::validate_namespace(ns)
            .map_err(|e| format!("[namespaces.{ns}]: {e}"))?;
        let section = format!("[namespaces.{ns}]");
        namespaces.insert(ns.clone(), resolve(members, &section)?);
    }
    let admins = resolve(&file.admins, "[admins]")?;
    let backend = file.backend.as_ref().map(backend).transpose()?;
    Ok(Loaded {
        backend,
        socket_mode,
        socket_gid,
        long_hold,
        max_lease,
        max_lock_delay,
        write_timeout,
        authz: Authz::new(namespaces, admins),
        file,
    })
}

/// Checks `[backend]` and fills its defaults.
fn backend(f: &BackendFile) -> Result<Backend, String> {
    let etcd_only = [
        ("endpoints", f.endpoints.is_some()),
        ("prefix", f.prefix.is_some()),
        ("session_ttl", f.session_ttl.is_some()),
        ("node", f.node.is_some()),
        ("request_timeout", f.request_timeout.is_some()),
        ("tls_ca", f.tls_ca.is_some()),
        ("tls_cert", f.tls_cert.is_some()),
        ("tls_key", f.tls_key.is_some()),
    ];
    match f.kind.as_str() {
        "local" => match etcd_only.iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(format!(
                "[backend] {key} is a setting of kind = \"etcd\"; remove it or set kind = \"etcd\""
            )),
            None => Ok(Backend::Local),
        },
        "etcd" => etcd_backend(f).map(Backend::Etcd),
        other => Err(format!(
            "[backend] kind = {other:?}: it is \"local\" (the default) or \"etcd\""
        )),
    }
}

fn etcd_backend(f: &BackendFile) -> Result<EtcdConfig, String> {
    let endpoints = f.endpoints.clone().unwrap_or_default();
    if endpoints.is_empty() {
        return Err(
            "[backend] kind = \"etcd\" needs endpoints = [\"http://HOST:2379\", ...]".into(),
        );
    }
    for e in &endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!(
                "[backend] endpoints: {e:?} is not an http:// or https:// address"
            ));
        }
    }
    let prefix = f.prefix.clone().unwrap_or_else(|| "/lockd/".into());
    if prefix.is_empty() || !prefix.ends_with('/') {
        return Err(format!(
            "[backend] prefix = {prefix:?}: it must end with '/' (like \"/lockd/\")"
        ));
    }
    let dur = |v: &Option<String>, key: &str, default: Duration| {
        v.as_deref()
            .map(|d| duration::parse(d).map_err(|e| format!("[backend] {key}: {e}")))
            .transpose()
            .map(|d| d.unwrap_or(default))
    };
    let session_ttl = dur(&f.session_ttl, "session_ttl", DEFAULT_SESSION_TTL)?;
    if session_ttl < Duration::from_secs(2) || session_ttl.subsec_nanos() != 0 {
        return Err(format!(
            "[backend] session_ttl = {:?}: etcd leases count whole seconds; use 2s or more",
            f.session_ttl.as_deref().unwrap_or_default()
        ));
    }
    let request_timeout = dur(
        &f.request_timeout,
        "request_timeout",
        DEFAULT_REQUEST_TIMEOUT,
    )?;
    if request_timeout.is_zero() || request_timeout >= session_ttl {
        return Err(format!(
            "[backend] request_timeout must be above 0 and below session_ttl ({session_ttl:?})"
        ));
    }
    if f.tls_cert.is_some() != f.tls_key.is_some() {
        return Err("[backend] tls_cert and tls_key go together".into());
    }
    let node = match &f.node {
        Some(n) if !n.is_empty() && n.len() <= 255 => n.clone(),
        Some(n) => return Err(format!("[backend] node = {n:?}: 1 to 255 bytes")),
        None => users::host_name().unwrap_or_else(|| "localhost".into()),
    };
    Ok(EtcdConfig {
        endpoints,
        prefix,
        session_ttl,
        node,
        request_timeout,
        tls_ca: f.tls_ca.clone(),
        tls_cert: f.tls_cert.clone(),
        tls_key: f.tls_key.clone(),
    })
}

fn resolve(m: &Members, section: &str) -> Result<Allowed, String> {
    let uids = m
        .users
        .iter()
        .map(|u| uid(u, &format!("{section} users")))
        .collect::<Result<_, _>>()?;
    let gids = m
        .groups
        .iter()
        .map(|g| gid(g, &format!("{section} groups")))
        .collect::<Result<_, _>>()?;
    Ok(Allowed { uids, gids })
}

/// Resolves a user; a name is looked up with the thread-safe `getpwnam_r` (a reload runs on a
/// blocking thread, beside the daemon's other threads).
fn uid(id: &Id, context: &str) -> Result<u32, String> {
    match id {
        Id::Number(n) => Ok(*n),
        Id::Name(name) => match users::uid_by_name(name) {
            Ok(Some(uid)) => Ok(uid),
            Ok(None) => Err(format!("{context}: unknown user {name:?}")),
            Err(e) => Err(format!("{context}: {e}")),
        },
    }
}

/// Resolves a group, as [`uid`] does (with `getgrnam_r`).
fn gid(id: &Id, context: &str) -> Result<u32, String> {
    match id {
        Id::Number(n) => Ok(*n),
        Id::Name(name) => match users::gid_by_name(name) {
            Ok(Some(gid)) => Ok(gid),
            Ok(None) => Err(format!("{context}: unknown group {name:?}")),
            Err(e) => Err(format!("{context}: {e}")),
        },
    }
}

impl Loaded {
    /// Fills everything the command line did not set.
    pub fn apply(self, config: &mut Config, cli: &CliOverrides) {
        let f = &self.file;
        if !cli.socket {
            if let Some(s) = &f.socket {
                config.socket = s.clone();
            }
        }
        if !cli.data_dir {
            if let Some(d) = &f.data_dir {
                config.data_dir = d.clone();
            }
        }
        if !cli.socket_mode {
            if let Some(m) = self.socket_mode {
                config.socket_mode = m;
            }
        }
        config.socket_gid = self.socket_gid.or(config.socket_gid);
        if !cli.long_hold {
            if let Some(l) = self.long_hold {
                config.long_hold = l;
            }
        }
        let l: &mut Limits = &mut config.limits;
        let fl = &f.limits;
        set(&mut l.max_connections, fl.max_connections);
        set(&mut l.max_connections_per_uid, fl.max_connections_per_uid);
        set(&mut l.max_holds_per_conn, fl.max_holds_per_connection);
        set(&mut l.max_holds_per_uid, fl.max_holds_per_uid);
        set(&mut l.max_waits_per_conn, fl.max_waits_per_connection);
        set(&mut l.max_waits_per_uid, fl.max_waits_per_uid);
        set(&mut l.max_watches_per_conn, fl.max_watches_per_connection);
        set(
            &mut l.max_frame,
            fl.max_frame
                .map(|f| f.clamp(1024, lockd_protocol::codec::MAX_FRAME_CEILING)),
        );
        set(&mut l.max_data, fl.max_data);
        set(&mut l.max_lease, self.max_lease);
        set(&mut l.max_lock_delay, self.max_lock_delay);
        set(&mut l.write_timeout, self.write_timeout);
        config.authz.merge(self.authz);
        if let Some(b) = self.backend {
            config.backend = b;
        }
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// Which settings the command line gave explicitly (they win over the file).
#[derive(Debug, Default, Clone, Copy)]
pub struct CliOverrides {
    pub socket: bool,
    pub data_dir: bool,
    pub socket_mode: bool,
    pub long_hold: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses() {
        let text = r#"
            socket = "/run/lockd/lockd.sock"
            socket_mode = "0660"
            socket_group = 0
            long_hold = "10m"
            [admins]
            users = ["root", 1001]
            [limits]
            max_connections = 100
            max_lease = "1h"
            [namespaces.ops]
            users = [1000]
            groups = ["root"]
        "#;
        let loaded = parse(text).unwrap();
        assert_eq!(loaded.socket_mode, Some(0o660));
        assert_eq!(loaded.long_hold, Some(Duration::from_secs(600)));
        assert_eq!(loaded.max_lease, Some(Duration::from_secs(3600)));
        let mut config = Config::for_tests();
        loaded.apply(&mut config, &CliOverrides::default());
        assert_eq!(config.limits.max_connections, 100);
        assert!(config.authz.is_admin(1001, &[]));
    }

    #[test]
    fn a_lock_delay_limit_beyond_the_tables_width_is_refused() {
        assert!(parse("[limits]\nmax_lock_delay = \"49d\"\n").is_ok());
        let err = parse("[limits]\nmax_lock_delay = \"50d\"\n").err().unwrap();
        assert!(
            err.contains("max_lock_delay") && err.contains("49 days"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let err = parse("socket = \"/x\"\nfrobnicate = 1\n").err().unwrap();
        assert!(
            err.contains("frobnicate") && err.contains("line 2"),
            "{err}"
        );
        let err = parse("[limits]\nmax_lease = \"soon\"\n").err().unwrap();
        assert!(err.contains("max_lease"), "{err}");
        let err = parse("[namespaces.ops]\nusers = [\"no-such-user-xyz\"]\n")
            .err()
            .unwrap();
        assert!(err.contains("no-such-user-xyz"), "{err}");
        let err = parse("[namespaces.BAD]\n").err().unwrap();
        assert!(err.contains("BAD"), "{err}");
    }

    #[test]
    fn names_resolve_on_many_threads_at_once() {
        let text = "[admins]\nusers = [\"root\"]\ngroups = [\"root\"]\n";
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(move || (0..100).all(|_| parse(text).is_ok())))
            .collect();
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
    }
}
