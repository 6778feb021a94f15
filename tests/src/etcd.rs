//! A real etcd cluster for the etcd backend's tests: one or more members on loopback, started
//! from the distribution's `etcd` binary (Debian's `etcd-server`), each with its own data
//! directory; members can be SIGKILLed and restarted on their data.
//!
//! etcd listens on TCP: each cluster takes a random address in 127.0.0.0/8 and ports the kernel
//! chose free there, so parallel tests never meet. Without an etcd binary, [`Etcd::start`] says
//! SKIPPED on stderr and returns `None`; with `LOCKD_REQUIRE_ETCD_TESTS=1` (CI) it panics.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a cluster may take to become healthy.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster (killed when dropped).
pub struct Etcd {
    bin: PathBuf,
    address: Ipv4Addr,
    members: Vec<Member>,
    token: String,
    /// More arguments for every member (etcd's own settings).
    extra: Vec<String>,
    dir: TempDir,
}

/// The etcd binary: `$LOCKD_ETCD_BIN`, else `etcd` on PATH, else `/usr/bin/etcd`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LOCKD_ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

impl Etcd {
    /// Starts a cluster of `members` and waits until every member is healthy; `None` (after
    /// saying SKIPPED) when there is no etcd binary and CI does not require one.
    pub fn start(members: usize, test: &str) -> Option<Etcd> {
        Etcd::start_with(members, test, &[])
    }

    /// [`Etcd::start`] with more arguments for every member (say `--max-txn-ops 16`).
    pub fn start_with(members: usize, test: &str, extra: &[&str]) -> Option<Etcd> {
        let Some(bin) = binary() else {
            if std::env::var_os("LOCKD_REQUIRE_ETCD_TESTS").is_some_and(|v| v == "1") {
                panic!("{test}: no etcd binary (install Debian's etcd-server); CI requires it");
            }
            eprintln!(
                "SKIPPED {test}: no etcd binary on PATH (install Debian's etcd-server, or set LOCKD_ETCD_BIN)"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("lockd-etcd-")
            .tempdir()
            .expect("temp dir");
        let address = random_loopback();
        let ports = free_ports(address, 2 * members);
        let members = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let token = format!("lockd-test-{}", std::process::id());
        let mut etcd = Etcd {
            bin,
            address,
            members,
            token,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir,
        };
        for i in 0..etcd.members.len() {
            etcd.spawn(i);
        }
        etcd.wait_healthy(&(0..etcd.members.len()).collect::<Vec<_>>());
        Some(etcd)
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{}", self.address, self.members[i].client_port)
    }

    /// A directory for the test's files (configuration files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a lockd configuration naming this cluster and returns its path.
    pub fn lockd_config(&self, node: &str, session_ttl: &str, request_timeout: &str) -> PathBuf {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let text = format!(
            "[backend]\nkind = \"etcd\"\nendpoints = [{}]\nprefix = \"/lockd-test/\"\nsession_ttl = \"{session_ttl}\"\nrequest_timeout = \"{request_timeout}\"\nnode = \"{node}\"\n",
            endpoints.join(", ")
        );
        let path = self.dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, self.address, m.peer_port))
            .collect();
        let m = &self.members[i];
        let client = format!("http://{}:{}", self.address, m.client_port);
        let peer = format!("http://{}:{}", self.address, m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let child = Command::new(&self.bin)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.members[i].child = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data and waits until `healthy` members answer healthy.
    pub fn restart(&mut self, i: usize, healthy: &[usize]) {
        assert!(self.members[i].child.is_none(), "kill the member first");
        self.spawn(i);
        self.wait_healthy(healthy);
    }

    /// Waits until each member in `which` answers `/health` with true.
    pub fn wait_healthy(&self, which: &[usize]) {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        for &i in which {
            let addr = SocketAddrV4::new(self.address, self.members[i].client_port);
            while !healthy(addr) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} not healthy within {HEALTHY_TIMEOUT:?}; log:\n{}",
                    self.log_tail(i)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The end of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.members[i].log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `GET /health` answered `{"health":"true"}`.
fn healthy(addr: SocketAddrV4) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// A random address in 127.0.0.0/8 (not 127.0.0.1, where a real etcd may listen).
fn random_loopback() -> Ipv4Addr {
    let mut b = [0u8; 3];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(13);
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    for byte in &mut b {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    Ipv4Addr::new(127, b[0].max(2), b[1], b[2].clamp(1, 254))
}

/// `n` distinct ports the kernel says are free on `address` (all probes held open until each
/// is chosen, so none is handed out twice).
fn free_ports(address: Ipv4Addr, n: usize) -> Vec<u16> {
    let probes: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind(SocketAddrV4::new(address, 0)).expect("bind a probe port"))
        .collect();
    probes
        .iter()
        .map(|l| l.local_addr().expect("probe address").port())
        .collect()
}
