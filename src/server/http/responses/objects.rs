//! Response objects and the event writer: output items from a reply, and the typed stream
//! events written as the reply arrives.
use super::*;

/// Item ids derive from the response's, so a stored response shows the same ids again.
pub(super) fn message_item_id(response: &str) -> String {
    format!("msg_{}", response.trim_start_matches("resp_"))
}

pub(super) fn call_item_id(response: &str, i: usize) -> String {
    format!("fc_{}_{i}", response.trim_start_matches("resp_"))
}

/// The output items of a reply: its text as a message, then its calls.
pub(super) fn output_of(id: &str, text: &str, calls: &[ToolCall]) -> Vec<OutputItem> {
    let mut out = Vec::new();
    if !text.is_empty() {
        out.push(OutputItem::Message {
            id: message_item_id(id),
            status: "completed",
            role: "assistant",
            content: vec![OutputText::new(text.to_owned())],
        });
    }
    for (i, c) in calls.iter().enumerate() {
        out.push(OutputItem::FunctionCall {
            id: call_item_id(id, i),
            call_id: c.id.clone(),
            name: c.name.clone(),
            arguments: c.arguments.clone(),
            status: "completed",
        });
    }
    out
}

/// The Response object of a record, with its reply's output when there is one.
pub(super) fn response_of(rec: &ResponseRecord, reply: Option<&MessageRecord>) -> Response {
    let status: &'static str = match rec.status.as_str() {
        "completed" => "completed",
        "incomplete" => "incomplete",
        "failed" => "failed",
        _ => "in_progress",
    };
    Response {
        id: rec.id.clone(),
        object: "response",
        created_at: rec.created_at,
        status,
        error: rec.error.as_ref().map(|e| ResponseError {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
        }),
        incomplete_details: (status == "incomplete").then_some(IncompleteDetails {
            reason: "max_output_tokens",
        }),
        instructions: rec.instructions.clone(),
        max_output_tokens: rec.max_output_tokens,
        model: if rec.upstream_model.is_empty() {
            rec.model.clone()
        } else {
            rec.upstream_model.clone()
        },
        output: reply.map_or_else(Vec::new, |m| output_of(&rec.id, &m.content, &m.tool_calls)),
        parallel_tool_calls: true,
        previous_response_id: rec.previous_response_id.clone(),
        temperature: rec.temperature,
        top_p: rec.top_p,
        tool_choice: wire::tool_choice_json(rec.tool_choice.as_ref()),
        tools: rec.tools.iter().map(wire::tool_json).collect(),
        text: wire::TextConfig {
            format: Some(wire::format_json(rec.format.as_ref())),
        },
        truncation: "auto",
        usage: (status != "in_progress").then(|| rec.usage.into()),
        metadata: rec.metadata.clone(),
        store: true,
        conversation: Some(ConversationRef {
            id: rec.conversation.to_string(),
        }),
    }
}

/// Writes the typed events of one response as output arrives: items open when their first
/// piece comes and close when the next item starts or the response ends.
pub(super) struct Writer {
    pub(super) seq: u64,
    /// The id of the response's message item (derived from the response's once).
    msg_id: String,
    pub(super) response: Response,
    /// Items closed so far.
    pub(super) output: Vec<OutputItem>,
    pub(super) open: Option<Open>,
}

