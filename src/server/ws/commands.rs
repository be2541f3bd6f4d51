//! The commands of one socket: its decoded frames are worked in order (so turns are queued in
//! the order the client sent them) by a task that exists only while there is work, which talks
//! to the registry and conversation actors and answers through the socket's recipient. An idle
//! socket holds no task and no channel, only its parked [`CommandCtx`]. When the socket goes,
//! what it queued is still worked, then its subscriptions go.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;

use actix::Recipient;
use actix_web::web;
use futures_util::FutureExt;
use secrecy::SecretString;
use tokio::sync::mpsc;

use super::frames::ClientFrame;
use crate::cluster::relay::{self, Link, Lost, ToOwner};
use crate::conversation::frames::ErrorFrame;
use crate::conversation::messages::{
    Cancel, PostUserMessage, Subscribe, TurnOptions, Unsubscribe, Update,
};
use crate::conversation::{NewConversation, Outbound, Scope, ServerFrame, Sink, SinkId};
use crate::domain::{Message, Role};
use crate::error::ApiError;
use crate::ids::ConversationId;
use crate::server::AppState;
use crate::tenant::Principal;
use crate::tokens;
use crate::wire::openai::{decode_tools, FunctionTool, WireToolChoice};

/// A decoded client frame, and (cluster mode) its text as sent, for relaying.
pub struct Incoming {
    pub frame: ClientFrame,
    pub raw: Option<Box<str>>,
}

pub struct CommandCtx {
    state: web::Data<AppState>,
    principal: Principal,
    sink_id: SinkId,
    socket: Recipient<Outbound>,
    subscribed: HashSet<ConversationId>,
    /// Cluster mode: the client's key, and this socket's relays to other nodes, by node id.
    token: Option<Arc<SecretString>>,
    links: HashMap<String, Link>,
    lost: Option<mpsc::UnboundedSender<Lost>>,
}

impl CommandCtx {
    pub fn new(
        state: web::Data<AppState>,
        principal: Principal,
        sink_id: SinkId,
        socket: Recipient<Outbound>,
        token: Option<Arc<SecretString>>,
    ) -> Self {
        Self {
            state,
            principal,
            sink_id,
            socket,
            subscribed: HashSet::new(),
            token,
            links: HashMap::new(),
            lost: None,
        }
    }

    fn send(&self, frame: &ServerFrame) {
        // Answers are one per client frame, and client frames are bounded by the inbox.
        self.socket.do_send(frame.encode());
    }

    fn fail(
        &self,
        err: &ApiError,
        conversation: Option<ConversationId>,
        client_id: Option<String>,
    ) {
        let mut frame = ErrorFrame::new(err);
        frame.conversation = conversation;
        frame.client_id = client_id;
        self.send(&ServerFrame::Error(frame));
    }

    fn sink(&self) -> Sink {
        Sink::Socket(self.socket.clone())
    }
}

impl Drop for CommandCtx {
    /// The socket has closed and its queue is worked off: the conversations here forget this
    /// socket (and the links, dropped with it, close the relay sockets).
    fn drop(&mut self) {
        for id in &self.subscribed {
            if let Some(addr) = self.state.registry.peek(id) {
                addr.do_send(Unsubscribe {
                    sink_id: self.sink_id,
                });
            }
        }
    }
}

/// Client frames that may wait for the ones before them to be worked.
const INBOX: usize = 256;

/// What a socket's command task works, in order.
pub enum Work {
    Frame(Box<Incoming>),
    /// Cluster mode: a relay to another node broke.
    Lost(Lost),
}

/// A socket's command queue. Its frames wait here and a task works them one after the other;
/// the task ends when the queue is empty and parks the context here, and the next frame starts
/// a new one. The socket's actor and that task share it on the socket's arbiter thread.
pub struct Commands(Rc<RefCell<Queue>>);

struct Queue {
    pending: VecDeque<Work>,
    context: Context,
}

/// Where a socket's command context is.
// One per socket, held in place as an `Option` of the context was: boxing the context would
// add an allocation, not save one.
#[allow(clippy::large_enum_variant)]
enum Context {
    /// Here: no task runs.
    Parked(CommandCtx),
    /// With the task that works the queue; `closing` once the socket has closed (the task
    /// drops it when the queue is worked off).
    Working { closing: bool },
    /// Dropped: the socket has closed and nothing is left to work.
    Gone,
}

