//! `store: false`: the stateless path, with the previous response's history when given;
//! nothing is kept.
use super::*;

/// `store: false`: the stateless path, with the previous response's history when given;
/// nothing is kept.
pub(super) async fn stateless_response(
    state: &AppState,
    p: Principal,
    mut s: Settings,
) -> Result<HttpResponse, ApiError> {
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let posts = plan_posts(&mut s, &id)?;
    let deps = state.registry.deps();
    let mut messages = Vec::new();
    if let Some(i) = &s.instructions {
        messages.push(Message::text(Role::System, i.clone()));
    }
    if let Some(prev) = &s.previous {
        let rec = super::owned(state, &p, prev)?;
        let upto = usize::try_from(rec.reply_seq.unwrap_or(rec.input_seqs.1)).unwrap_or(0);
        let earlier = state.store().messages_after(&rec.conversation, 0, upto)?;
        messages.extend(
            earlier
                .iter()
                .filter(|m| m.is_sent())
                .map(MessageRecord::to_message),
        );
    }
    messages.extend(posts.history);
    messages.extend(posts.results);
    messages.push(posts.last);
    let chat = ChatRequest {
        model: String::new(),
        messages: trim(deps, &s.route, messages)?,
        max_tokens: s.max_output_tokens,
        temperature: s.temperature,
        tools: s.tools.clone(),
        tool_choice: s.tool_choice.clone(),
        params: Box::new(crate::domain::Params {
            top_p: s.top_p,
            user: s.user.clone(),
            parallel_tool_calls: s.parallel_tool_calls,
            response_format: s.format.clone(),
            ..crate::domain::Params::default()
        }),
        whole: !s.stream,
    };
    let request = stateless::prepare(deps, p.clone(), &s.route, chat, s.tier.as_deref())?;
    let mut run = Running::start(Arc::clone(deps), request);
    let rec = s.record(id, &p, ConversationId::generate());
    let first = run.next().await;
    if let Piece::Done(out) = first {
        // Nothing streamed: a failure answers with its status, as it does without `stream`.
        let mut out = *out;
        if let Some(err) = failure(&mut out) {
            return Err(err);
        }
        let response = unstored(&rec, &out);
        if !s.stream {
            return Ok(HttpResponse::Ok().json(response));
        }
        let mut w = Writer::new(unstored_skeleton(&rec));
        let mut bytes = w.start().to_vec();
        bytes.extend_from_slice(&w.text(&out.text));
        for (i, c) in out.tool_calls.iter().enumerate() {
            bytes.extend_from_slice(&w.call(i, Some(&c.id), Some(&c.name), &c.arguments));
        }
        bytes.extend_from_slice(&w.finish(response));
        return Ok(sse::response(stream::once(async move {
            Ok::<_, actix_web::Error>(bytes::Bytes::from(bytes))
        })));
    }
    if !s.stream {
        let mut out = loop {
            if let Piece::Done(out) = run.next().await {
                break *out;
            }
        };
        if let Some(err) = failure(&mut out) {
            return Err(err);
        }
        return Ok(HttpResponse::Ok().json(unstored(&rec, &out)));
    }
    let mut w = Writer::new(unstored_skeleton(&rec));
    let opening = w.start();
    let body = run.body((w, rec), |(w, rec), piece, buf| match piece {
        Piece::Event(Event::Text(t)) => {
            buf.extend_from_slice(&w.text(&t));
            false
        }
        Piece::Event(Event::ToolCall(d)) => {
            buf.extend_from_slice(&w.call(
                d.index as usize,
                d.id.as_deref(),
                d.name.as_deref(),
                &d.arguments,
            ));
            false
        }
        Piece::Event(_) => false,
        Piece::Done(out) => {
            buf.extend_from_slice(&w.finish(unstored(rec, &out)));
            true
        }
    });
    Ok(sse::response(
        stream::once(async move { Ok(opening) }).chain(body),
    ))
}

pub(super) fn unstored_skeleton(rec: &ResponseRecord) -> Response {
    let mut r = response_of(rec, None);
    r.store = false;
    r.conversation = None;
    r
}

/// The Response object of an unstored response.
pub(super) fn unstored(rec: &ResponseRecord, out: &Outcome) -> Response {
    let mut rec = rec.clone();
    rec.usage = out.usage;
    rec.upstream_model.clone_from(&out.model);
    rec.status = match out.finish {
        _ if out.error.is_some() => "failed".into(),
        FinishReason::Length => "incomplete".into(),
        _ => "completed".into(),
    };
    rec.error = out.error.as_ref().map(|e| StoredError {
        code: e.code,
        message: e.message.clone(),
    });
    let mut r = unstored_skeleton(&rec);
    r.output = output_of(&rec.id, &out.text, &out.tool_calls);
    r
}

/// The newest messages that fit the route's budget, whole tool groups only, system first.
pub(super) fn trim(
    deps: &Deps,
    route: &str,
    mut messages: Vec<Message>,
) -> Result<Vec<Message>, ApiError> {
    let encoding = deps.router.encoding(route);
    let system =
        (messages.first().map(|m| m.role) == Some(Role::System)).then(|| messages.remove(0));
    let last = messages
        .pop()
        .ok_or_else(|| ApiError::bad_request("input: must not be empty"))?;
    let cost = |m: &Message| {
        tokens::message_tokens(encoding, m).saturating_sub(tokens::MESSAGE_FRAMING_TOKENS)
    };
    let kind = |m: &Message| match m.role {
        Role::Tool => tokens::Kind::Result,
        Role::Assistant if !m.tool_calls.is_empty() => tokens::Kind::Calls,
        _ => tokens::Kind::Plain,
    };
    let groups: Vec<Vec<Message>> = tokens::groups(messages.into_iter().rev(), kind).collect();
    let (n, _) = tokens::fit_history(
        deps.budget,
        system.as_ref().map(cost),
        cost(&last),
        groups
            .iter()
            .map(|g| tokens::group_cost(g.iter().map(cost))),
    )
    .map_err(|e| ApiError::new(ErrorCode::TooLarge, e.to_string()))?;
    let mut kept: Vec<Message> = groups.into_iter().take(n).flatten().collect();
    kept.reverse();
    Ok(system.into_iter().chain(kept).chain([last]).collect())
}
