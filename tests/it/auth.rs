//! Keys, tenants and development mode (PROTOCOL §3): the admin API, 401s, tenant isolation over
//! REST and WebSocket, per-key model lists, revocation (closing open sockets with 1008).

use crate::common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};

const ADMIN: &str = "adm-test-secret";

async fn get(server: &TestServer, path: &str, key: Option<&str>) -> reqwest::Response {
    with_key(http().get(server.url(path)), key)
        .send()
        .await
        .unwrap()
}

async fn post(
    server: &TestServer,
    path: &str,
    key: Option<&str>,
    body: Value,
) -> reqwest::Response {
    with_key(http().post(server.url(path)), key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn delete(server: &TestServer, path: &str, key: Option<&str>) -> reqwest::Response {
    with_key(http().delete(server.url(path)), key)
        .send()
        .await
        .unwrap()
}

fn unauthorized() -> Value {
    error_body("unauthorized", "missing or invalid API key")
}

#[tokio::test]
async fn admin_creates_and_lists_keys_without_secrets() {
    let server = TestServer::start_with_admin(config_with(None));
    assert_eq!(server.admin_key.as_deref(), Some(ADMIN));
    let body = json!({"tenant": "acme", "rpm": 60, "tpm": 100000, "daily_tokens": 1000000, "models": ["mock"]});
    let resp = post(&server, "/admin/keys", Some(ADMIN), body).await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("pk-") && secret.len() > 20, "{created}");
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["rpm"], 60);
    assert_eq!(created["tpm"], 100000);
    assert_eq!(created["daily_tokens"], 1000000);
    assert_eq!(created["models"], json!(["mock"]));
    let (id2, secret2) = server.create_key(json!({"tenant": "globex"})).await;
    assert_ne!(id, id2);
    assert_ne!(secret, secret2);

    let resp = get(&server, "/admin/keys", Some(ADMIN)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(&secret) && !text.contains(&secret2),
        "a secret is listed: {text}"
    );
    let listed: Value = serde_json::from_str(&text).unwrap();
    let keys = listed["data"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listed}");
    for k in keys {
        assert!(k.get("key").is_none(), "{k}");
        assert!(k.get("hash").is_none() && k.get("secret").is_none(), "{k}");
    }
    let acme = keys
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("created key not listed");
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(acme["models"], json!(["mock"]));
    assert!(keys
        .iter()
        .any(|k| k["id"] == id2.as_str() && k["tenant"] == "globex"));

    // The secret is never shown again, and the key works on /v1.
    assert_eq!(
        get(&server, "/v1/models", Some(&secret)).await.status(),
        200
    );

    // Bad key requests.
    let resp = post(&server, "/admin/keys", Some(ADMIN), json!({"tenant": ""})).await;
    expect_error(resp, 400, "bad_request").await;
    let resp = post(
        &server,
        "/admin/keys",
        Some(ADMIN),
        json!({"tenant": "x", "bogus": 1}),
    )
    .await;
    expect_error(resp, 400, "bad_request").await;
    let resp = post(&server, "/admin/keys", Some(ADMIN), json!({"rpm": 5})).await;
    expect_error(resp, 400, "bad_request").await;
    let resp = delete(&server, "/admin/keys/key_doesnotexist", Some(ADMIN)).await;
    expect_error(resp, 404, "not_found").await;
}