impl Commands {
    pub fn new(mut cx: CommandCtx) -> Self {
        let lost = cx.state.cluster().map(|_| {
            let (lost_tx, lost_rx) = mpsc::unbounded_channel();
            cx.lost = Some(lost_tx);
            lost_rx
        });
        let commands = Self(Rc::new(RefCell::new(Queue {
            pending: VecDeque::new(),
            context: Context::Parked(cx),
        })));
        if let Some(mut lost_rx) = lost {
            // The socket's relays report here when they break; the forwarder ends once the
            // context and its links are gone (they hold the senders).
            let forward = Self(Rc::clone(&commands.0));
            actix::spawn(async move {
                while let Some(lost) = lost_rx.recv().await {
                    forward.push(Work::Lost(lost));
                }
            });
        }
        commands
    }

    /// Queues `work` behind what waits already; false (and nothing queued) for a frame when
    /// [`INBOX`] wait or the socket has closed. A relay's report is taken while anything is
    /// left to work: it carries frames the socket sent before it closed.
    pub fn push(&self, work: Work) -> bool {
        let mut queue = self.0.borrow_mut();
        let refused = match (&work, &queue.context) {
            (_, Context::Gone) => true,
            (Work::Frame(_), Context::Working { closing: true }) => true,
            (Work::Frame(_), _) => queue.pending.len() >= INBOX,
            (Work::Lost(_), _) => false,
        };
        if refused {
            return false;
        }
        queue.pending.push_back(work);
        match std::mem::replace(&mut queue.context, Context::Working { closing: false }) {
            Context::Parked(cx) => {
                actix::spawn(drain(Rc::clone(&self.0), cx));
            }
            other => queue.context = other,
        }
        true
    }

    /// The socket has closed: what it queued is still worked, then the context is dropped.
    pub fn close(&self) {
        let context = {
            let mut queue = self.0.borrow_mut();
            let closed = match queue.context {
                Context::Working { .. } => Context::Working { closing: true },
                _ => Context::Gone,
            };
            std::mem::replace(&mut queue.context, closed)
        };
        drop(context);
    }
}

/// Works the queue until it is empty, then parks the context (or, the socket gone, drops it).
/// A frame whose handling panics is answered `internal`; the socket goes on with the next.
async fn drain(queue: Rc<RefCell<Queue>>, mut cx: CommandCtx) {
    loop {
        let next = {
            let mut q = queue.borrow_mut();
            match q.pending.pop_front() {
                Some(next) => next,
                None => {
                    if matches!(q.context, Context::Working { closing: false }) {
                        q.context = Context::Parked(cx);
                    } else {
                        q.context = Context::Gone;
                    }
                    break;
                }
            }
        };
        let worked = AssertUnwindSafe(work(&mut cx, next)).catch_unwind().await;
        if worked.is_err() {
            tracing::error!(
                socket = cx.sink_id,
                "a socket's frame panicked; it was answered internal"
            );
            cx.fail(&ApiError::internal(), None, None);
        }
    }
}

async fn work(cx: &mut CommandCtx, next: Work) {
    match next {
        Work::Frame(incoming) => {
            let Incoming { frame, raw } = *incoming;
            if let Some(raw) = raw {
                if relayed(cx, &frame, raw).await {
                    return;
                }
            }
            handle(cx, frame).await;
        }
        Work::Lost(lost) => Box::pin(rewatch(cx, lost)).await,
    }
}

