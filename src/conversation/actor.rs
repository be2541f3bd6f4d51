//! `ConversationActor`: owns one live conversation's seq counter, its queue of pending turns and
//! its subscribers. History lives in sled, not here. Turns run one at a time as spawned tasks so
//! `Cancel` and `Subscribe` get through while a reply streams. A turn that panics is caught at
//! the task boundary: its listeners get `internal`, and the actor stops so that its `Supervisor`
//! restarts it from the store.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio_util::sync::CancellationToken;

use super::fanout::{Fanout, Scope, SinkId};
use super::frames::{ErrorFrame, ServerFrame, Sink};
use super::messages::{
    Cancel, KeyRevoked, PostUserMessage, Posted, Shutdown, Subscribe, TurnOptions, Unsubscribe,
    Update,
};
use super::recent::Recent;
use super::turn::{self, failed_reply, outcome_frame, TurnEnd, TurnInput};
use super::Deps;
use crate::domain::{FinishReason, Message, Role};
use crate::error::{ApiError, ErrorCode};
use crate::generation::Screened;
use crate::guard::pii::PiiMode;
use crate::store::ConversationRecord;
use crate::tenant::{Bill, Principal};
use crate::tokens::{fit_history, Encoding};

const MAILBOX: usize = 256;
/// How long an actor keeps its conversation's [`Recent`] messages without a turn.
const RECENT_KEPT: Duration = Duration::from_secs(30);

/// The refusal of a user message while the newest reply's tool calls wait for results.
fn awaiting(open: &[String]) -> ApiError {
    ApiError::bad_request(format!(
        "the reply's tool calls wait for their results (tool_result for {})",
        open.join(", ")
    ))
}
/// Stored messages read per page of a `subscribe` replay.
pub const REPLAY_PAGE: usize = 1_000;

struct Queued {
    pii: PiiMode,
    flags: Vec<String>,
    client_id: String,
    message: Message,
    history: Vec<(Message, u32)>,
    tokens: u32,
    options: TurnOptions,
    principal: Principal,
    /// The key's reservation; dropping an unrun turn gives it back.
    bill: Bill,
    /// The span of the request that posted it (the turn's span is its child).
    span: tracing::Span,
}

#[derive(Default)]
struct SystemPrompt {
    text: Option<String>,
    tokens: Option<u32>,
    version: Option<String>,
}

struct Running {
    client_id: String,
    /// Whose turn: a user message's reply may call tools; a tool result's turn may complete
    /// a set of results.
    role: Role,
    /// The reply's tool calls once it has them (before it is stored).
    reply_calls: Arc<std::sync::OnceLock<Vec<String>>>,
    /// Content tokens of its message (stored as the turn starts, before the actor hears it).
    tokens: u32,
    /// The key the turn acts for (none in development mode).
    key_id: Option<String>,
    cancel: CancellationToken,
    /// Cancelled when the turn's task has ended, whatever the way.
    ended: CancellationToken,
}

pub struct ConversationActor {
    record: ConversationRecord,
    encoding: Encoding,
    deps: Arc<Deps>,
    fanout: Fanout,
    queue: VecDeque<Queued>,
    running: Option<Running>,
    /// The newest messages, kept while the conversation is busy; read from the store on demand.
    recent: Option<Arc<Recent>>,
    last_active: Instant,
    stopping: bool,
    /// A turn's store call failed: before the next turn, its message must have a reply.
    repair: bool,
    /// The actor's own address while it means to live: the registry holds it only weakly, and
    /// the supervisor restarts a stopped actor (after a panic) only while an address is held.
    /// Dropped when it stops on purpose (idle, deleted, shut down).
    keep_alive: Option<Addr<ConversationActor>>,
}

impl ConversationActor {
    pub fn new(record: ConversationRecord, deps: Arc<Deps>) -> Self {
        let encoding = deps.router.encoding(&record.model);
        Self {
            record,
            encoding,
            deps,
            fanout: Fanout::default(),
            queue: VecDeque::new(),
            running: None,
            recent: None,
            last_active: Instant::now(),
            stopping: false,
            repair: false,
            keep_alive: None,
        }
    }

