//! The command under the lock: spawning it (with the connection inherited, or exec in place),
//! forwarding signals, reaping what it leaves behind, and its exit status.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use lockd_client::{Client, LockGuard};
use tokio::signal::unix::{signal, SignalKind};

use super::RunArgs;
use crate::exit;

mod child;

/// The signals lockctl forwards to the command.
pub(super) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next of the three signals to arrive.
    pub(super) async fn next(&mut self) -> libc::c_int {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Where signals for the command go: its process, or its whole process group.
#[derive(Clone, Copy)]
pub(super) struct Target {
    pid: Option<i32>,
    group: bool,
}

impl Target {
    fn kill(self, sig: libc::c_int) {
        if let Some(pid) = self.pid {
            let to = if self.group { -pid } else { pid };
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child
            // (and, for a group, the group it leads).
            unsafe { libc::kill(to, sig) };
        }
    }
}

/// The exit code for a command that could not be started.
pub(super) fn cannot_run(program: &str, e: &std::io::Error) -> u8 {
    eprintln!("lockctl: cannot run {program}: {e}");
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// Runs the command while holding `guard`; returns the exit code.
pub(super) async fn supervise(
    args: &RunArgs,
    argv: &[String],
    client: &Client,
    guard: LockGuard,
    mut signals: Signals,
) -> u8 {
    use std::io::IsTerminal;
    let own_group = !std::io::stdin().is_terminal();
    let pass_fd = !args.close;
    // Reaping the command's orphans tells us, once it has exited, whether any of them (which
    // may hold the descriptor) still runs.
    let subreaper = pass_fd && become_subreaper();
    let mut sigchld = if subreaper {
        signal(SignalKind::child()).ok()
    } else {
        None
    };
    if args.verbose {
        eprintln!("lockctl: executing {}", argv.join(" "));
    }
    let mut vars = vec![
        ("LOCKD_FENCE", guard.fence().to_string()),
        ("LOCKD_LOCK", guard.key().name.clone()),
        ("LOCKD_NAMESPACE", guard.key().namespace.clone()),
    ];
    let spawned = if pass_fd {
        // The descriptor stays open while the closure runs (it starts the command).
        client.with_socket_fd(|fd| {
            let fd = fd.as_raw_fd();
            vars.push(("LOCKD_FD", fd.to_string()));
            child::spawn(argv, &vars, own_group, Some(fd))
        })
    } else {
        Some(child::spawn(argv, &vars, own_group, None))
    };
    let mut child = match spawned {
        Some(Ok(c)) => c,
        Some(Err(e)) => return cannot_run(&argv[0], &e),
        None => {
            eprintln!(
                "lockctl: lost lock {} before {} started (the connection to lockd ended)",
                guard.key(),
                argv[0]
            );
            return exit::LOST;
        }
    };
    let target = Target {
        pid: Some(child.id()),
        group: own_group,
    };
    let mut lost = false;
    let kill_deadline = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(kill_deadline);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            why = guard.lost(), if !lost => {
                eprintln!(
                    "lockctl: lost lock {} ({why}); sending SIGTERM to {}, SIGKILL in {:?}",
                    guard.key(), argv[0], args.kill_after
                );
                target.kill(libc::SIGTERM);
                lost = true;
                kill_deadline.as_mut().reset(tokio::time::Instant::now() + args.kill_after);
            }
            _ = &mut kill_deadline, if lost => {
                target.kill(libc::SIGKILL);
                kill_deadline.as_mut().reset(tokio::time::Instant::now() + Duration::MAX / 4);
            }
            signo = signals.next() => target.kill(signo),
            Some(()) = recv(&mut sigchld) => reap_orphans(target.pid),
        }
    };
    if lost {
        // The command's children may outlive it; make sure the group is gone too.
        if target.group {
            target.kill(libc::SIGKILL);
        }
        return exit::LOST;
    }
    let code = match status {
        Ok(status) => exit_code_of(status),
        Err(e) => {
            eprintln!("lockctl: lost track of the command: {e}");
            exit::INTERNAL
        }
    };
    if subreaper && descendants_outlive_the_command().await {
        eprintln!(
            "lockctl: {} left processes behind that inherited the lock's descriptor \
             (LOCKD_FD); {} stays locked until they have all closed it (-o does not pass it)",
            argv[0],
            guard.key()
        );
        // Exit without closing the connection ourselves: dropping the client would shut the
        // socket down for them too. The kernel closes our copy of the descriptor.
        std::process::exit(i32::from(code));
    }
    if let Err(e) = guard.release().await {
        eprintln!(
            "lockctl: releasing the lock failed: {}",
            lockd_protocol::display::escape(&e.to_string())
        );
    }
    code
}

