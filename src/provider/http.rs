//! The HTTP clients of upstream calls: one per thread. A connection is driven by the thread
//! that opened it, so a client shared across threads would hand every request and every chunk
//! of its stream from the caller's thread to the connection's and back; a client of the
//! caller's own thread keeps both on one thread.

use std::cell::OnceCell;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};

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

    /// A `POST` of `body` as JSON, with `credential` when there is one.
    pub fn post_json(
        &self,
        fallback: &reqwest::Client,
        body: &impl serde::Serialize,
        credential: Option<&Credential>,
    ) -> reqwest::RequestBuilder {
        let request = json(self.post(fallback), body);
        match credential {
            Some(c) => c.apply(request),
            None => request,
        }
    }
}

/// The room a request body starts with: most requests fit without the buffer growing.
const BODY_START: usize = 1024;

/// `body` as the request's JSON body, written into a buffer sized for most requests from the
/// start (reqwest's own `json` starts at 128 bytes and grows by copying).
fn json(request: reqwest::RequestBuilder, body: &impl serde::Serialize) -> reqwest::RequestBuilder {
    let mut buf = Vec::with_capacity(BODY_START);
    match serde_json::to_writer(&mut buf, body) {
        Ok(()) => request
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(buf),
        // reqwest's own path, which fails the request with the serialiser's error.
        Err(_) => request.json(body),
    }
}

/// A provider's credential header, built once: every request takes a copy of the same value
/// (a reference count) instead of formatting and checking it again. The value is marked
/// sensitive, as reqwest marks the ones it builds, so the HTTP stack never prints it.
pub struct Credential {
    name: HeaderName,
    value: Result<HeaderValue, SecretString>,
}

impl Credential {
    /// `Authorization: Bearer <key>`.
    pub fn bearer(key: &SecretString) -> Self {
        Self::new(
            reqwest::header::AUTHORIZATION,
            &format!("Bearer {}", key.expose_secret()),
        )
    }

    /// `<name>: <key>`.
    pub fn header(name: &'static str, key: &SecretString) -> Self {
        Self::new(HeaderName::from_static(name), key.expose_secret())
    }

    fn new(name: HeaderName, value: &str) -> Self {
        let value = match HeaderValue::from_str(value) {
            Ok(mut v) => {
                v.set_sensitive(true);
                Ok(v)
            }
            // Kept to be set as reqwest would, so the request fails with reqwest's own error;
            // never printed.
            Err(_) => Err(SecretString::from(value)),
        };
        Self { name, value }
    }

    fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.value {
            Ok(v) => request.header(self.name.clone(), v.clone()),
            Err(raw) => request.header(self.name.clone(), raw.expose_secret()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(credential: &Credential) -> Result<reqwest::Request, reqwest::Error> {
        let client = reqwest::Client::new();
        Endpoint::new("http://127.0.0.1:9/v1/chat/completions".into())
            .post_json(&client, &serde_json::json!({"a": 1}), Some(credential))
            .build()
    }

    #[test]
    fn a_credential_is_set_sensitive_with_the_json_body() {
        let key = SecretString::from("sk-test-123");
        let req = built(&Credential::bearer(&key)).unwrap(); // ok: test code
        let auth = req.headers().get(reqwest::header::AUTHORIZATION).unwrap(); // ok: test code
        assert_eq!(auth.to_str().unwrap(), "Bearer sk-test-123"); // ok: test code
        assert!(auth.is_sensitive());
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
        let body = req.body().and_then(reqwest::Body::as_bytes).unwrap(); // ok: test code
        assert_eq!(body, br#"{"a":1}"#);

        let req = built(&Credential::header("x-api-key", &key)).unwrap(); // ok: test code
        assert!(req.headers()["x-api-key"].is_sensitive());
    }

    #[test]
    fn a_key_that_cannot_be_a_header_fails_the_request_without_showing_it() {
        let key = SecretString::from("sk-bad\nkey");
        let err = built(&Credential::bearer(&key)).unwrap_err();
        assert!(err.is_builder(), "{err}");
        assert!(!format!("{err} {err:?}").contains("sk-bad"), "{err:?}");
    }
}