    fn start_next(&mut self, ctx: &mut Context<Self>) {
        if self.deps.shutdown.is_cancelled() {
            // Shutting down: queued turns were never acked; they are not started now.
            self.queue.clear();
            return;
        }
        if self.running.is_some() || self.stopping {
            return;
        }
        let Some(q) = self.queue.pop_front() else {
            return;
        };
        // The last turn could not store its reply (storage unavailable: Redis away): the next
        // message is stored only once that reply is, so history keeps alternating.
        if self.repair && !self.repaired() {
            let err = ApiError::new(
                ErrorCode::UpstreamUnavailable,
                "storage is unavailable; try again shortly",
            );
            self.refuse_queued(&q.client_id, &err);
            return self.start_next(ctx);
        }
        // A user message queued behind a reply that turned out to call tools cannot be sent
        // before the calls have their results.
        if q.message.role == Role::User {
            match self.open_calls() {
                Ok(open) if !open.is_empty() => {
                    self.refuse_queued(&q.client_id, &awaiting(&open));
                    return self.start_next(ctx);
                }
                Ok(_) => {}
                Err(e) => {
                    self.refuse_queued(&q.client_id, &e.into());
                    return self.start_next(ctx);
                }
            }
        }
        let route = q
            .options
            .model
            .clone()
            .unwrap_or_else(|| self.record.model.clone());
        let system = match &q.options.turn.instructions {
            Some(text) => SystemPrompt {
                tokens: Some(crate::tokens::count(self.encoding, text)),
                text: Some(text.clone()),
                version: None,
            },
            None => self.system_prompt(&route).unwrap_or_else(|e| {
                // Only a storage failure gets here (references are checked at creation and
                // versions are never deleted); the turn goes on without the prompt, loudly.
                tracing::error!(conversation = %self.record.id, error = %e, "system prompt unavailable");
                SystemPrompt::default()
            }),
        };
        let tools = q
            .options
            .turn
            .tools
            .clone()
            .unwrap_or_else(|| self.record.tools.clone());
        let tool_choice = match &q.options.turn.tools {
            Some(_) => q.options.turn.tool_choice.clone(),
            None => self.record.tool_choice.clone(),
        };
        let key_id = q.principal.key_id.clone();
        let role = q.message.role;
        let reply_calls = Arc::new(std::sync::OnceLock::new());
        let content = q.message.content.text();
        let cache = q.options.cache != Some(false)
            && tools.is_empty()
            && q.history.is_empty()
            && q.options.turn.response_format.is_none()
            && q.message.is_plain()
            && self.deps.cache.admits(
                &q.principal,
                self.deps.router.caches(&route),
                &content,
                !q.flags.is_empty(),
            );
        let tools_tokens = crate::tokens::request_tokens(self.encoding, &[], &tools);
        let input = TurnInput {
            cache,
            memory: self.record.memory,
            recent: self.recent(),
            history_tokens: self.record.history_tokens,
            reply_calls: Arc::clone(&reply_calls),
            conversation: self.record.id.clone(),
            route,
            system: system.text,
            // The tools travel with every turn: budgeted like the system prompt.
            system_tokens: match (system.tokens, tools_tokens) {
                (s, 0) => s,
                (s, t) => Some(s.unwrap_or(0).saturating_add(t)),
            },
            prompt_version: system.version,
            encoding: self.encoding,
            user_seq: self.record.last_seq + 1 + q.history.len() as u64,
            client_id: q.client_id.clone(),
            message: q.message,
            history: q.history,
            content,
            tokens: q.tokens,
            tools,
            tool_choice,
            options: q.options,
            principal: q.principal,
            bill: Some(q.bill),
            pii: q.pii,
            flags: q.flags,
            span: q.span,
        };
        let cancel = self.deps.shutdown.child_token();
        let ended = CancellationToken::new();
        let task = turn::run(
            Arc::clone(&self.deps),
            self.fanout.clone(),
            input,
            cancel.clone(),
        );
        let guard = ended.clone().drop_guard();
        let handle = self.deps.tasks.spawn(async move {
            let _ended = guard;
            task.await
        });
        self.running = Some(Running {
            client_id: q.client_id,
            role,
            reply_calls,
            tokens: q.tokens,
            key_id: key_id.clone(),
            cancel,
            ended,
        });
        ctx.spawn(
            actix::fut::wrap_future(handle)
                .map(|res, act: &mut Self, ctx| act.turn_ended(res, ctx)),
        );
    }

