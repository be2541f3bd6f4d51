//! One integration binary (faster to build and link than one per file): the real server on
//! ephemeral ports against the real mock upstream, over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod browser;
mod cache;
mod cluster;
mod common;
mod context;
mod conversation_tools;
mod crash;
mod fuzz;
mod governance;
mod guards;
mod http;
mod jobs;
mod lifecycle;
mod openai;
mod providers;
mod responses;
mod routing;
mod simulation;
mod telemetry;
mod tools;
mod ws;
