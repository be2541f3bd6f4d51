//! The subscribers of one conversation, shared by its actor and its running turn.
//!
//! A turn broadcasts from its own task; the actor adds and removes subscribers. A plain mutex is
//! enough: it is held only to copy frames into bounded sinks, never across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::frames::{Outbound, ServerFrame, Sink};

/// Identifies one subscription (a socket's, or one HTTP request's).
pub type SinkId = u64;

/// A fresh, process-unique subscription id.
pub fn next_sink_id() -> SinkId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// How long a subscription lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every turn, until unsubscribed (a socket).
    Conversation,
    /// Only the turn of the user message with this `client_id` (an HTTP request).
    Turn(String),
}

#[derive(Clone, Default)]
pub struct Fanout {
    inner: Arc<Mutex<HashMap<SinkId, (Sink, Scope)>>>,
}

impl Fanout {
    pub fn add(&self, id: SinkId, sink: Sink, scope: Scope) {
        self.inner.lock().insert(id, (sink, scope));
    }

    pub fn remove(&self, id: SinkId) {
        self.inner.lock().remove(&id);
    }

    /// Forgets listeners that are gone.
    pub fn prune(&self) {
        self.inner.lock().retain(|_, (sink, _)| !sink.is_closed());
    }

    /// Whether anyone listens at all (an idle actor with listeners stays alive).
    pub fn is_empty(&self) -> bool {
        self.inner.lock().is_empty()
    }

    /// Sends `frame` to every conversation subscriber and to the sinks of turn `client_id`;
    /// drops sinks that are gone or cannot keep up.
    pub fn broadcast(&self, frame: &ServerFrame, client_id: Option<&str>) {
        let out = frame.encode();
        self.deliver(&out, client_id);
    }

    fn deliver(&self, out: &Outbound, client_id: Option<&str>) {
        self.inner.lock().retain(|_, (sink, scope)| match scope {
            Scope::Conversation => sink.deliver(out),
            Scope::Turn(c) if Some(c.as_str()) == client_id => sink.deliver(out),
            Scope::Turn(_) => true,
        });
    }

    /// Forgets the sinks that listened only to the turn of `client_id`.
    pub fn end_turn(&self, client_id: &str) {
        self.inner
            .lock()
            .retain(|_, (_, scope)| !matches!(scope, Scope::Turn(c) if c == client_id));
    }
}
