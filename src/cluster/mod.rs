//! Cluster mode (PROTOCOL §9): several parley nodes serve one service through Redis.

pub mod redis;
pub mod testing;
