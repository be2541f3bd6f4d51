//! Group commit: callers that wait for durability at the same time share one flush.
//!
//! Every durable write (a user message before its `ack`, a reply before its `done`) ends with
//! a flush. Left to themselves, a thousand conversations flushing at once queue up behind each
//! other's fsyncs. Here a caller takes a ticket and waits until a flush that began after its
//! ticket has ended: when no flush is running it starts one, covering every ticket taken so
//! far; callers arriving during it are covered by the next, which starts as soon as it ends.
//! One fsync thus acknowledges everything written before it began.
//!
//! The flush runs as its own task, so a caller that stops waiting (a dropped request) never
//! leaves the next round unstarted.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::StoreError;

/// How a flush round ended: the last ticket it covered, and its error if it failed.
#[derive(Debug, Clone, Default)]
struct Round {
    covered: u64,
    error: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out so far (the newest).
    issued: u64,
    running: bool,
}

pub(super) struct GroupCommit {
    state: Mutex<State>,
    ended: watch::Sender<Round>,
}

impl GroupCommit {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            ended: watch::Sender::new(Round::default()),
        })
    }

    /// Waits until everything written before the call is on disk.
    pub(super) async fn flush(self: &Arc<Self>, db: &sled::Db) -> Result<(), StoreError> {
        let ticket = {
            let mut s = self.state.lock();
            s.issued += 1;
            s.issued
        };
        let mut rounds = self.ended.subscribe();
        loop {
            {
                let round = rounds.borrow_and_update();
                if round.covered >= ticket {
                    // The newest round covers every earlier write too: its outcome is ours.
                    return match &round.error {
                        None => Ok(()),
                        Some(e) => Err(StoreError::Task(e.to_string())),
                    };
                }
            }
            self.start_round(db, ticket);
            if rounds.changed().await.is_err() {
                return Err(StoreError::Task("store closed".into()));
            }
        }
    }

    /// Waits until no flush is running (one started for callers that have since gone may still
    /// hold the database; shutdown waits for it before the directory is released).
    pub(super) async fn idle(&self) {
        let mut rounds = self.ended.subscribe();
        while self.state.lock().running {
            if rounds.changed().await.is_err() {
                return;
            }
        }
    }

    /// Starts a flush covering every ticket issued so far, unless one is running (its end
    /// starts the next) or one that ended meanwhile already covers `ticket`.
    fn start_round(self: &Arc<Self>, db: &sled::Db, ticket: u64) {
        let covered = {
            let mut s = self.state.lock();
            // Rounds end under this lock, so the newest one is seen here.
            if s.running || self.ended.borrow().covered >= ticket {
                return;
            }
            s.running = true;
            s.issued
        };
        let this = Arc::clone(self);
        let db = db.clone();
        tokio::spawn(async move {
            let flushing = db.clone();
            let error = match tokio::task::spawn_blocking(move || flushing.flush()).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(Arc::from(format!("storage failed: {e}"))),
                Err(e) => Some(Arc::from(format!("storage task failed: {e}"))),
            };
            let mut db = Some(db);
            let more = {
                let mut s = this.state.lock();
                s.running = false;
                let more = s.issued > covered;
                if !more {
                    // Let go of the database before anyone hears the round ended: a caller
                    // waiting for `idle` (shutdown, a reopen) then finds it released.
                    db = None;
                }
                // Publish under the lock, so a caller that saw `running` sees this round's end.
                this.ended.send_replace(Round { covered, error });
                more
            };
            if let Some(db) = db.filter(|_| more) {
                this.start_round(&db, covered + 1);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_rounds_and_all_return() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let db = sled::Config::new().path(dir.path()).open().unwrap(); // ok: test code
        let commit = GroupCommit::new();
        let tree = db.open_tree("t").unwrap(); // ok: test code
        let mut tasks = Vec::new();
        for i in 0u32..200 {
            let (commit, db, tree) = (Arc::clone(&commit), db.clone(), tree.clone());
            tasks.push(tokio::spawn(async move {
                tree.insert(i.to_be_bytes(), &b"x"[..]).unwrap(); // ok: test code
                commit.flush(&db).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap(); // ok: test code
        }
        // No round is left running for ever.
        let idle = tokio::time::timeout(std::time::Duration::from_secs(10), commit.idle()).await;
        assert!(idle.is_ok(), "a flush round never ended");
        let rounds = commit.ended.borrow().covered;
        assert_eq!(
            rounds,
            commit.state.lock().issued,
            "the last round covers every ticket"
        );
        assert!(!commit.state.lock().running);
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_stall_the_next_round() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let db = sled::Config::new().path(dir.path()).open().unwrap(); // ok: test code
        let commit = GroupCommit::new();
        // Start a flush and abandon it at once.
        let first = commit.flush(&db);
        drop(first);
        let abandoned =
            tokio::time::timeout(std::time::Duration::from_millis(0), commit.flush(&db));
        let _ = abandoned.await;
        tokio::time::timeout(std::time::Duration::from_secs(10), commit.flush(&db))
            .await
            .expect("a later flush completes") // ok: test code
            .unwrap(); // ok: test code
    }
}