    fn turn_ended(
        &mut self,
        res: Result<TurnEnd, tokio::task::JoinError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(running) = self.running.take() else {
            return;
        };
        self.last_active = Instant::now();
        match res {
            Ok(end) => self.follow(end),
            Err(e) => {
                tracing::error!(conversation = %self.record.id, error = %e, "turn panicked; restarting the conversation");
                self.recent = None;
                self.store_failed_reply(&running.client_id);
                let mut frame = ErrorFrame::new(&ApiError::internal());
                frame.conversation = Some(self.record.id.clone());
                frame.client_id = Some(running.client_id.clone());
                self.fanout
                    .broadcast(&ServerFrame::Error(frame), Some(&running.client_id));
                self.fanout.end_turn(&running.client_id);
                // The supervisor restarts us; `restarting` reloads `last_seq` from the store.
                ctx.stop();
                return;
            }
        }
        self.fanout.end_turn(&running.client_id);
        self.start_next(ctx);
    }

    /// Takes in what a turn stored: the header's `last_seq` and `history_tokens` as the store
    /// now has them, and the newest messages.
    fn follow(&mut self, end: TurnEnd) {
        self.record.last_seq = end.last_seq;
        for m in &end.stored {
            self.record.history_tokens += m.history_cost();
        }
        if end.unsure {
            // A failed store call may have left things this actor cannot know: read again,
            // and before the next turn make sure its message got a reply.
            self.reload();
            self.recent = None;
            self.repair = true;
            return;
        }
        if let Some(recent) = self.recent.as_mut() {
            // The turn has ended and dropped its share: no copy is made.
            let recent = Arc::make_mut(recent);
            for m in end.stored {
                recent.push(m, self.deps.budget);
            }
            if recent.last_seq() != self.record.last_seq {
                self.recent = None;
            }
        }
    }

    /// The conversation's newest messages, read from the store if this actor has not kept them
    /// (`None` if that read fails: callers then read the store themselves).
    fn recent(&mut self) -> Option<Arc<Recent>> {
        if self.recent.is_none() {
            match Recent::load(&self.deps.store, &self.record.id, self.deps.budget) {
                Ok(r) => self.recent = Some(Arc::new(r)),
                Err(e) => {
                    tracing::error!(conversation = %self.record.id, error = %e, "cannot read recent messages");
                }
            }
        }
        self.recent.clone()
    }

    /// The newest reply's tool calls without a stored result. While a user message's turn
    /// runs, they are its reply's calls, which the turn tells before it stores the reply (the
    /// actor hears that the turn ended only afterwards). Otherwise the kept messages answer
    /// when they say none can be open, and the store when they may be.
    fn open_calls(&mut self) -> Result<Vec<String>, crate::store::StoreError> {
        match &self.running {
            Some(r) if r.role == Role::User => {
                return Ok(r.reply_calls.get().cloned().unwrap_or_default());
            }
            Some(_) => {}
            None => {
                if self.recent().is_some_and(|r| !r.calls_may_be_open()) {
                    return Ok(Vec::new());
                }
            }
        }
        super::tools::open_calls(&self.deps.store, &self.record.id)
    }

