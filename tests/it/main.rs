//! One integration binary (faster to build and link than one per file): the real server on
//! ephemeral ports against the real mock upstream, over real sockets.

mod common;
mod lifecycle;
mod ws;