pub(super) enum Open {
    Text {
        text: String,
    },
    Call {
        index: usize,
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl Writer {
    pub(super) fn new(response: Response) -> Self {
        Self {
            seq: 0,
            msg_id: message_item_id(&response.id),
            response,
            output: Vec::new(),
            open: None,
        }
    }

    pub(super) fn emit(&mut self, out: &mut Vec<u8>, event: StreamEvent) {
        let numbered = wire::Numbered {
            event: &event,
            sequence_number: self.seq,
        };
        self.seq += 1;
        let json = serde_json::to_string(&numbered).unwrap_or_default();
        out.extend_from_slice(&sse::event(Some(event.name()), &json));
    }

    pub(super) fn start(&mut self) -> bytes::Bytes {
        let mut out = Vec::new();
        let r = Box::new(self.response.clone());
        self.emit(
            &mut out,
            StreamEvent::Created {
                response: r.clone(),
            },
        );
        self.emit(&mut out, StreamEvent::InProgress { response: r });
        bytes::Bytes::from(out)
    }

    pub(super) fn id(&self) -> &str {
        &self.response.id
    }

    pub(super) fn text(&mut self, delta: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if delta.is_empty() {
            return out;
        }
        if !matches!(self.open, Some(Open::Text { .. })) {
            self.close(&mut out);
            let item = OutputItem::Message {
                id: self.msg_id.clone(),
                status: "in_progress",
                role: "assistant",
                content: Vec::new(),
            };
            let index = self.output.len();
            self.emit(
                &mut out,
                StreamEvent::OutputItemAdded {
                    output_index: index,
                    item,
                },
            );
            let item_id = self.msg_id.clone();
            self.emit(
                &mut out,
                StreamEvent::ContentPartAdded {
                    item_id,
                    output_index: index,
                    content_index: 0,
                    part: OutputText::new(String::new()),
                },
            );
            self.open = Some(Open::Text {
                text: String::new(),
            });
        }
        if let Some(Open::Text { text }) = &mut self.open {
            text.push_str(delta);
        }
        let item_id = self.msg_id.clone();
        let output_index = self.output.len();
        self.emit(
            &mut out,
            StreamEvent::OutputTextDelta {
                item_id,
                output_index,
                content_index: 0,
                delta: delta.to_owned(),
                logprobs: Vec::new(),
            },
        );
        out
    }

    pub(super) fn call(
        &mut self,
        index: usize,
        id: Option<&str>,
        name: Option<&str>,
        args: &str,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let same = matches!(&self.open, Some(Open::Call { index: i, .. }) if *i == index);
        if !same {
            self.close(&mut out);
            let call_id = id.unwrap_or_default().to_owned();
            let name = name.unwrap_or_default().to_owned();
            let item = OutputItem::FunctionCall {
                id: call_item_id(self.id(), index),
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: String::new(),
                status: "in_progress",
            };
            let output_index = self.output.len();
            self.emit(
                &mut out,
                StreamEvent::OutputItemAdded { output_index, item },
            );
            self.open = Some(Open::Call {
                index,
                call_id,
                name,
                arguments: String::new(),
            });
        }
        if !args.is_empty() {
            if let Some(Open::Call { arguments, .. }) = &mut self.open {
                arguments.push_str(args);
            }
            let item_id = call_item_id(self.id(), index);
            let output_index = self.output.len();
            self.emit(
                &mut out,
                StreamEvent::FunctionCallArgumentsDelta {
                    item_id,
                    output_index,
                    delta: args.to_owned(),
                },
            );
        }
        out
    }

    /// Closes the open item with its `done` events.
    pub(super) fn close(&mut self, out: &mut Vec<u8>) {
        let output_index = self.output.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Text { text }) => {
                let item_id = self.msg_id.clone();
                let part = OutputText::new(text.clone());
                self.emit(
                    out,
                    StreamEvent::OutputTextDone {
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        text,
                        logprobs: Vec::new(),
                    },
                );
                self.emit(
                    out,
                    StreamEvent::ContentPartDone {
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        part: part.clone(),
                    },
                );
                OutputItem::Message {
                    id: item_id,
                    status: "completed",
                    role: "assistant",
                    content: vec![part],
                }
            }
            Some(Open::Call {
                index,
                call_id,
                name,
                arguments,
            }) => {
                let item_id = call_item_id(self.id(), index);
                self.emit(
                    out,
                    StreamEvent::FunctionCallArgumentsDone {
                        item_id: item_id.clone(),
                        output_index,
                        name: name.clone(),
                        arguments: arguments.clone(),
                    },
                );
                OutputItem::FunctionCall {
                    id: item_id,
                    call_id,
                    name,
                    arguments,
                    status: "completed",
                }
            }
        };
        self.emit(
            out,
            StreamEvent::OutputItemDone {
                output_index,
                item: item.clone(),
            },
        );
        self.output.push(item);
    }

    /// Closes what is open and ends with `response.completed` (or `incomplete`, `failed`).
    pub(super) fn finish(&mut self, response: Response) -> bytes::Bytes {
        let mut out = Vec::new();
        self.close(&mut out);
        let status = response.status;
        let response = Box::new(response);
        let event = match status {
            "completed" => StreamEvent::Completed { response },
            "incomplete" => StreamEvent::Incomplete { response },
            _ => StreamEvent::Failed { response },
        };
        self.emit(&mut out, event);
        bytes::Bytes::from(out)
    }
}
