//! Cluster mode: a request about a conversation another node runs is relayed there whole
//! (`/v1/conversations/{id}` and everything under it, and a `POST /v1/responses` that continues
//! a conversation); see `cluster::relay`.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;

use actix_web::HttpMessage;
use futures_util::StreamExt;

use super::AppState;
use crate::cluster::relay::{self, RELAYED};
use crate::error::{ApiError, ErrorCode};
use crate::ids::ConversationId;

/// The conversation a path is about, if it is one of `/v1/conversations/{id}[/…]`.
fn conversation_of(path: &str) -> Option<ConversationId> {
    let rest = path.strip_prefix("/v1/conversations/")?;
    ConversationId::parse(rest.split('/').next()?)
}

/// The middleware function, for `actix_web::middleware::from_fn`.
///
/// # Errors
/// Passes on the inner service's errors; `upstream_unavailable` when the owner is unreachable.
pub async fn relay(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let cluster = match state.cluster() {
        Some(c) if !req.headers().contains_key(RELAYED) => c.clone(),
        _ => {
            return next
                .call(req)
                .await
                .map(ServiceResponse::map_into_boxed_body)
        }
    };
    let limit = state.config.server.max_frame_bytes;
    // The body, read here only for a request that must be looked into or relayed.
    let mut body = None;
    let conversation = if let Some(id) = conversation_of(req.path()) {
        Some(id)
    } else if req.path() == "/v1/responses" && req.method() == actix_web::http::Method::POST {
        let bytes = match read_body(&mut req, limit).await {
            Ok(b) => b,
            Err(e) => return Ok(req.error_response(e)),
        };
        let id = match continued(&state, &bytes) {
            Ok(id) => id,
            Err(e) => return Ok(req.error_response(e)),
        };
        body = Some(bytes);
        id
    } else {
        None
    };
    let target = match conversation {
        // Live here: served here.
        Some(id) if state.registry.peek(&id).is_none() => match relay::route(&cluster, &id).await {
            Ok(Some((_, addr))) => Some(addr),
            Ok(None) => None,
            Err(e) => return Ok(req.error_response(e)),
        },
        _ => None,
    };
    let Some(addr) = target else {
        if let Some(bytes) = body {
            // Read for a look: put back for the handler.
            req.set_payload(actix_web::dev::Payload::from(bytes));
        }
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let body = match body {
        Some(b) => b,
        None => match read_body(&mut req, limit).await {
            Ok(b) => b,
            Err(e) => return Ok(req.error_response(e)),
        },
    };
    let answer = relay::http(cluster.http(), cluster.node(), &addr, req.request(), body).await;
    Ok(match answer {
        Ok(res) => req.into_response(res),
        Err(e) => req.error_response(e),
    })
}

async fn read_body(req: &mut ServiceRequest, limit: usize) -> Result<web::Bytes, ApiError> {
    let mut payload = req.take_payload();
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(ErrorCode::TooLarge, "request body too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The conversation a Responses API request continues, if any (a body that does not parse is
/// left to the handler, which says what is wrong with it).
fn continued(state: &AppState, body: &[u8]) -> Result<Option<ConversationId>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Peek {
        conversation: Option<String>,
        previous_response_id: Option<String>,
    }
    let Ok(peek) = serde_json::from_slice::<Peek>(body) else {
        return Ok(None);
    };
    if let Some(id) = peek.conversation.as_deref().and_then(ConversationId::parse) {
        return Ok(Some(id));
    }
    match peek.previous_response_id {
        Some(prev) => Ok(state.store().response_conversation(&prev)?),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::conversation_of;

    #[test]
    fn paths_name_their_conversation() {
        let id = "conv_0123456789abcdef0123456789abcdef";
        assert!(conversation_of(&format!("/v1/conversations/{id}")).is_some());
        assert!(conversation_of(&format!("/v1/conversations/{id}/messages")).is_some());
        assert!(conversation_of("/v1/conversations").is_none());
        assert!(conversation_of("/v1/conversations/").is_none());
        assert!(conversation_of("/v1/chat/completions").is_none());
    }
}
