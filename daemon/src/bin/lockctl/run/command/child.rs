//! Starting the command: `clone(CLONE_VM | CLONE_VFORK)` and exec, as posix_spawn does, with
//! the few steps posix_spawn cannot take (the parent-death signal) done in the child.
//!
//! Why not `std::process::Command`: the parent-death signal needs code between fork and exec
//! (`pre_exec`), which makes std fork: the kernel copies lockctl's page tables and lockctl
//! then takes a copy-on-write fault for every page it writes while the command runs. A
//! vfork-style child shares lockctl's memory until it execs (lockctl waits meanwhile), so
//! nothing is copied. The child runs on a stack of its own and, since it shares lockctl's
//! memory, calls only async-signal-safe libc functions on data prepared before the clone; it
//! never allocates, unwinds or returns into Rust code of the parent.
//!
//! What the command gets is what std gave it: an empty signal mask, SIGPIPE (which std
//! ignores in lockctl) and every caught signal at their default, ignored signals still ignored,
//! `execvp`'s PATH search (with its `sh` fallback for scripts without `#!`), lockctl's
//! environment plus the variables set here.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What the child needs, prepared by the parent (the child must not allocate).
struct Plan {
    program: CString,
    /// Null-terminated, pointing into `_strings`.
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    _strings: Vec<CString>,
    own_group: bool,
    /// Made inheritable in the child only (lockctl's copy stays close-on-exec).
    inherit: Option<RawFd>,
    parent: libc::pid_t,
    /// The signals lockctl catches (the child sets them back to their default).
    caught: Vec<libc::c_int>,
    /// Set by the child when it cannot exec (it shares our memory).
    errno: libc::c_int,
}

/// A started command: its pid, and SIGCHLD to learn when it has exited.
pub(super) struct Child {
    pid: libc::pid_t,
    sigchld: Signal,
    status: Option<ExitStatus>,
}

