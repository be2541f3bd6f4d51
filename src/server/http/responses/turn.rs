//! A stored response's turn: its frames read from the conversation, answered as one Response
//! object or as typed events, and how it ended stored with the record.
use super::*;

/// A stored response's turn in progress.
pub(super) struct Turn {
    pub(super) state: web::Data<AppState>,
    pub(super) record: ResponseRecord,
    pub(super) settings: Settings,
    pub(super) rx: mpsc::Receiver<Outbound>,
    /// Messages stored before the one that ran the turn, as its transcript.
    pub(super) history: u64,
}

impl Turn {
    /// The next frame of the turn (`None` when it ended without `done` or `error`).
    pub(super) async fn next(&mut self) -> Option<std::sync::Arc<ServerFrame>> {
        match self.rx.recv().await? {
            Outbound::Frame { frame, .. } => Some(frame),
            Outbound::Close { .. } | Outbound::Relayed(_) => None,
        }
    }

    /// Stores how the turn ended and answers the Response object. `ack` is the seq of the
    /// message that ran the turn, when its `ack` was seen.
    pub(super) async fn settle(&mut self, end: Option<&ServerFrame>, ack: Option<u64>) -> Response {
        let store = self.state.store();
        let rec = &mut self.record;
        let mut last = ack;
        match end {
            Some(ServerFrame::Done(done)) => {
                last = Some(done.reply_to);
                rec.reply_seq = Some(done.seq);
                rec.usage = done.usage;
                rec.upstream_model.clone_from(&done.model);
                rec.status = if done.finish_reason == FinishReason::Length.as_str() {
                    "incomplete".into()
                } else {
                    "completed".into()
                };
            }
            Some(ServerFrame::Error(e)) => {
                last = e.reply_to.or(last);
                rec.status = "failed".into();
                rec.error = Some(StoredError {
                    code: e.code,
                    message: e.message.clone(),
                });
            }
            _ => {
                rec.status = "failed".into();
                rec.error = Some(StoredError {
                    code: ErrorCode::Internal,
                    message: "the turn ended without a reply".into(),
                });
            }
        }
        if let Some(last) = last {
            // Tool results came first (their client ids are the response's); otherwise the
            // transcript stored just before the message.
            let first_result = store
                .seq_for_client_id(&rec.conversation, &format!("{}/0", rec.id))
                .ok()
                .flatten();
            let first = first_result.unwrap_or(last.saturating_sub(self.history));
            rec.input_seqs = (first, last);
        }
        if let Err(e) = store.put_response(rec).await {
            tracing::error!(error = %e, response = %rec.id, "response record not stored");
        }
        let reply = rec
            .reply_seq
            .and_then(|seq| store.message(&rec.conversation, seq).ok().flatten());
        response_of(rec, reply.as_ref())
    }

    pub(super) async fn complete(mut self) -> Result<HttpResponse, ApiError> {
        let mut first_seq = None;
        let end = loop {
            match self.next().await {
                Some(frame) => match &*frame {
                    ServerFrame::Ack { seq, .. } => first_seq = Some(*seq),
                    ServerFrame::Done(_) | ServerFrame::Error(_) => break Some(frame),
                    _ => {}
                },
                None => break None,
            }
        };
        let response = self.settle(end.as_deref(), first_seq).await;
        if let Some(ServerFrame::Error(e)) = end.as_deref() {
            let mut err = ApiError::new(e.code, e.message.clone());
            err.retry_after = e.retry_after_ms.map(Duration::from_millis);
            return Err(err);
        }
        Ok(HttpResponse::Ok().json(response))
    }

    /// The typed SSE events of the turn.
    pub(super) fn events(
        self,
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, actix_web::Error>> {
        let skeleton = response_of(&self.record, None);
        let writer = Writer::new(skeleton);
        stream::unfold(
            (self, writer, None::<u64>, false),
            |(mut turn, mut w, mut first_seq, ended)| async move {
                if ended {
                    return None;
                }
                if w.seq == 0 {
                    let bytes = w.start();
                    return Some((Ok(bytes), (turn, w, first_seq, false)));
                }
                let frame = turn.next().await;
                let bytes = match frame.as_deref() {
                    Some(ServerFrame::Ack { seq, .. }) => {
                        first_seq.get_or_insert(*seq);
                        bytes::Bytes::new()
                    }
                    Some(ServerFrame::Delta {
                        text, tool_calls, ..
                    }) => {
                        let mut out = w.text(text);
                        for c in tool_calls.iter().flatten() {
                            out.extend_from_slice(&w.call(
                                c.index as usize,
                                c.id.as_deref(),
                                c.function.name.as_deref(),
                                c.function.arguments.as_deref().unwrap_or_default(),
                            ));
                        }
                        bytes::Bytes::from(out)
                    }
                    Some(end @ (ServerFrame::Done(_) | ServerFrame::Error(_))) => {
                        let response = turn.settle(Some(end), first_seq).await;
                        return Some((Ok(w.finish(response)), (turn, w, first_seq, true)));
                    }
                    Some(_) => bytes::Bytes::new(),
                    None => {
                        let response = turn.settle(None, first_seq).await;
                        return Some((Ok(w.finish(response)), (turn, w, first_seq, true)));
                    }
                };
                Some((Ok(bytes), (turn, w, first_seq, false)))
            },
        )
    }
}