#[tokio::test]
async fn keys_are_required_and_checked() {
    let server = TestServer::start_with_admin(config_with(None));
    let (_, key) = server.create_key(json!({"tenant": "acme"})).await;

    // No key, a bad key, or the admin key on /v1.
    for k in [None, Some("pk-not-a-real-key"), Some("")] {
        assert_eq!(
            expect_error(get(&server, "/v1/models", k).await, 401, "unauthorized").await,
            unauthorized()
        );
        let resp = post(&server, "/v1/conversations", k, json!({"model": "mock"})).await;
        assert_eq!(
            expect_error(resp, 401, "unauthorized").await,
            unauthorized()
        );
        let resp = post(
            &server,
            "/v1/chat/completions",
            k,
            json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(
            expect_error(resp, 401, "unauthorized").await,
            unauthorized()
        );
    }
    expect_error(
        get(&server, "/v1/models", Some(ADMIN)).await,
        401,
        "unauthorized",
    )
    .await;
    let resp = post(
        &server,
        "/v1/conversations",
        Some(ADMIN),
        json!({"model": "mock"}),
    )
    .await;
    expect_error(resp, 401, "unauthorized").await;
    let resp = with_key(http().get(server.url("/v1/models")), None)
        .header("authorization", "Basic YWRtOng=")
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;

    // WebSockets, with a header or `?access_token=`.
    let err = Ws::try_connect(&server, None)
        .await
        .err()
        .expect("keyless socket accepted");
    assert!(err.to_string().contains("401"), "{err}");
    let err = Ws::try_connect(&server, Some(ADMIN))
        .await
        .err()
        .expect("admin-key socket accepted");
    assert!(err.to_string().contains("401"), "{err}");
    let err =
        tokio_tungstenite::connect_async(format!("{}?access_token=pk-bogus", server.ws_url()))
            .await
            .expect_err("bad token accepted");
    assert!(err.to_string().contains("401"), "{err}");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}?access_token={key}", server.ws_url()))
            .await
            .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"type": "create", "client_id": "c", "model": "mock"}).to_string(),
    ))
    .await
    .unwrap();
    let mut ws = Ws { stream: ws };
    assert_eq!(ws.recv().await["type"], "created");

    // /admin needs the admin key: a tenant key or no key is refused.
    for k in [None, Some(key.as_str()), Some("adm-test-secre")] {
        assert_eq!(
            expect_error(get(&server, "/admin/keys", k).await, 401, "unauthorized").await,
            unauthorized()
        );
        let resp = post(&server, "/admin/keys", k, json!({"tenant": "evil"})).await;
        expect_error(resp, 401, "unauthorized").await;
        expect_error(
            delete(&server, "/admin/keys/key_x", k).await,
            401,
            "unauthorized",
        )
        .await;
    }
    // Nothing was created by the refused requests.
    let listed: Value = get(&server, "/admin/keys", Some(ADMIN))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");

    // Health and metrics need no key.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&server, path, None).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn tenants_cannot_see_each_others_conversations() {
    let server = TestServer::start_with_admin(config_with(None));
    let (_, a) = server.create_key(json!({"tenant": "tenant-a"})).await;
    let (_, b) = server.create_key(json!({"tenant": "tenant-b"})).await;
    let (_, a2) = server.create_key(json!({"tenant": "tenant-a"})).await;

    let secrets = [
        "alpha-system-secret",
        "alpha-meta-secret",
        "alpha-user-secret",
    ];
    let conv = create_conversation(
        &server,
        Some(&a),
        json!({"model": "mock", "system": secrets[0], "metadata": {"note": secrets[1]}}),
    )
    .await;
    let path = format!("/v1/conversations/{conv}");
    let resp = post(
        &server,
        &format!("{path}/messages"),
        Some(&a),
        json!({"content": format!("{} [[mock:words=5]]", secrets[2])}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    let reply_text = reply["message"]["content"].as_str().unwrap().to_owned();

    // What B gets for A's conversation is exactly what anyone gets for no conversation.
    let gone = create_conversation(&server, Some(&b), json!({"model": "mock"})).await;
    assert_eq!(
        delete(&server, &format!("/v1/conversations/{gone}"), Some(&b))
            .await
            .status(),
        204
    );
    let nothing = expect_error(
        get(&server, &format!("/v1/conversations/{gone}"), Some(&b)).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(nothing, error_body("not_found", "conversation not found"));

    let mut bodies = Vec::new();
    bodies.push(expect_error(get(&server, &path, Some(&b)).await, 404, "not_found").await);
    bodies.push(
        expect_error(
            get(&server, &format!("{path}/messages"), Some(&b)).await,
            404,
            "not_found",
        )
        .await,
    );
    let resp = post(
        &server,
        &format!("{path}/messages"),
        Some(&b),
        json!({"content": "hijack", "client_id": "b1"}),
    )
    .await;
    bodies.push(expect_error(resp, 404, "not_found").await);
    let resp = post(
        &server,
        &format!("{path}/messages"),
        Some(&b),
        json!({"content": "hijack", "stream": true}),
    )
    .await;
    bodies.push(expect_error(resp, 404, "not_found").await);
    bodies.push(
        expect_error(
            post(&server, &format!("{path}/cancel"), Some(&b), json!({})).await,
            404,
            "not_found",
        )
        .await,
    );
    bodies.push(expect_error(delete(&server, &path, Some(&b)).await, 404, "not_found").await);
    for body in &bodies {
        assert_eq!(body, &nothing);
    }

    // Over WebSocket: subscribe and user_message are `not_found`, and no traffic of A's leaks.
    let mut ws = Ws::connect(&server, Some(&b)).await;
    ws.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    let f = ws.recv().await;
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], "not_found", "{f}");
    assert_eq!(f["conversation"], conv.as_str(), "{f}");
    let mut seen = vec![f];
    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "b2", "content": "hijack"})).await;
    let f = ws.recv().await;
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], "not_found", "{f}");
    assert_eq!(f["client_id"], "b2", "{f}");
    seen.push(f);

    // A's next turn, while B's socket is open: B's socket sees none of it.
    let resp = post(
        &server,
        &format!("{path}/messages"),
        Some(&a),
        json!({"content": "second [[mock:words=3]]"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    ws.send(json!({"type": "create", "client_id": "b-probe", "model": "mock"}))
        .await;
    let f = ws.recv().await;
    assert_eq!(
        f["type"], "created",
        "B's socket got something before its own answer: {f}"
    );
    seen.push(f);

    let leaked = serde_json::to_string(&(bodies, seen)).unwrap();
    for s in secrets.iter().copied().chain([reply_text.as_str()]) {
        assert!(!leaked.contains(s), "{s:?} leaked to tenant B: {leaked}");
    }

    // A's conversation is intact, and any key of tenant A reaches it.
    let stored = messages(&server, Some(&a2), &conv).await;
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[1]["content"], reply_text.as_str());
    let got: Value = get(&server, &path, Some(&a)).await.json().await.unwrap();
    assert_eq!(got["metadata"]["note"], secrets[1]);
    assert_eq!(got["last_seq"], 4);
}

#[tokio::test]
async fn a_key_limited_to_models() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start_with_admin(config_with(Some(&up)));
    let (_, key) = server
        .create_key(json!({"tenant": "narrow", "models": ["mock"]}))
        .await;
    let forbidden_up = error_body("forbidden", "this key may not use model \"up\"");

    let resp = post(
        &server,
        "/v1/conversations",
        Some(&key),
        json!({"model": "up"}),
    )
    .await;
    assert_eq!(expect_error(resp, 403, "forbidden").await, forbidden_up);
    // No model means the route `default`, which this key may not use either.
    let resp = post(&server, "/v1/conversations", Some(&key), json!({})).await;
    expect_error(resp, 403, "forbidden").await;
    let resp = post(
        &server,
        "/v1/chat/completions",
        Some(&key),
        json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(expect_error(resp, 403, "forbidden").await, forbidden_up);

    // An allowed conversation cannot switch to a forbidden route for one turn.
    let conv = create_conversation(&server, Some(&key), json!({"model": "mock"})).await;
    let resp = post(
        &server,
        &format!("/v1/conversations/{conv}/messages"),
        Some(&key),
        json!({"content": "hi", "options": {"model": "up"}}),
    )
    .await;
    assert_eq!(expect_error(resp, 403, "forbidden").await, forbidden_up);
    assert!(messages(&server, Some(&key), &conv).await.is_empty());
    let resp = post(
        &server,
        &format!("/v1/conversations/{conv}/messages"),
        Some(&key),
        json!({"content": "hi [[mock:words=2]]"}),
    )
    .await;
    assert_eq!(resp.status(), 200);

    let mut ws = Ws::connect(&server, Some(&key)).await;
    ws.send(json!({"type": "create", "client_id": "c-up", "model": "up"}))
        .await;
    let f = ws.recv().await;
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], "forbidden", "{f}");
    assert_eq!(f["client_id"], "c-up", "{f}");

    let v: Value = get(&server, "/v1/models", Some(&key))
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock"]);
    assert_eq!(up.requests(), 0);

    // An unrestricted key sees every route.
    let (_, open) = server.create_key(json!({"tenant": "wide"})).await;
    let v: Value = get(&server, "/v1/models", Some(&open))
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"mock") && ids.contains(&"up"), "{ids:?}");
}

