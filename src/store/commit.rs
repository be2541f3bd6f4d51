//! Group commit: callers that wait for durability at the same time share one flush.
//!
//! Every durable write (a user message before its `ack`, a reply before its `done`) ends with
//! a flush. Left to themselves, a thousand conversations flushing at once queue up behind each
//! other's fsyncs. Here a caller takes a ticket and waits until a flush that began after its
//! ticket has ended: when no flush is running it starts one, covering every ticket taken so
//! far; callers arriving during it are covered by the next, which starts as soon as it ends.
//! One fsync thus acknowledges everything written before it began.
//!
//! The flushes run on a thread of the store's own ("sled-commit"), not as a task of whichever
//! runtime asked first: a round must end even when that runtime stops meanwhile (an HTTP
//! worker stopping at shutdown would otherwise drop a running round, and every later flush,
//! the last one included, would wait for it for ever). A caller that stops waiting (a dropped
//! request) never leaves the next round unstarted either. The thread keeps no handle on the
//! database between rounds, and ends with the store.

use std::sync::mpsc;
use std::sync::{Arc, Weak};

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
    /// A round is asked for or under way.
    running: bool,
}

pub(super) struct GroupCommit {
    state: Mutex<State>,
    ended: watch::Sender<Round>,
    /// Hands the flusher thread the database of a round to run.
    rounds: mpsc::Sender<sled::Db>,
}

impl GroupCommit {
    /// # Errors
    /// When the flusher thread cannot be started.
    pub(super) fn new() -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let this = Arc::new(Self {
            state: Mutex::new(State::default()),
            ended: watch::Sender::new(Round::default()),
            rounds: tx,
        });
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("sled-commit".into())
            .spawn(move || run_rounds(&weak, &rx))?;
        Ok(this)
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
            self.start_round(db, ticket)?;
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

    /// Asks for a flush covering every ticket issued by the time it starts, unless one is
    /// asked for or running (its end starts the next) or one that ended meanwhile already
    /// covers `ticket`.
    fn start_round(&self, db: &sled::Db, ticket: u64) -> Result<(), StoreError> {
        let mut s = self.state.lock();
        // Rounds end under this lock, so the newest one is seen here.
        if s.running || self.ended.borrow().covered >= ticket {
            return Ok(());
        }
        if self.rounds.send(db.clone()).is_err() {
            return Err(StoreError::Task(
                "the store's flusher thread is gone".into(),
            ));
        }
        s.running = true;
        Ok(())
    }
}

/// The flusher thread: runs the rounds it is handed, and the rounds their callers need next,
/// until the store is gone.
fn run_rounds(commit: &Weak<GroupCommit>, rounds: &mpsc::Receiver<sled::Db>) {
    while let Ok(db) = rounds.recv() {
        let Some(this) = commit.upgrade() else { return };
        let mut db = Some(db);
        while let Some(flushing) = db.take() {
            let covered = this.state.lock().issued;
            // A panic in the flush fails the round instead of leaving it running for ever.
            let flushed =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| flushing.flush()));
            let error = match flushed {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(Arc::from(e.to_string())),
                Err(_) => Some(Arc::from("the flush panicked")),
            };
            let mut s = this.state.lock();
            if s.issued > covered {
                // Callers arrived during this round: the next one starts at once.
                db = Some(flushing);
            } else {
                s.running = false;
                // Let go of the database before anyone hears the round ended: a caller
                // waiting for `idle` (shutdown, a reopen) then finds it released.
                drop(flushing);
            }
            // Publish under the lock, so a caller that saw `running` sees this round's end.
            this.ended.send_replace(Round { covered, error });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_rounds_and_all_return() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let db = sled::Config::new().path(dir.path()).open().unwrap(); // ok: test code
        let commit = GroupCommit::new().unwrap(); // ok: test code
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

    /// An HTTP worker's runtime stops at shutdown: a round one of its requests started must
    /// still end, or the last flush of the shutdown waits for it for ever.
    #[test]
    fn a_round_outlives_the_runtime_that_asked_for_it() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let db = sled::Config::new().path(dir.path()).open().unwrap(); // ok: test code
        let commit = GroupCommit::new().unwrap(); // ok: test code

        // A request asks for a round and is gone at once, and so is its worker's runtime.
        let worker = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(); // ok: test code
        worker.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::ZERO, commit.flush(&db)).await;
        });
        drop(worker);
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(); // ok: test code
        main.block_on(async {
            let ten = std::time::Duration::from_secs(10);
            tokio::time::timeout(ten, commit.flush(&db))
                .await
                .expect("a later flush completes") // ok: test code
                .unwrap(); // ok: test code
            tokio::time::timeout(ten, commit.idle())
                .await
                .expect("no round is left running"); // ok: test code
        });
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_stall_the_next_round() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let db = sled::Config::new().path(dir.path()).open().unwrap(); // ok: test code
        let commit = GroupCommit::new().unwrap(); // ok: test code

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
