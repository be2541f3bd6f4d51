//! The semantic cache's building blocks (issue "Embedded semantic cache and recall memory"):
//! embedders behind one trait ([`embed`]) and the false-hit guards ([`guards`]). The HNSW index,
//! its scope keys and its lifecycle come next; nothing here is wired into turns yet.

pub mod embed;
pub mod guards;
