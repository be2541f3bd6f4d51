//! Cluster mode: a request about a conversation another node runs is relayed there whole
//! (`/v1/conversations/{id}` and everything under it); see `cluster::relay`.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;

use super::AppState;
use crate::cluster::relay::{self, RELAYED};
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
    let target = match (
        req.app_data::<web::Data<AppState>>(),
        conversation_of(req.path()),
    ) {
        (Some(state), Some(id)) if !req.headers().contains_key(RELAYED) => {
            match (state.cluster(), state.registry.peek(&id)) {
                // Live here: served here.
                (Some(cluster), None) => {
                    let cluster = cluster.clone();
                    match relay::route(&cluster, &id).await {
                        Ok(Some((_, addr))) => Some((cluster, addr)),
                        Ok(None) => None,
                        Err(e) => return Ok(req.error_response(e)),
                    }
                }
                _ => None,
            }
        }
        _ => None,
    };
    let Some((cluster, addr)) = target else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let limit = req
        .app_data::<web::Data<AppState>>()
        .map_or(1 << 20, |s| s.config.server.max_frame_bytes);
    let body = match req.extract::<web::Bytes>().await {
        Ok(b) if b.len() <= limit => b,
        Ok(_) => {
            return Ok(req.error_response(crate::error::ApiError::new(
                crate::error::ErrorCode::TooLarge,
                "request body too large",
            )))
        }
        Err(e) => return Ok(req.error_response(e)),
    };
    let answer = relay::http(cluster.http(), cluster.node(), &addr, req.request(), body).await;
    Ok(match answer {
        Ok(res) => req.into_response(res),
        Err(e) => req.error_response(e),
    })
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
