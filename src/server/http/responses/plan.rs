//! From a request to posts: the settings it asks for, its input split into tool results, a
//! transcript and the message that runs the turn, and the conversation they go to.
use super::*;

/// What the request asks of this response, besides its input.
pub(super) struct Settings {
    pub(super) route: String,
    pub(super) items: Vec<InputItem>,
    pub(super) instructions: Option<String>,
    pub(super) previous: Option<String>,
    pub(super) conversation: Option<String>,
    pub(super) tools: Vec<crate::domain::Tool>,
    pub(super) tool_choice: Option<crate::domain::ToolChoice>,
    pub(super) format: Option<crate::domain::ResponseFormat>,
    pub(super) max_output_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f64>,
    pub(super) parallel_tool_calls: Option<bool>,
    pub(super) user: Option<String>,
    pub(super) metadata: serde_json::Map<String, serde_json::Value>,
    pub(super) store: bool,
    pub(super) stream: bool,
    /// A semantic route's tier forced by the `x-parley-tier` header.
    pub(super) tier: Option<String>,
}

impl Settings {
    pub(super) fn new(c: CreateResponse, d: wire::Decoded) -> Self {
        let conversation = c.conversation.and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            v => v.get("id").and_then(|i| i.as_str()).map(str::to_owned),
        });
        Self {
            route: c.model,
            items: d.items,
            instructions: c.instructions,
            previous: c.previous_response_id,
            conversation,
            tools: d.tools,
            tool_choice: d.tool_choice,
            format: d.format,
            max_output_tokens: c.max_output_tokens,
            temperature: c.temperature,
            top_p: c.top_p,
            parallel_tool_calls: c.parallel_tool_calls,
            user: c.user,
            metadata: c.metadata.unwrap_or_default(),
            store: c.store != Some(false),
            stream: c.stream,
            tier: None,
        }
    }

    /// The turn's options: this request's route, limits, tools and instructions.
    pub(super) fn options(&self) -> TurnOptions {
        TurnOptions {
            model: Some(self.route.clone()),
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            cache: None,
            tier: self.tier.clone(),
            turn: TurnOverrides {
                instructions: self.instructions.clone(),
                tools: Some(self.tools.clone()),
                tool_choice: self.tool_choice.clone(),
                response_format: self.format.clone(),
                top_p: self.top_p,
                parallel_tool_calls: self.parallel_tool_calls,
                user: self.user.clone(),
            },
        }
    }

    pub(super) fn record(
        &self,
        id: String,
        p: &Principal,
        conversation: ConversationId,
    ) -> ResponseRecord {
        ResponseRecord {
            id,
            tenant: p.tenant.clone(),
            conversation,
            model: self.route.clone(),
            created_at: unix_now(),
            input_seqs: (0, 0),
            reply_seq: None,
            status: "in_progress".into(),
            error: None,
            usage: crate::domain::Usage::default(),
            upstream_model: String::new(),
            previous_response_id: self.previous.clone(),
            instructions: self.instructions.clone(),
            metadata: self.metadata.clone(),
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            temperature: self.temperature,
            top_p: self.top_p,
            max_output_tokens: self.max_output_tokens,
            format: self.format.clone(),
        }
    }
}

/// What a request posts to its conversation: tool results first, then the message that runs
/// the turn, with the transcript before it.
pub(super) struct Posts {
    pub(super) results: Vec<Message>,
    pub(super) history: Vec<Message>,
    pub(super) last: Message,
}

/// Splits the input into posts. System and developer messages join the instructions; a run of
/// `function_call_output` items answers the previous response's calls; otherwise the input
/// ends with a user message and what comes before it is stored as given.
pub(super) fn plan_posts(s: &mut Settings, id: &str) -> Result<Posts, ApiError> {
    let mut rest = Vec::new();
    let mut instructions: Vec<String> = s.instructions.iter().cloned().collect();
    for item in std::mem::take(&mut s.items) {
        match item {
            InputItem::Message(m) if m.role == Role::System => instructions.push(m.content.text()),
            other => rest.push(other),
        }
    }
    s.instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
    let results = rest
        .iter()
        .filter(|i| matches!(i, InputItem::FunctionCallOutput { .. }))
        .count();
    if results > 0 && results == rest.len() {
        let mut results: Vec<Message> = rest
            .into_iter()
            .filter_map(|i| match i {
                InputItem::FunctionCallOutput { call_id, output } => Some(Message {
                    role: Role::Tool,
                    content: crate::domain::Content::Text(output),
                    tool_call_id: Some(call_id),
                    ..Message::default()
                }),
                _ => None,
            })
            .collect();
        let last = results.pop().ok_or_else(ApiError::internal)?;
        return Ok(Posts {
            results,
            history: Vec::new(),
            last,
        });
    }
    let Some(InputItem::Message(last)) = rest.pop() else {
        return Err(ApiError::bad_request(format!(
            "input: must end with a user message, or be only function_call_output items (response {id})"
        )));
    };
    if last.role != Role::User {
        return Err(ApiError::bad_request(
            "input: the last message must be the user's",
        ));
    }
    let mut history: Vec<Message> = Vec::new();
    for item in rest {
        match item {
            InputItem::Message(m) => history.push(m),
            InputItem::FunctionCall(call) => match history.last_mut() {
                Some(prev) if prev.role == Role::Assistant => prev.tool_calls.push(call),
                _ => history.push(Message {
                    role: Role::Assistant,
                    tool_calls: vec![call],
                    ..Message::default()
                }),
            },
            InputItem::FunctionCallOutput { call_id, output } => history.push(Message {
                role: Role::Tool,
                content: crate::domain::Content::Text(output),
                tool_call_id: Some(call_id),
                ..Message::default()
            }),
        }
    }
    Ok(Posts {
        results: Vec::new(),
        history,
        last,
    })
}

