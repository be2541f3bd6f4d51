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

/// Live frames held back for one subscriber while its replay is still being read, at most.
pub const MAX_HELD: usize = 10_000;

struct Subscriber {
    sink: Sink,
    scope: Scope,
    /// Live frames that wait for the subscriber's replay to end, in order.
    held: Option<Vec<Outbound>>,
}

impl Subscriber {
    /// Passes `out` on (or holds it back); `false` drops the subscriber.
    fn deliver(&mut self, out: &Outbound) -> bool {
        match &mut self.held {
            None => self.sink.deliver(out),
            Some(held) if held.len() < MAX_HELD => {
                held.push(out.clone());
                true
            }
            Some(_) => {
                self.sink.close_lagging();
                false
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct Fanout {
    inner: Arc<Mutex<HashMap<SinkId, Subscriber>>>,
}

impl Fanout {
    pub fn add(&self, id: SinkId, sink: Sink, scope: Scope) {
        self.insert(id, sink, scope, None);
    }

    /// Adds a subscriber whose replay is still to come: its live frames are held back until
    /// [`Fanout::release`].
    pub fn add_held(&self, id: SinkId, sink: Sink) {
        self.insert(id, sink, Scope::Conversation, Some(Vec::new()));
    }

    fn insert(&self, id: SinkId, sink: Sink, scope: Scope, held: Option<Vec<Outbound>>) {
        self.inner
            .lock()
            .insert(id, Subscriber { sink, scope, held });
    }

    /// The replay of `id` has been delivered: the frames held back follow, then live ones.
    pub fn release(&self, id: SinkId) {
        let mut subs = self.inner.lock();
        let Some(sub) = subs.get_mut(&id) else { return };
        let held = sub.held.take().unwrap_or_default();
        if !held.iter().all(|out| sub.sink.deliver(out)) {
            subs.remove(&id);
        }
    }

    pub fn remove(&self, id: SinkId) {
        self.inner.lock().remove(&id);
    }

    /// Forgets listeners that are gone.
    pub fn prune(&self) {
        self.inner.lock().retain(|_, sub| !sub.sink.is_closed());
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
        self.inner.lock().retain(|_, sub| match &sub.scope {
            Scope::Conversation => sub.deliver(out),
            Scope::Turn(c) if Some(c.as_str()) == client_id => sub.deliver(out),
            Scope::Turn(_) => true,
        });
    }

    /// Forgets the sinks that listened only to the turn of `client_id`.
    pub fn end_turn(&self, client_id: &str) {
        self.inner
            .lock()
            .retain(|_, sub| !matches!(&sub.scope, Scope::Turn(c) if c == client_id));
    }
}
