//! `GET /v1/ws`: authenticates (header or `?access_token=`), then hands the socket to a
//! [`WsSession`] with the configured maximum frame size.

mod commands;
pub mod frames;
mod hub;
mod session;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

pub use hub::{SocketHub, CLOSE_GOING_AWAY, CLOSE_REVOKED};
pub use session::{WsSession, CLIENT_TIMEOUT, PING_INTERVAL};

use super::auth::{access_token, bearer};
use super::AppState;
use crate::error::ApiError;

pub async fn connect(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let query_token = access_token(&req);
    let token = bearer(&req).map(str::to_owned).or(query_token);
    let principal = state.auth.client(token.as_deref())?;
    let max_frame = state.config.server.max_frame_bytes;
    // Cluster mode relays the socket's frames for conversations other nodes run, as this client.
    let token = state
        .cluster()
        .and(token)
        .map(|t| std::sync::Arc::new(secrecy::SecretString::from(t)));
    let session = WsSession::new(state.clone(), principal, token, max_frame);
    ws::WsResponseBuilder::new(session, &req, payload)
        .frame_size(max_frame)
        .start()
        .map_err(|e| ApiError::bad_request(format!("websocket upgrade failed: {e}")).into())
}
