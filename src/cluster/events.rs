//! Events every node must hear at once, over Redis pub/sub (`<prefix>events`).
//!
//! Pub/sub delivers only to nodes connected at that moment. A node whose subscription broke
//! may have missed events, so when it subscribes again it hears [`Event::Resync`] and drops
//! everything it remembered that an event could have changed (its known keys).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::redis::Redis;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A key was revoked: forget it, close its sockets, stop its turns.
    KeyRevoked { key_id: String },
    /// This node's subscription (re)started: events may have been missed.
    #[serde(skip)]
    Resync,
}

fn channel(redis: &Redis) -> String {
    redis.key("events")
}

/// Publishes `event` to every node (this one included).
///
/// # Errors
/// `Unavailable` when Redis cannot be reached.
pub fn publish(redis: &Redis, event: &Event) -> Result<(), StoreError> {
    let payload = serde_json::to_string(event).map_err(|e| StoreError::Task(e.to_string()))?;
    let ch = channel(redis);
    redis.run(|c| {
        ::redis::cmd("PUBLISH")
            .arg(&ch)
            .arg(&payload)
            .query::<()>(c)
    })
}

/// Listens on a thread of its own (a subscription is a blocking connection) until `out` is
/// closed, reconnecting while Redis is away.
pub fn listen(redis: Redis, out: mpsc::UnboundedSender<Event>) {
    let spawned = std::thread::Builder::new()
        .name("parley-events".into())
        .spawn(move || {
            while !out.is_closed() {
                if let Err(e) = subscribe(&redis, &out) {
                    tracing::debug!(error = %e, "event subscription broke; subscribing again");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the event listener");
    }
}

fn subscribe(redis: &Redis, out: &mpsc::UnboundedSender<Event>) -> Result<(), StoreError> {
    let mut conn = redis.dedicated()?;
    let mut sub = conn.as_pubsub();
    sub.subscribe(channel(redis))
        .map_err(super::redis::unavailable)?;
    // Wake now and then to notice a closed receiver (shutdown).
    sub.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(super::redis::unavailable)?;
    if out.send(Event::Resync).is_err() {
        return Ok(());
    }
    loop {
        match sub.get_message() {
            Ok(msg) => {
                let parsed = serde_json::from_slice::<Event>(msg.get_payload_bytes());
                match parsed {
                    Ok(event) => {
                        if out.send(event).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed cluster event"),
                }
            }
            Err(e) if e.is_timeout() => {
                if out.is_closed() {
                    return Ok(());
                }
            }
            Err(e) => return Err(super::redis::unavailable(e)),
        }
    }
}
