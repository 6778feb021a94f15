//! The storage backend boundary: where the lock table lives. Sessions, authorization, limits,
//! the socket and systemd are the same for every backend; a session only talks to a
//! [`Conn`], whichever backend made it.
//!
//! - [`Backend::Local`]: the engine in this process (`engine/`), detached leases in redb
//!   (`store/`). The default, and the fast path: a session calls the engine directly (one
//!   well-predicted branch per call on this enum).
//! - [`Backend::Etcd`] (feature `etcd`): the lock table in an etcd cluster shared by many
//!   daemons (`cluster/`); every request that needs etcd runs as a task and answers through
//!   the connection's mailbox.

use std::sync::Arc;

use lockd_protocol::{Op, Reply, RequestId, Stats};

use crate::config::Config;
use crate::engine::{self, Answer, Engine, Outgoing};
use crate::error::Error;
use crate::peer::{Owner, Push};
use crate::usage;

/// Where the lock table lives.
#[derive(Clone)]
pub enum Backend {
    Local(Arc<Engine>),
    #[cfg(feature = "etcd")]
    Etcd(Arc<crate::cluster::Cluster>),
}

impl Backend {
    /// Per-uid usage counts (connections, holds, waits).
    pub fn usage(&self) -> &usage::Registry {
        match self {
            Backend::Local(e) => e.usage(),
            #[cfg(feature = "etcd")]
            Backend::Etcd(c) => &c.usage,
        }
    }

    /// The local engine, if that is the backend.
    pub fn local(&self) -> Option<&Arc<Engine>> {
        match self {
            Backend::Local(e) => Some(e),
            #[cfg(feature = "etcd")]
            Backend::Etcd(_) => None,
        }
    }

    /// A new connection of `owner`.
    pub fn connect(&self, owner: Owner, config: Arc<Config>) -> Conn {
        match self {
            Backend::Local(e) => Conn::Local(engine::Conn::new(Arc::clone(e), owner, config)),
            #[cfg(feature = "etcd")]
            Backend::Etcd(c) => Conn::Etcd(crate::cluster::Conn::new(Arc::clone(c), owner, config)),
        }
    }
}

/// One connection, on whichever backend. Dropping it is the disconnect.
// The local connection stays inline: it is the hot path, and a session owns exactly one.
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Local(engine::Conn),
    #[cfg(feature = "etcd")]
    Etcd(crate::cluster::Conn),
}

/// Forwards a call to the connection of either backend.
macro_rules! either {
    ($self:expr, $c:ident => $call:expr) => {
        match $self {
            Conn::Local($c) => $call,
            #[cfg(feature = "etcd")]
            Conn::Etcd($c) => $call,
        }
    };
}

impl Conn {
    pub fn owner(&self) -> &Owner {
        either!(self, c => c.owner())
    }

    pub fn config(&self) -> &Arc<Config> {
        either!(self, c => c.config())
    }

    pub fn set_config(&mut self, config: Arc<Config>) {
        either!(self, c => c.set_config(config))
    }

    /// Handles one request. `local_stats` builds the session's statistics (the local
    /// backend's answer; the etcd backend adds the cluster's to it).
    pub fn handle(&mut self, id: RequestId, op: Op, local_stats: impl FnOnce() -> Stats) -> Answer {
        match self {
            Conn::Local(c) => match op {
                Op::Stats => Answer::Now(Ok(Reply::Stats(local_stats()))),
                op => c.handle(id, op),
            },
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => match op {
                Op::Stats => c.stats(id, local_stats()),
                op => c.handle(id, op),
            },
        }
    }

    pub fn take_side_answers(&mut self) -> Vec<(RequestId, Result<Reply, Error>)> {
        either!(self, c => c.take_side_answers())
    }

    pub fn has_timers(&self) -> bool {
        either!(self, c => c.has_timers())
    }

    pub async fn next_timeout(&mut self) -> Option<RequestId> {
        either!(self, c => c.next_timeout().await)
    }

    pub fn on_timeout(&mut self, request: RequestId) -> Outgoing {
        either!(self, c => c.on_timeout(request))
    }

    pub fn on_push(&mut self, push: Push) -> Outgoing {
        either!(self, c => c.on_push(push))
    }

    pub fn written(&mut self, request: RequestId) {
        either!(self, c => c.written(request))
    }

    pub fn sync_usage(&mut self, exact: bool) {
        either!(self, c => c.sync_usage(exact))
    }
}
