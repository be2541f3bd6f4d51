//! The HTTP clients of upstream calls: one per thread. A connection is driven by the thread
//! that opened it, so a client shared across threads would hand every request and every chunk
//! of its stream from the caller's thread to the connection's and back; a client of the
//! caller's own thread keeps both on one thread.

use std::cell::OnceCell;
use std::time::Duration;

thread_local! {
    static CLIENT: OnceCell<Option<reqwest::Client>> = const { OnceCell::new() };
}

/// The settings every upstream client shares.
pub fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
}

/// This thread's client, or `fallback` when one cannot be built here.
pub fn local(fallback: &reqwest::Client) -> reqwest::Client {
    CLIENT
        .with(|c| {
            c.get_or_init(|| match builder().build() {
                Ok(client) => Some(client),
                Err(e) => {
                    tracing::warn!(error = %e, "no thread-local HTTP client; sharing one");
                    None
                }
            })
            .clone()
        })
        .unwrap_or_else(|| fallback.clone())
}