async fn handle(cx: &mut CommandCtx, frame: ClientFrame) {
    #[cfg(feature = "fault-injection")]
    if matches!(&frame, ClientFrame::Create { client_id, .. } if client_id == "[[parley:panic]]") {
        crate::error::injected_panic("fault injection: a socket's frame panics");
    }
    match frame {
        ClientFrame::Create {
            client_id,
            model,
            system,
            prompt,
            metadata,
            memory,
            tools,
            tool_choice,
        } => {
            if let Err(e) = crate::ids::check_client_id(&client_id) {
                return cx.fail(&ApiError::bad_request(e), None, None);
            }
            let (tools, tool_choice) = match decode_tools(tools.unwrap_or_default(), tool_choice) {
                Ok(t) => t,
                Err(e) => return cx.fail(&ApiError::bad_request(e), None, Some(client_id)),
            };
            let new = NewConversation {
                model,
                system,
                prompt,
                metadata,
                memory,
                tools,
                tool_choice,
            };
            let created = match cx
                .principal
                .check_model(new.model.as_deref().unwrap_or("default"))
            {
                Ok(()) => match cx.state.governor.take_request(&cx.principal) {
                    Ok(()) => cx.state.registry.create(&cx.principal.tenant, new).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match created {
                Ok(rec) => cx.send(&ServerFrame::Created {
                    client_id,
                    conversation: rec.id,
                }),
                Err(e) => cx.fail(&e, None, Some(client_id)),
            }
        }
        ClientFrame::Subscribe {
            conversation,
            after_seq,
        } => {
            let Some(id) = parse(cx, &conversation, None) else {
                return;
            };
            if let Err(e) = subscribe(cx, &id, after_seq).await {
                cx.fail(&e, Some(id), None);
            }
        }
        ClientFrame::UserMessage {
            conversation,
            client_id,
            content,
            options,
        } => {
            let Some(id) = parse(cx, &conversation, Some(&client_id)) else {
                return;
            };
            let options = options.unwrap_or_default();
            let message = Message {
                content,
                ..Message::default()
            };
            if let Err(e) = post(cx, &id, client_id.clone(), message, options).await {
                cx.fail(&e, Some(id), Some(client_id));
            }
        }
        ClientFrame::ToolResult {
            conversation,
            client_id,
            tool_call_id,
            content,
            is_error,
        } => {
            let Some(id) = parse(cx, &conversation, Some(&client_id)) else {
                return;
            };
            let message = Message {
                role: Role::Tool,
                content,
                tool_call_id: Some(tool_call_id),
                is_error,
                ..Message::default()
            };
            if let Err(e) = post(cx, &id, client_id.clone(), message, TurnOptions::default()).await
            {
                cx.fail(&e, Some(id), Some(client_id));
            }
        }
        ClientFrame::Update {
            conversation,
            tools,
            tool_choice,
        } => {
            let Some(id) = parse(cx, &conversation, None) else {
                return;
            };
            if let Err(e) = update(cx, &id, tools, tool_choice).await {
                cx.fail(&e, Some(id), None);
            }
        }
        ClientFrame::Cancel { conversation } => {
            let Some(id) = parse(cx, &conversation, None) else {
                return;
            };
            match cx.state.registry.get(&id, &cx.principal.tenant) {
                Ok(live) => live.addr.do_send(Cancel),
                Err(e) => cx.fail(&e, Some(id), None),
            }
        }
    }
}

fn parse(cx: &CommandCtx, raw: &str, client_id: Option<&str>) -> Option<ConversationId> {
    let id = ConversationId::parse(raw);
    if id.is_none() {
        cx.fail(
            &ApiError::not_found("conversation"),
            None,
            client_id.map(str::to_owned),
        );
    }
    id
}

async fn subscribe(
    cx: &mut CommandCtx,
    id: &ConversationId,
    after_seq: Option<u64>,
) -> Result<(), ApiError> {
    let live = cx.state.registry.get(id, &cx.principal.tenant)?;
    live.ask(Subscribe {
        sink_id: cx.sink_id,
        sink: cx.sink(),
        after_seq,
    })
    .await?;
    cx.subscribed.insert(id.clone());
    Ok(())
}

async fn update(
    cx: &mut CommandCtx,
    id: &ConversationId,
    tools: Option<Vec<FunctionTool>>,
    tool_choice: Option<WireToolChoice>,
) -> Result<(), ApiError> {
    let live = cx.state.registry.get(id, &cx.principal.tenant)?;
    let tools = match tools {
        Some(t) => Some(decode_tools(t, None).map_err(ApiError::bad_request)?.0),
        None => None,
    };
    let rec = live
        .ask(Update {
            tools,
            tool_choice: tool_choice.map(|c| Some(c.0)),
        })
        .await?;
    cx.send(&ServerFrame::Updated {
        conversation: rec.id,
        tools: rec.tools.len(),
    });
    Ok(())
}

async fn post(
    cx: &mut CommandCtx,
    id: &ConversationId,
    client_id: String,
    message: Message,
    options: TurnOptions,
) -> Result<(), ApiError> {
    let live = cx.state.registry.get(id, &cx.principal.tenant)?;
    cx.principal
        .check_model(options.model.as_deref().unwrap_or(&live.model))?;
    let tokens = tokens::content_tokens(cx.state.router().encoding(&live.model), &message).await;
    let listener = Some((cx.sink_id, cx.sink(), Scope::Conversation));
    live.ask(PostUserMessage {
        client_id,
        message,
        history: Vec::new(),
        tokens,
        options,
        listener,
        principal: cx.principal.clone(),
        span: tracing::Span::current(),
    })
    .await?;
    cx.subscribed.insert(id.clone());
    Ok(())
}

/// The conversation a frame is about, and whether sending it subscribes the socket.
fn target(frame: &ClientFrame) -> Option<(&str, bool)> {
    match frame {
        ClientFrame::Create { .. } => None,
        ClientFrame::Subscribe { conversation, .. }
        | ClientFrame::UserMessage { conversation, .. }
        | ClientFrame::ToolResult { conversation, .. } => Some((conversation, true)),
        ClientFrame::Update { conversation, .. } | ClientFrame::Cancel { conversation } => {
            Some((conversation, false))
        }
    }
}

/// Cluster mode: relays a frame about a conversation another node runs; answers whether it
/// did (false: it is handled here).
async fn relayed(cx: &mut CommandCtx, frame: &ClientFrame, raw: Box<str>) -> bool {
    let Some((conv, subscribes)) = target(frame) else {
        return false;
    };
    let Some(id) = ConversationId::parse(conv) else {
        return false;
    };
    let Some(cluster) = cx.state.cluster().cloned() else {
        return false;
    };
    if cx.state.registry.peek(&id).is_some() {
        return false;
    }
    let (node, addr) = match relay::route(&cluster, &id).await {
        Ok(Some(there)) => there,
        Ok(None) => return false,
        Err(e) => {
            cx.fail(&e, Some(id), None);
            return true;
        }
    };
    let out = ToOwner {
        text: raw.into(),
        subscribes: subscribes.then_some(id),
        seen: 0,
    };
    send_to(cx, &cluster, node, &addr, out);
    true
}

fn send_to(
    cx: &mut CommandCtx,
    cluster: &crate::cluster::Cluster,
    node: String,
    addr: &str,
    out: ToOwner,
) {
    let Some(lost) = cx.lost.clone() else { return };
    let mut out = out;
    // Twice at most: a link found closed is replaced by a new one (if the node is gone, the
    // new link fails and re-routes what it was given).
    for _ in 0..2 {
        let link = cx.links.entry(node.clone()).or_insert_with(|| {
            Link::open(
                cluster,
                node.clone(),
                addr,
                cx.token.clone(),
                cx.socket.clone(),
                lost.clone(),
            )
        });
        match link.send(out) {
            Ok(()) => return,
            Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => {
                let err = ApiError::new(
                    crate::error::ErrorCode::RateLimited,
                    "too many frames in flight to the node running this conversation",
                )
                .with_retry_after(std::time::Duration::from_secs(1));
                return cx.fail(&err, back.subscribes, None);
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(back)) => {
                cx.links.remove(&node);
                out = back;
            }
        }
    }
}

/// A relay broke (its node died or left): the conversations watched through it are watched
/// again where they run now, from the last `seq` this socket saw, so nothing is missed.
async fn rewatch(cx: &mut CommandCtx, lost: Lost) {
    // Unless a newer link to that node has replaced the one that broke.
    if cx.links.get(&lost.node).is_some_and(|l| l.id == lost.link) {
        cx.links.remove(&lost.node);
    }
    let Some(cluster) = cx.state.cluster().cloned() else {
        return;
    };
    for (id, last_seq) in lost.watched {
        match relay::route(&cluster, &id).await {
            Ok(Some((node, addr))) => {
                if node == lost.node {
                    // Still announced: it may have died a moment ago (its announcement lapses
                    // with its leases), or only the link broke. Try it again, not at once.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let text = serde_json::json!({
                    "type": "subscribe", "conversation": id, "after_seq": last_seq,
                })
                .to_string();
                let out = ToOwner {
                    text,
                    subscribes: Some(id),
                    seen: last_seq,
                };
                send_to(cx, &cluster, node, &addr, out);
            }
            Ok(_) => {
                if let Err(e) = subscribe(cx, &id, Some(last_seq)).await {
                    cx.fail(&e, Some(id), None);
                }
            }
            Err(e) => cx.fail(&e, Some(id), None),
        }
    }
    for text in lost.unsent {
        // Frames this task decoded once already.
        let Ok(frame) = super::frames::decode(&text) else {
            continue;
        };
        if !Box::pin(relayed(cx, &frame, text.into())).await {
            Box::pin(handle(cx, frame)).await;
        }
    }
}