    /// After a panicked turn: if its user message was stored without a reply, stores an
    /// `internal` error reply.
    fn store_failed_reply(&mut self, client_id: &str) {
        let Ok(Some(user_seq)) = self
            .deps
            .store
            .seq_for_client_id(&self.record.id, client_id)
        else {
            return;
        };
        self.store_missing_reply(
            user_seq,
            &ApiError::internal(),
            FinishReason::Error,
            String::new(),
        );
    }

    /// After a turn whose store call failed (`repair`): makes sure the last stored message has
    /// a reply (the failed call may have stored the message after all); answers whether it has.
    fn repaired(&mut self) -> bool {
        self.reload();
        if !self.answered() {
            return false;
        }
        self.repair = false;
        self.reload();
        true
    }

    /// When the actor starts: a message acked before the process died mid-turn has no reply and
    /// nothing will run it again; it gets an `interrupted` one now, so every acked message is
    /// answered exactly once (and a resent client id hears how it ended).
    fn answer_interrupted(&mut self) {
        self.answered();
    }

    /// [`ConversationActor::answer_interrupted`], answering whether the history now ends
    /// answered (false: the store could not be read or written).
    fn answered(&mut self) -> bool {
        let store = &self.deps.store;
        let last = match store.messages_newest_first(&self.record.id).next() {
            None => return true,
            Some(Ok(last)) => last,
            Some(Err(_)) => return false,
        };
        let unanswered = match last.role {
            Role::User => true,
            // A result that left calls open waits for the others, not for a reply.
            Role::Tool => {
                super::tools::open_calls(store, &self.record.id).is_ok_and(|open| open.is_empty())
            }
            Role::Assistant | Role::System => false,
        };
        if unanswered {
            tracing::warn!(conversation = %self.record.id, seq = last.seq, "message acked before a crash had no reply; answering it interrupted");
            let err = ApiError::new(
                ErrorCode::UpstreamInterrupted,
                "the server stopped before the reply was finished",
            );
            // In cluster mode the node that ran the turn checkpointed what it had streamed.
            let partial = match store.partial(&self.record.id) {
                Ok(Some((reply_to, text))) if reply_to == last.seq => text,
                _ => String::new(),
            };
            self.store_missing_reply(last.seq, &err, FinishReason::Interrupted, partial);
            let store = &self.deps.store;
            return matches!(store.message(&self.record.id, last.seq + 1), Ok(Some(_)));
        }
        true
    }

    /// Stores the reply of message `seq` that has none (its turn died with its task or its
    /// process), so that history keeps alternating; flushed in the background, as the next
    /// turn flushes anyway.
    fn store_missing_reply(
        &mut self,
        seq: u64,
        err: &ApiError,
        finish: FinishReason,
        text: String,
    ) {
        let store = &self.deps.store;
        let conv = &self.record.id;
        if matches!(store.message(conv, seq + 1), Ok(Some(_))) {
            return;
        }
        let mut reply = failed_reply(seq, err, finish);
        if !text.is_empty() {
            reply.tokens = crate::tokens::count(self.encoding, &text);
            reply.content = text;
        }
        match store.append_message_unflushed(conv, &reply) {
            Ok(()) => {
                self.record.last_seq = self.record.last_seq.max(seq + 1);
                self.recent = None;
                let store = store.clone();
                actix::spawn(async move {
                    if let Err(e) = store.flush().await {
                        tracing::error!(error = %e, "flush of a missing reply failed");
                    }
                });
            }
            Err(e) => {
                tracing::error!(conversation = %conv, error = %e, "cannot store the missing reply")
            }
        }
    }