/// Tool results must answer every open call of the conversation at once (otherwise nothing
/// would run and the response would have no output).
pub(super) fn check_outputs(
    state: &AppState,
    conv: &ConversationId,
    posts: &Posts,
) -> Result<(), ApiError> {
    if posts.last.role != Role::Tool {
        return Ok(());
    }
    let open = crate::conversation::open_calls(state.store(), conv)?;
    let given: Vec<&str> = posts
        .results
        .iter()
        .chain([&posts.last])
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    if let Some(stray) = given.iter().find(|g| !open.iter().any(|o| o == *g)) {
        return Err(ApiError::bad_request(format!(
            "input: function_call_output for {stray:?}, which is not an open call"
        )));
    }
    let missing: Vec<&str> = open
        .iter()
        .map(String::as_str)
        .filter(|o| !given.contains(o))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!(
            "input: function_call_output is missing for {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// The conversation of a new response: the previous response's (forked when that response is
/// not the newest turn), the one named, or a new one.
pub(super) async fn conversation_for(
    state: &AppState,
    p: &Principal,
    s: &Settings,
) -> Result<ConversationId, ApiError> {
    let store = state.store();
    if let Some(prev) = &s.previous {
        let rec = super::owned(state, p, prev)?;
        let reply = rec.reply_seq.ok_or_else(|| {
            ApiError::bad_request(format!(
                "previous_response_id: {prev} has no reply to continue from"
            ))
        })?;
        let conv = store.owned_conversation(&rec.conversation, &p.tenant)?;
        if conv.last_seq == reply {
            return Ok(conv.id);
        }
        return fork(state, p, &conv, reply).await;
    }
    if let Some(raw) = &s.conversation {
        let id = ConversationId::parse(raw).ok_or_else(|| ApiError::not_found("conversation"))?;
        store.owned_conversation(&id, &p.tenant)?;
        return Ok(id);
    }
    let new = NewConversation {
        model: Some(s.route.clone()),
        ..NewConversation::default()
    };
    Ok(state.registry.create(&p.tenant, new).await?.id)
}

/// A new conversation with the messages of `conv` up to `upto`: continuing from a response
/// that later turns followed branches from it.
pub(super) async fn fork(
    state: &AppState,
    p: &Principal,
    conv: &crate::store::ConversationRecord,
    upto: u64,
) -> Result<ConversationId, ApiError> {
    let new = NewConversation {
        model: Some(conv.model.clone()),
        system: conv.system.clone(),
        prompt: conv.prompt.clone(),
        metadata: Some(conv.metadata.clone()),
        memory: Some(conv.memory),
        tools: conv.tools.clone(),
        tool_choice: conv.tool_choice.clone(),
    };
    let fork = state.registry.create(&p.tenant, new).await?;
    let store = state.store();
    let limit = usize::try_from(upto).unwrap_or(usize::MAX);
    for m in store.messages_after(&conv.id, 0, limit)? {
        store.append_message_unflushed(&fork.id, &m)?;
    }
    store.flush().await?;
    Ok(fork.id)
}

/// Posts the tool results and the message that runs the turn; answers the turn's frames.
pub(super) async fn post_all(
    state: &AppState,
    p: &Principal,
    rec: &ResponseRecord,
    s: &Settings,
    posts: Posts,
) -> Result<mpsc::Receiver<Outbound>, ApiError> {
    let live = state.registry.get(&rec.conversation, &p.tenant)?;
    let encoding = state.router().encoding(&live.model);
    let post = |client_id: String, message: Message, history: Vec<(Message, u32)>, listener| {
        let principal = p.clone();
        let options = s.options();
        async move {
            let tokens = tokens::content_tokens(encoding, &message).await;
            PostUserMessage {
                client_id,
                message,
                history,
                tokens,
                options,
                listener,
                principal,
                span: tracing::Span::current(),
            }
        }
    };
    for (i, m) in posts.results.into_iter().enumerate() {
        let msg = post(format!("{}/{i}", rec.id), m, Vec::new(), None).await;
        live.ask(msg).await?;
    }
    let mut history = Vec::with_capacity(posts.history.len());
    for m in posts.history {
        let t = tokens::message_tokens(encoding, &m).saturating_sub(tokens::MESSAGE_FRAMING_TOKENS);
        history.push((m, t));
    }
    let (tx, rx) = mpsc::channel(TURN_BUFFER);
    let listener = (
        next_sink_id(),
        Sink::Channel(tx),
        Scope::Turn(rec.id.clone()),
    );
    let msg = post(rec.id.clone(), posts.last, history, Some(listener)).await;
    live.ask(msg).await?;
    Ok(rx)
}