/// Receives from `sig` if there is one; never resolves otherwise.
pub(super) async fn recv(sig: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Makes lockctl the reaper of its command's orphaned descendants.
pub(super) fn become_subreaper() -> bool {
    // SAFETY: prctl with these arguments only changes a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 }
}

/// Reaps the orphans that have exited, leaving the command's own exit to [`child::Child::wait`]
/// (stops at it).
pub(super) fn reap_orphans(command: Option<i32>) {
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is its "nothing found" state for WNOHANG.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t; WNOWAIT only peeks.
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (or left it zeroed: pid 0).
        let pid = unsafe { info.si_pid() };
        if r != 0 || pid == 0 || Some(pid) == command {
            return;
        }
        // SAFETY: reaps exactly that exited orphan.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    }
}

/// After the command was reaped: true if a descendant still runs after a short grace period
/// (processes that got the same signal as the command are usually still exiting; waiting for
/// them lets lockctl release the lock itself, so that the next acquirer does not depend on when
/// the daemon notices the socket closed).
pub(super) async fn descendants_outlive_the_command() -> bool {
    const GRACE: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + GRACE;
    while descendants_remain() {
        if Instant::now() >= deadline {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Reaps exited orphans; true if a descendant still runs.
pub(super) fn descendants_remain() -> bool {
    loop {
        // SAFETY: waitpid with a null status pointer only reaps.
        match unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } {
            0 => return true,
            pid if pid > 0 => continue,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false, // ECHILD: nobody left
        }
    }
}

/// `-F`: replaces lockctl with the command, which inherits the connection and so holds the
/// lock until it (and whatever inherits the descriptor from it) exits. Returns only if the
/// command could not be executed.
pub(super) fn exec_in_place(
    args: &RunArgs,
    argv: &[String],
    client: &Client,
    guard: LockGuard,
) -> u8 {
    use std::os::unix::process::CommandExt;
    if args.verbose {
        eprintln!("lockctl: executing {} in place", argv.join(" "));
    }
    let failed = client.with_socket_fd(|fd| {
        let fd = fd.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on a descriptor the borrow keeps open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return std::io::Error::last_os_error();
        }
        // std resets the signal mask and SIGPIPE's disposition before exec; caught signals
        // return to their defaults by exec itself.
        std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("LOCKD_FENCE", guard.fence().to_string())
            .env("LOCKD_LOCK", &guard.key().name)
            .env("LOCKD_NAMESPACE", &guard.key().namespace)
            .env("LOCKD_FD", fd.to_string())
            .exec()
    });
    match failed {
        // The descriptor is inheritable now, but lockctl exits at once (releasing the lock).
        Some(e) => cannot_run(&argv[0], &e),
        None => {
            eprintln!(
                "lockctl: lost lock {} before {} started (the connection to lockd ended)",
                guard.key(),
                argv[0]
            );
            exit::LOST
        }
    }
}

/// The shell's convention: the exit status, or 128 + the signal that killed the command.
pub(super) fn exit_code_of(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(exit::INTERNAL),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(exit::INTERNAL),
        (None, None) => exit::INTERNAL,
    }
}
