//! Coalesces concurrent small embedding calls into shared requests, without adding a wait.
//!
//! At most `in_flight` requests run at once. While they are busy, new calls queue; the next
//! free slot takes every queued call (up to `max_texts` texts) as one request and hands each
//! caller its own vectors back. Under light load every call goes out at once, alone; under
//! load, many lookups share one upstream request (fewer requests against the provider's
//! requests-per-minute budget). The queue is bounded: a call that finds it full is refused.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::embed::EmbedError;

type Vectors = Result<Vec<Vec<f32>>, EmbedError>;

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Vectors>,
}

/// The handle callers use; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

/// Calls waiting for a slot, at most.
const QUEUE: usize = 1024;

impl Batcher {
    /// Starts the batching task (on the current tokio runtime) around `send`, which embeds one
    /// request's texts.
    pub fn start<F, Fut>(send: F, max_texts: usize, in_flight: usize) -> Self
    where
        F: Fn(Vec<String>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vectors> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let send = Arc::new(send);
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut count = first.texts.len();
                let mut jobs = vec![first];
                while count < max_texts {
                    match rx.try_recv() {
                        Ok(job) => {
                            count += job.texts.len();
                            jobs.push(job);
                        }
                        Err(_) => break,
                    }
                }
                let send = Arc::clone(&send);
                tokio::spawn(async move {
                    let texts: Vec<String> =
                        jobs.iter().flat_map(|j| j.texts.iter().cloned()).collect();
                    let result = send(texts).await;
                    drop(permit);
                    deliver(jobs, result);
                });
            }
        });
        Self { tx }
    }

    /// Embeds `texts`, possibly in one request with other callers' texts.
    ///
    /// # Errors
    /// The request's failure (shared by every caller in it), or a full queue.
    pub async fn embed(&self, texts: Vec<String>) -> Vectors {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job { texts, reply })
            .map_err(|_| EmbedError::Provider("embedding queue full".into()))?;
        answer
            .await
            .map_err(|_| EmbedError::Provider("embedding batcher stopped".into()))?
    }
}

/// Hands each job its slice of the vectors (or the shared error).
fn deliver(jobs: Vec<Job>, result: Vectors) {
    match result {
        Ok(vectors) => {
            let total: usize = jobs.iter().map(|j| j.texts.len()).sum();
            if vectors.len() != total {
                let msg = format!("{} vectors for {total} texts", vectors.len());
                for job in jobs {
                    let _ = job.reply.send(Err(EmbedError::Malformed(msg.clone())));
                }
                return;
            }
            let mut rest = vectors.into_iter();
            for job in jobs {
                let mine: Vec<Vec<f32>> = rest.by_ref().take(job.texts.len()).collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(EmbedError::Provider(msg.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A fake upstream: each text becomes `[its number]`, after `delay`; counts requests.
    fn fake(delay: Duration, calls: Arc<AtomicUsize>) -> Batcher {
        Batcher::start(
            move |texts: Vec<String>| {
                let calls = Arc::clone(&calls);
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    Ok(texts
                        .iter()
                        .map(|t| vec![t.parse::<f32>().unwrap_or(-1.0)])
                        .collect())
                }
            },
            64,
            1,
        )
    }

    #[tokio::test]
    async fn concurrent_calls_share_requests_and_get_their_own_vectors() {
        let calls = Arc::new(AtomicUsize::new(0));
        let b = fake(Duration::from_millis(50), Arc::clone(&calls));
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(
                    async move { b.embed(vec![format!("{i}"), format!("{}", i + 100)]).await },
                )
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let v = t.await.expect("task").expect("vectors"); // ok: test
            assert_eq!(v, vec![vec![i as f32], vec![i as f32 + 100.0]]);
        }
        // One request went out at once; the others queued behind it and went out together.
        let n = calls.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "{n} requests for 10 calls");
    }

    #[tokio::test]
    async fn a_lone_call_goes_out_at_once_and_failures_reach_every_caller() {
        let calls = Arc::new(AtomicUsize::new(0));
        let b = fake(Duration::ZERO, Arc::clone(&calls));
        assert_eq!(
            b.embed(vec!["7".into()]).await.expect("ok"), // ok: test code
            vec![vec![7.0]]
        ); // ok: test
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let failing = Batcher::start(
            |_texts: Vec<String>| async { Err(EmbedError::Provider("down".into())) },
            64,
            1,
        );
        let (a, b2) = tokio::join!(
            failing.embed(vec!["1".into()]),
            failing.embed(vec!["2".into()])
        );
        assert!(a.is_err() && b2.is_err());
    }
}
