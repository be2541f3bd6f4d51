//! Conversations: one supervised actor per live conversation ([`ConversationActor`]), found or
//! started through the [`Registry`], running its turns ([`turn`]) one at a time and fanning the
//! frames out to every subscriber ([`Fanout`]). Talks to `store` for history, `provider` for
//! generations and `tokens` for budgeting; knows nothing of HTTP or WebSockets.

mod actor;
mod fanout;
pub mod frames;
pub mod messages;
pub mod prompts;
mod recent;
mod registry;
mod tools;
mod turn;

pub use actor::{ConversationActor, REPLAY_PAGE};
pub use fanout::{next_sink_id, Scope, SinkId};
pub use frames::{Outbound, ServerFrame, Sink, WireMessage};
pub use registry::{mark_worker_thread, Live, NewConversation, Registry};
pub use tools::open_calls;
pub use turn::outcome_frame;

pub use crate::generation::{Deps, MemorySettings};
