//! Every open socket and the API key it was opened with, so that revoking a key closes its
//! sockets at once and shutdown can say goodbye to all of them.

use std::collections::HashMap;

use actix::Recipient;
use parking_lot::Mutex;

use crate::conversation::Outbound;

/// Close code for a socket whose key was revoked (1008, policy violation).
pub const CLOSE_REVOKED: u16 = 1008;
/// Close code at server shutdown (1001, going away).
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// An open socket: the key it was opened with (none in development mode) and its recipient.
type Socket = (Option<String>, Recipient<Outbound>);

#[derive(Default)]
pub struct SocketHub {
    sockets: Mutex<HashMap<u64, Socket>>,
}

impl SocketHub {
    pub fn register(&self, socket: u64, key_id: Option<String>, recipient: Recipient<Outbound>) {
        self.sockets.lock().insert(socket, (key_id, recipient));
    }

    pub fn unregister(&self, socket: u64) {
        self.sockets.lock().remove(&socket);
    }

    /// Closes every socket opened with `key_id`.
    pub fn revoke(&self, key_id: &str) {
        self.close_where(CLOSE_REVOKED, "key revoked", |k| k == Some(key_id));
    }

    /// Closes every socket (shutdown).
    pub fn close_all(&self) {
        self.close_where(CLOSE_GOING_AWAY, "server shutting down", |_| true);
    }

    fn close_where(&self, code: u16, reason: &'static str, pick: impl Fn(Option<&str>) -> bool) {
        let mut sockets = self.sockets.lock();
        sockets.retain(|_, (key, recipient)| {
            if pick(key.as_deref()) {
                recipient.do_send(Outbound::Close { code, reason });
                false
            } else {
                true
            }
        });
    }

    pub fn len(&self) -> usize {
        self.sockets.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
