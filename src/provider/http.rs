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

/// An upstream endpoint's URL, parsed once rather than on every request (parsing a URL, its
/// host included, is a visible share of a small request's cost).
pub enum Endpoint {
    Parsed(reqwest::Url),
    /// Kept as written: the request fails with reqwest's own error, as it would have.
    Unparsed(String),
}

impl Endpoint {
    pub fn new(url: String) -> Self {
        match reqwest::Url::parse(&url) {
            Ok(u) => Self::Parsed(u),
            Err(_) => Self::Unparsed(url),
        }
    }

    /// A `POST` to this endpoint on this thread's client (see [`local`]).
    pub fn post(&self, fallback: &reqwest::Client) -> reqwest::RequestBuilder {
        let client = local(fallback);
        match self {
            Self::Parsed(u) => client.post(u.clone()),
            Self::Unparsed(s) => client.post(s.as_str()),
        }
    }
}