    /// A tool result must answer an open call of the newest reply (and only once); a user
    /// message may not come while calls wait for their results.
    fn check_tool_order(&mut self, message: &Message) -> Result<(), ApiError> {
        let mut open = self.open_calls()?;
        let queued: Vec<&str> = self
            .queue
            .iter()
            .filter_map(|q| q.message.tool_call_id.as_deref())
            .collect();
        open.retain(|id| !queued.contains(&id.as_str()));
        match (message.role, message.tool_call_id.as_deref()) {
            (Role::Tool, Some(id)) if open.iter().any(|o| o == id) => Ok(()),
            (Role::Tool, id) => Err(ApiError::bad_request(format!(
                "tool_call_id {:?} is not an open call of this conversation{}",
                id.unwrap_or_default(),
                if open.is_empty() {
                    String::new()
                } else {
                    format!(" (open: {})", open.join(", "))
                }
            ))),
            _ if open.is_empty() => Ok(()),
            _ => Err(awaiting(&open)),
        }
    }

    /// Answers a queued message that cannot run, to whoever waits for it.
    fn refuse_queued(&self, client_id: &str, err: &ApiError) {
        let mut frame = ErrorFrame::new(err);
        frame.conversation = Some(self.record.id.clone());
        frame.client_id = Some(client_id.to_owned());
        self.fanout
            .broadcast(&ServerFrame::Error(frame), Some(client_id));
        self.fanout.end_turn(client_id);
    }

    /// The system prompt of a turn on `route`: the conversation's own text, its versioned
    /// prompt, or the route's versioned prompt, in that order.
    fn system_prompt(&self, route: &str) -> Result<SystemPrompt, ApiError> {
        if let Some(text) = &self.record.system {
            return Ok(SystemPrompt {
                text: Some(text.clone()),
                tokens: Some(self.record.system_tokens),
                version: None,
            });
        }
        let reference = self
            .record
            .prompt
            .as_deref()
            .or_else(|| self.deps.router.route_prompt(route));
        let Some(reference) = reference else {
            return Ok(SystemPrompt::default());
        };
        let p = super::prompts::resolve(&self.deps.store, reference)?;
        let tokens = crate::tokens::count(self.encoding, &p.content);
        Ok(SystemPrompt {
            version: Some(p.label()),
            text: Some(p.content),
            tokens: Some(tokens),
        })
    }

    /// The prompt tokens this turn will likely send: system prompt, new message and the
    /// history that fits the budget (the running turn's message included).
    fn estimate_prompt(&mut self, system: Option<u32>, tokens: u32) -> Result<u32, ApiError> {
        let running = self.running.as_ref().map(|r| r.tokens);
        let budget = self.deps.budget;
        let fit = |history: &mut dyn Iterator<Item = u32>| {
            fit_history(budget, system, tokens, running.into_iter().chain(history))
                .map_err(|e| ApiError::new(ErrorCode::TooLarge, e.to_string()))
        };
        let (_, used) = match self.recent() {
            Some(recent) => fit(&mut recent
                .newest_first()
                .filter(|m| m.is_sent())
                .map(|m| m.tokens))?,
            None => fit(&mut self
                .deps
                .store
                .messages_newest_first(&self.record.id)
                .map_while(Result::ok)
                .filter(|m| m.is_sent())
                .map(|m| m.tokens))?,
        };
        Ok(used)
    }

    fn reload(&mut self) {
        self.recent = None;
        match self.deps.store.conversation(&self.record.id) {
            Ok(Some(rec)) => self.record = rec,
            Ok(None) => self.stopping = true,
            Err(e) => {
                tracing::error!(conversation = %self.record.id, error = %e, "cannot reload conversation")
            }
        }
    }

    fn listen(&self, listener: Option<(SinkId, Sink, Scope)>) -> Option<Sink> {
        let (id, sink, scope) = listener?;
        self.fanout.add(id, sink.clone(), scope);
        Some(sink)
    }

