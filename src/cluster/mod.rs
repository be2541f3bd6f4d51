//! Cluster mode (PROTOCOL §9): several parley nodes serve one service through Redis.

pub mod limits;
pub mod redis;
pub mod testing;