#[tokio::test]
async fn revoking_a_key_takes_effect_at_once() {
    let server = TestServer::start_with_admin(config_with(None));
    let (id, key) = server.create_key(json!({"tenant": "shortlived"})).await;
    let (_, other) = server.create_key(json!({"tenant": "shortlived"})).await;
    assert_eq!(get(&server, "/v1/models", Some(&key)).await.status(), 200);

    let mut ws = Ws::connect(&server, Some(&key)).await;
    let conv = ws.create("mock").await;
    let mut bystander = Ws::connect(&server, Some(&other)).await;
    bystander
        .send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(bystander.recv().await["type"], "subscribed");

    let resp = delete(&server, &format!("/admin/keys/{id}"), Some(ADMIN)).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(ws.close_code(TIMEOUT).await, Some(1008));

    assert_eq!(
        expect_error(
            get(&server, "/v1/models", Some(&key)).await,
            401,
            "unauthorized"
        )
        .await,
        unauthorized()
    );
    let resp = get(&server, &format!("/v1/conversations/{conv}"), Some(&key)).await;
    expect_error(resp, 401, "unauthorized").await;
    let err = Ws::try_connect(&server, Some(&key))
        .await
        .err()
        .expect("revoked key opened a socket");
    assert!(err.to_string().contains("401"), "{err}");
    let listed: Value = get(&server, "/admin/keys", Some(ADMIN))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["id"] != id.as_str()),
        "{listed}"
    );
    expect_error(
        delete(&server, &format!("/admin/keys/{id}"), Some(ADMIN)).await,
        404,
        "not_found",
    )
    .await;

    // Other keys of the tenant, and their sockets, are untouched; the tenant's data stays.
    assert_eq!(
        get(&server, &format!("/v1/conversations/{conv}"), Some(&other))
            .await
            .status(),
        200
    );
    bystander
        .send(json!({"type": "create", "client_id": "still-here", "model": "mock"}))
        .await;
    assert_eq!(bystander.recv().await["type"], "created");
}