    /// A `client_id` already stored: answer its original ack, and its done when the reply exists.
    fn replay_duplicate(
        &self,
        seq: u64,
        client_id: String,
        sink: Option<Sink>,
    ) -> Result<Posted, ApiError> {
        let Some(sink) = sink else {
            return Ok(Posted::Duplicate);
        };
        let conv = self.record.id.clone();
        sink.deliver(
            &ServerFrame::Ack {
                conversation: conv.clone(),
                client_id: client_id.clone(),
                seq,
            }
            .encode(),
        );
        if let Some(outcome) = self
            .deps
            .store
            .message(&conv, seq + 1)?
            .and_then(|r| outcome_frame(&conv, &r, &client_id))
        {
            sink.deliver(&outcome.encode());
        }
        Ok(Posted::Duplicate)
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        self.fanout.prune();
        let quiet = self.running.is_none() && self.queue.is_empty();
        if quiet && self.last_active.elapsed() >= RECENT_KEPT {
            self.recent = None;
        }
        let idle = quiet && self.fanout.is_empty();
        if idle && self.last_active.elapsed() >= self.deps.idle_timeout {
            tracing::debug!(conversation = %self.record.id, "conversation idle; stopping its actor");
            // Not `stopping`: the conversation lives on. The registry holds the actor weakly,
            // so it ends here unless someone holds its address (a message on its way), in
            // which case the supervisor restarts it and it goes on serving.
            self.deps.metrics.conversation_idle_stops.inc();
            self.keep_alive = None;
            ctx.stop();
        }
    }
}

impl Actor for ConversationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        let every =
            (self.deps.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        ctx.run_interval(every, Self::check_idle);
        // The supervisor restarts an actor told to stop (its conversation deleted, or idle)
        // while anyone still holds its address. That actor does no work: its last turn may
        // still be storing its reply, which `answer_interrupted` would otherwise take for an
        // interrupted one and answer first (a seq conflict, and `internal` for the caller).
        if self.stopping {
            return;
        }
        self.keep_alive = Some(ctx.address());
        // An append a crash cut short is completed before anything reads the history.
        match self.deps.store.repair_tail(&self.record.id) {
            Ok(Some(rec)) => self.record = rec,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(conversation = %self.record.id, error = %e, "cannot check the newest messages")
            }
        }
        self.answer_interrupted();
        self.start_next(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Cluster mode: another node may run it from now on.
        if let Some(cluster) = &self.deps.cluster {
            cluster.release(&self.record.id);
        }
    }
}

impl Supervised for ConversationActor {
    /// After a panic, or after an idle stop while a message was on its way: the same actor
    /// (still the registry's) goes on from what is stored. An actor told to stop (deleted,
    /// shut down) stays stopped and answers `not_found`.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.running = None;
        if let Some(cluster) = &self.deps.cluster {
            // Given back as it stopped; taken again unless another node took it meanwhile (the
            // next renewal then finds it lost and stops this actor).
            if let Err(e) = cluster.acquire(&self.record.id) {
                tracing::warn!(conversation = %self.record.id, error = %e, "lease not taken again");
            }
        }
        self.reload();
    }
}

impl Handler<Subscribe> for ConversationActor {
    type Result = Result<u64, ApiError>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        let conv = self.record.id.clone();
        // A running turn stores its messages before this actor hears that it ended (and its
        // `done` may already have been answered), so the stored header is the truth here.
        let stored = self
            .deps
            .store
            .conversation(&conv)?
            .map_or(0, |rec| rec.last_seq);
        let last_seq = stored.max(self.record.last_seq);
        msg.sink.deliver(
            &ServerFrame::Subscribed {
                conversation: conv.clone(),
                last_seq,
            }
            .encode(),
        );
        match msg.after_seq {
            Some(after) if after < last_seq => {
                // The replay is read page by page off this thread and sent at the socket's
                // pace; live frames wait for it, so the client sees every message in order.
                self.fanout.add_held(msg.sink_id, msg.sink.clone());
                let store = self.deps.store.clone();
                let me = ctx.address();
                actix::spawn(async move {
                    replay(store, conv, after, last_seq, msg.sink).await;
                    me.do_send(ReplayDone {
                        sink_id: msg.sink_id,
                    });
                });
            }
            _ => self.fanout.add(msg.sink_id, msg.sink, Scope::Conversation),
        }
        Ok(last_seq)
    }
}