impl Child {
    pub(super) fn id(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits for the command to exit and reaps it.
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let mut raw = 0;
            // SAFETY: waits for our own child without blocking; `raw` is a valid int.
            match unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) } {
                0 => {
                    if self.sigchld.recv().await.is_none() {
                        return Err(io::Error::other("SIGCHLD stream ended"));
                    }
                }
                pid if pid == self.pid => self.status = Some(ExitStatus::from_raw(raw)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Starts `argv` with `vars` added to lockctl's environment, in a process group of its own if
/// `own_group`, inheriting descriptor `inherit`, with SIGTERM as its parent-death signal.
pub(super) fn spawn(
    argv: &[String],
    vars: &[(&str, String)],
    own_group: bool,
    inherit: Option<RawFd>,
) -> io::Result<Child> {
    // Created before the child exists, so its exit cannot be missed.
    let sigchld = signal(SignalKind::child())?;
    let mut plan = plan(argv, vars, own_group, inherit)?;
    let pid = clone_and_exec(&mut plan)?;
    Ok(Child {
        pid,
        sigchld,
        status: None,
    })
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}

fn plan(
    argv: &[String],
    vars: &[(&str, String)],
    own_group: bool,
    inherit: Option<RawFd>,
) -> io::Result<Plan> {
    let program = cstring(argv[0].as_bytes())?;
    let mut strings = Vec::with_capacity(argv.len() + 64);
    for a in argv {
        strings.push(cstring(a.as_bytes())?);
    }
    let args = strings.len();
    for (k, v) in std::env::vars_os() {
        if !vars.iter().any(|(set, _)| OsStr::new(set) == k) {
            strings.push(cstring(env_entry(&k, &v).as_bytes())?);
        }
    }
    for (k, v) in vars {
        strings.push(cstring(env_entry(OsStr::new(k), OsStr::new(v)).as_bytes())?);
    }
    let pointers = |s: &[CString]| -> Vec<*const libc::c_char> {
        s.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    Ok(Plan {
        program,
        argv: pointers(&strings[..args]),
        envp: pointers(&strings[args..]),
        _strings: strings,
        own_group,
        inherit,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        caught: caught_signals(),
        errno: 0,
    })
}

fn env_entry(k: &OsStr, v: &OsStr) -> OsString {
    let mut e = OsString::with_capacity(k.len() + v.len() + 1);
    e.push(k);
    e.push("=");
    e.push(v);
    e
}

/// The signals that have a handler in lockctl now.
fn caught_signals() -> Vec<libc::c_int> {
    (1..=libc::SIGRTMAX())
        .filter(|&sig| {
            // SAFETY: sigaction only reads the disposition into `old`.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            let ok = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } == 0;
            ok && old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN
        })
        .collect()
}

/// Size of the child's stack: execvp's PATH search and script fallback keep their buffers there.
const STACK: usize = 256 * 1024;

fn clone_and_exec(plan: &mut Plan) -> io::Result<libc::pid_t> {
    let stack_len = STACK + plan.argv.len() * std::mem::size_of::<usize>();
    // SAFETY: a fresh anonymous mapping; only the pages the child touches are backed.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            stack_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // No signal handler of lockctl's may run in the child (it would run on our memory): block
    // every signal until the child has set the caught ones back to their default.
    // SAFETY: plain sigset manipulation on valid, initialised sets.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the stack grows down from the end of the mapping; `plan` outlives the child's use
    // of it (CLONE_VFORK: clone returns once the child has exec'd or exited).
    let pid = unsafe {
        libc::clone(
            child,
            stack.cast::<u8>().add(stack_len).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_mut(plan).cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores our mask; unmaps the stack nobody uses any more.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        libc::munmap(stack, stack_len);
    }
    if pid < 0 {
        return Err(clone_error);
    }
    if plan.errno != 0 {
        // The child has exited without exec: reap it.
        // SAFETY: waits for our own, already exited child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        return Err(io::Error::from_raw_os_error(plan.errno));
    }
    Ok(pid)
}

/// The child, until exec. Shares lockctl's memory: async-signal-safe calls only.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Plan`, alive and not touched by the parent until we exec
    // or exit; everything called below is async-signal-safe.
    unsafe {
        let plan = &mut *arg.cast::<Plan>();
        let fail = |plan: &mut Plan| -> libc::c_int {
            plan.errno = (*libc::__errno_location()).max(1);
            libc::_exit(127)
        };
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for &sig in &plan.caught {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        libc::sigaction(libc::SIGPIPE, &dfl, std::ptr::null_mut());
        if plan.own_group && libc::setpgid(0, 0) != 0 {
            return fail(plan);
        }
        if let Some(fd) = plan.inherit {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return fail(plan);
            }
        }
        // If lockctl dies, the command gets SIGTERM.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
            return fail(plan);
        }
        // lockctl died before prctl: do not start at all.
        if libc::getppid() != plan.parent {
            libc::_exit(i32::from(crate::exit::LOST));
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execvpe(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line of /proc/self/status (`SigIgn`, …) as the bits it shows.
    fn status_bits(status: &str, field: &str) -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        u64::from_str_radix(line[field.len() + 1..].trim(), 16).unwrap()
    }

    async fn run_sh(script: &str, vars: &[(&str, String)], inherit: Option<RawFd>) -> ExitStatus {
        let argv = ["sh".to_string(), "-c".to_string(), script.to_string()];
        let mut child = spawn(&argv, vars, false, inherit).unwrap();
        child.wait().await.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_command_gets_its_arguments_variables_status_and_a_clean_signal_state() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$1 $LOCKD_FENCE $HOME\" > {0}; cat /proc/self/status >> {0}; exit 7",
            out.display()
        );
        let argv = ["sh", "-c", &script, "sh", "first"].map(String::from);
        let mut child = spawn(&argv, &[("LOCKD_FENCE", "42".into())], false, None).unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        let text = std::fs::read_to_string(&out).unwrap();
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(text.lines().next().unwrap(), format!("first 42 {home}"));
        assert_eq!(status_bits(&text, "SigBlk:"), 0, "{text}");
        // Ignored as lockctl's own parent left them, except SIGPIPE (std ignores it in lockctl).
        let ours = std::fs::read_to_string("/proc/self/status").unwrap();
        let pipe = 1 << (libc::SIGPIPE - 1);
        assert_eq!(
            status_bits(&text, "SigIgn:"),
            status_bits(&ours, "SigIgn:") & !pipe,
            "{text}"
        );
        // The pid is reaped: waiting again answers the same status.
        assert_eq!(child.wait().await.unwrap().code(), Some(7));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_the_command_inherits_the_descriptor() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        let check = format!("test -e /proc/$$/fd/{fd}");
        assert_eq!(run_sh(&check, &[], Some(fd)).await.code(), Some(0));
        assert_eq!(run_sh(&check, &[], None).await.code(), Some(1));
        // SAFETY: reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn own_group_puts_the_command_in_a_process_group_of_its_own() {
        let argv = ["sleep", "0.2"].map(String::from);
        let mut child = spawn(&argv, &[], true, None).unwrap();
        // SAFETY: getpgid only reads; the child is ours and not yet reaped.
        assert_eq!(unsafe { libc::getpgid(child.id()) }, child.id());
        assert!(child.wait().await.unwrap().success());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn what_cannot_run_is_an_error_as_std_reports_it() {
        let missing = spawn(&["lockctl-no-such-program".into()], &[], false, None);
        assert_eq!(
            missing.err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let denied = spawn(&[plain.display().to_string()], &[], false, None);
        assert_eq!(
            denied.err().map(|e| e.kind()),
            Some(io::ErrorKind::PermissionDenied)
        );
        let nul = spawn(&["sh\0".into()], &[], false, None);
        assert_eq!(
            nul.err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidInput)
        );
    }
}