#[tokio::test]
async fn development_mode_serves_keyless_requests_as_local() {
    let server = TestServer::start(config_with(None));
    assert_eq!(get(&server, "/v1/models", None).await.status(), 200);
    let conv = create_conversation(&server, None, json!({"model": "mock"})).await;
    let resp = post(
        &server,
        &format!("/v1/conversations/{conv}/messages"),
        None,
        json!({"content": "hi [[mock:words=2]]"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut ws = Ws::connect(&server, None).await;
    ws.send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 2})
    );

    // Keyless admin works in development mode; a key of tenant `local` sees the keyless data,
    // a key of another tenant does not.
    let (_, local) = server.create_key(json!({"tenant": "local"})).await;
    let (_, other) = server.create_key(json!({"tenant": "someone-else"})).await;
    assert_eq!(messages(&server, Some(&local), &conv).await.len(), 2);
    let resp = get(&server, &format!("/v1/conversations/{conv}"), Some(&other)).await;
    expect_error(resp, 404, "not_found").await;
    let theirs = create_conversation(&server, Some(&other), json!({"model": "mock"})).await;
    expect_error(
        get(&server, &format!("/v1/conversations/{theirs}"), None).await,
        404,
        "not_found",
    )
    .await;

    // SDKs insist on sending some key: an unknown one acts as `local` too, never as another
    // tenant, so `local`'s conversation is visible and the other tenant's is not.
    let resp = get(
        &server,
        &format!("/v1/conversations/{conv}"),
        Some("sk-anything"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    expect_error(
        get(
            &server,
            &format!("/v1/conversations/{theirs}"),
            Some("sk-anything"),
        )
        .await,
        404,
        "not_found",
    )
    .await;
}

/// Revoking a key stops the work it started: its streaming turn is cancelled (a bystander on
/// the conversation sees `done` with `cancelled`, and the partial reply is stored).
#[tokio::test]
async fn revoking_a_key_cancels_its_running_turn() {
    let server = TestServer::start_with_admin(config_with(None));
    let (id, key) = server.create_key(json!({"tenant": "t"})).await;
    let (_, other) = server.create_key(json!({"tenant": "t"})).await;
    let mut ws = Ws::connect(&server, Some(&key)).await;
    let conv = ws.create("mock").await;
    let mut bystander = Ws::connect(&server, Some(&other)).await;
    bystander
        .send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(bystander.recv().await["type"], "subscribed");
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "long",
                   "content": "tell me everything [[mock:words=2000,tps=20]]"}),
    )
    .await;
    bystander.recv_until(|f| f["type"] == "delta").await;
    let resp = delete(&server, &format!("/admin/keys/{id}"), Some(ADMIN)).await;
    assert_eq!(resp.status(), 204);
    let frames = bystander.recv_until(|f| f["type"] == "done").await;
    let done = frames.last().unwrap();
    assert_eq!(done["finish_reason"], "cancelled", "{done}");
    let stored = messages(&server, Some(&other), &conv).await;
    assert_eq!(stored[1]["finish_reason"], "cancelled");
}