/// Sends the stored messages `after < seq <= upto` to `sink`, [`REPLAY_PAGE`] at a time.
async fn replay(
    store: crate::store::Store,
    conv: crate::ids::ConversationId,
    after: u64,
    upto: u64,
    sink: Sink,
) {
    let mut cursor = after;
    while cursor < upto {
        let (s, c) = (store.clone(), conv.clone());
        let page =
            tokio::task::spawn_blocking(move || s.messages_after(&c, cursor, REPLAY_PAGE)).await;
        let page = match page {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                tracing::error!(conversation = %conv, error = %e, "replay could not be read");
                return;
            }
            Err(e) => {
                tracing::error!(conversation = %conv, error = %e, "replay task failed");
                return;
            }
        };
        let Some(last) = page.last().map(|m| m.seq) else {
            return;
        };
        for m in page.into_iter().filter(|m| m.seq <= upto) {
            let frame = ServerFrame::Message {
                conversation: conv.clone(),
                message: m.into(),
            };
            if !sink.deliver_paced(&frame.encode()).await {
                return;
            }
        }
        cursor = last;
    }
}

/// A subscriber's replay has been sent: its held-back live frames follow.
#[derive(Message)]
#[rtype(result = "()")]
struct ReplayDone {
    sink_id: SinkId,
}

impl Handler<ReplayDone> for ConversationActor {
    type Result = ();

    fn handle(&mut self, msg: ReplayDone, _ctx: &mut Self::Context) {
        self.fanout.release(msg.sink_id);
    }
}

impl Handler<Unsubscribe> for ConversationActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        self.fanout.remove(msg.sink_id);
    }
}

impl Handler<PostUserMessage> for ConversationActor {
    type Result = Result<Posted, ApiError>;

    fn handle(&mut self, msg: PostUserMessage, ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        if self.stopping {
            return Err(ApiError::not_found("conversation"));
        }
        let cid = msg.client_id;
        crate::ids::check_client_id(&cid).map_err(ApiError::bad_request)?;
        if let Some(seq) = self.deps.store.seq_for_client_id(&self.record.id, &cid)? {
            // Stored by a turn told its write failed, it may have no reply yet: it gets one
            // before the resend is answered, which would otherwise wait for a `done` forever.
            if self.repair && self.running.is_none() {
                self.repaired();
            }
            let sink = self.listen(msg.listener.map(|(id, sink, scope)| match scope {
                // The reply may still be streaming: the HTTP caller listens to that turn.
                Scope::Turn(_) => (id, sink, Scope::Turn(cid.clone())),
                s => (id, sink, s),
            }));
            return self.replay_duplicate(seq, cid, sink);
        }
        let pending = self.running.as_ref().is_some_and(|r| r.client_id == cid)
            || self.queue.iter().any(|q| q.client_id == cid);
        if pending {
            self.listen(msg.listener);
            return Ok(Posted::Duplicate);
        }
        let route = msg
            .options
            .model
            .clone()
            .unwrap_or_else(|| self.record.model.clone());
        let route = route.as_str();
        if !self.deps.router.has_route(route) {
            return Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!("model {route:?} does not exist"),
            ));
        }
        let forced = msg
            .options
            .tier
            .as_deref()
            .map(|t| self.deps.router.tier_index(route, t))
            .transpose()?;
        let system = self.system_prompt(route)?.tokens;
        fit_history(self.deps.budget, system, msg.tokens, [])
            .map_err(|e| ApiError::new(ErrorCode::TooLarge, e.to_string()))?;
        if self.queue.len() >= self.deps.max_queued_turns {
            let err = ApiError::new(
                ErrorCode::RateLimited,
                "too many turns queued in this conversation",
            );
            return Err(err.with_retry_after(Duration::from_secs(1)));
        }
        self.deps
            .router
            .check_regions(route, forced, msg.principal.regions())?;
        self.check_tool_order(&msg.message)?;
        let text = msg.message.content.text();
        let Screened { pii, flags } =
            crate::generation::screen(&self.deps, route, &msg.principal, &text, [])?;
        // Reserved before the turn is stored or queued: a key over its limits is refused here,
        // before anything reaches an upstream.
        let estimate = self.estimate_prompt(system, msg.tokens)?;
        let price_model = self
            .deps
            .router
            .reserve_model(route, forced)
            .unwrap_or(route)
            .to_owned();
        let reservation = self.deps.governor.admit(
            &msg.principal,
            &price_model,
            estimate,
            msg.options.max_tokens,
        )?;
        let mut options = msg.options;
        if let Some(max) = reservation.as_ref().and_then(|r| r.max_tokens()) {
            options.max_tokens = Some(max);
        }
        self.listen(msg.listener);
        self.queue.push_back(Queued {
            pii,
            flags,
            client_id: cid,
            message: msg.message,
            history: msg.history,
            tokens: msg.tokens,
            options,
            principal: msg.principal,
            bill: Bill::new(Arc::clone(&self.deps.governor), reservation),
            span: msg.span,
        });
        self.start_next(ctx);
        Ok(Posted::Queued)
    }
}

