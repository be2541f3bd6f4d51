//! Pure state machines for upstream protection and per-key limits: token buckets and sliding
//! windows (requests and tokens per minute), the circuit breaker, and exponential backoff with
//! full jitter. Every method takes the current `Instant`, so tests drive them with a fake clock
//! and never sleep.

mod backoff;
mod breaker;
mod bucket;
mod window;

pub use backoff::Backoff;
pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker, Transition};
pub use bucket::TokenBucket;
pub use window::SlidingWindow;