impl Handler<Update> for ConversationActor {
    type Result = ResponseActFuture<Self, Result<ConversationRecord, ApiError>>;

    fn handle(&mut self, msg: Update, _ctx: &mut Self::Context) -> Self::Result {
        self.last_active = Instant::now();
        if self.stopping {
            return Box::pin(actix::fut::ready(Err(ApiError::not_found("conversation"))));
        }
        let store = self.deps.store.clone();
        let id = self.record.id.clone();
        let change = move |rec: &mut ConversationRecord| {
            if let Some(tools) = &msg.tools {
                rec.tools.clone_from(tools);
            }
            if let Some(choice) = &msg.tool_choice {
                rec.tool_choice.clone_from(choice);
            }
        };
        Box::pin(
            async move { store.update_conversation(&id, change).await }
                .into_actor(self)
                .map(|res, act, _| {
                    let rec = res?;
                    act.record.tools.clone_from(&rec.tools);
                    act.record.tool_choice.clone_from(&rec.tool_choice);
                    Ok(rec)
                }),
        )
    }
}

impl Handler<KeyRevoked> for ConversationActor {
    type Result = ();

    fn handle(&mut self, msg: KeyRevoked, _ctx: &mut Self::Context) {
        let mine = |k: &Option<String>| k.as_deref() == Some(msg.key_id.as_str());
        if let Some(running) = self.running.as_ref().filter(|r| mine(&r.key_id)) {
            running.cancel.cancel();
        }
        let (revoked, kept): (Vec<Queued>, Vec<Queued>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| mine(&q.principal.key_id));
        self.queue = kept.into();
        for q in revoked {
            self.refuse_queued(
                &q.client_id,
                &ApiError::new(ErrorCode::Unauthorized, "the key was revoked"),
            );
        }
    }
}

impl Handler<Cancel> for ConversationActor {
    type Result = ();

    fn handle(&mut self, _: Cancel, _ctx: &mut Self::Context) {
        if let Some(running) = &self.running {
            running.cancel.cancel();
        }
    }
}

impl Handler<Shutdown> for ConversationActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        // The conversation is being deleted: turns waiting their turn are answered `not_found`
        // (never acked, nothing of them stored) and give their reservations back.
        for q in std::mem::take(&mut self.queue) {
            self.refuse_queued(&q.client_id, &ApiError::not_found("conversation"));
        }
        // The registry has already let go of it (`Registry::delete`).
        self.keep_alive = None;
        let ended = self.running.as_ref().map(|r| {
            r.cancel.cancel();
            r.ended.clone()
        });
        ctx.stop();
        Box::pin(async move {
            if let Some(ended) = ended {
                ended.cancelled().await;
            }
        })
    }
}
