//! Async jobs (PROTOCOL §10) against the real server and mock upstream.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{
    config_with, create_conversation, http, mock_reply, wait_until, Behaviour, BinServer,
    MockUpstream, TestServer,
};

async fn submit(url: String, body: Value) -> (u16, Value) {
    let resp = http().post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn job(url: String) -> Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls a job until it has ended; answers it.
pub async fn ended(base: &str, id: &str) -> Value {
    let url = format!("{base}/v1/jobs/{id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let j = job(url.clone()).await;
        if matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return j;
        }
        assert!(std::time::Instant::now() < deadline, "job never ended: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_chat_job_and_a_turn_job_run_and_are_listed() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let base = format!("http://{}", server.addr);
    let (status, accepted) = submit(
        server.url("/v1/jobs"),
        json!({"request": {"model": "up", "messages": [{"role": "user", "content": "summarise later"}]}, "metadata": {"batch": "a"}}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "queued");
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("job_"));
    let done = ended(&base, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["choices"][0]["message"]["content"],
        mock_reply(0, &[("user", "summarise later")]).as_str()
    );
    assert_eq!(done["metadata"]["batch"], "a");
    assert_eq!(done["attempts"], 1);

    let conv = create_conversation(&server, None, json!({"model": "up"})).await;
    let (status, accepted) = submit(
        server.url("/v1/jobs"),
        json!({"conversation": conv, "content": "answer by job", "client_id": "j1"}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let turn = ended(&base, accepted["id"].as_str().unwrap()).await;
    assert_eq!(turn["status"], "succeeded", "{turn}");
    assert_eq!(turn["result"]["message"]["seq"], 2);
    let stored = crate::common::messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["client_id"], "j1");

    let list = job(server.url("/v1/jobs?status=succeeded")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let none = job(server.url("/v1/jobs?status=queued")).await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn bad_jobs_are_refused_before_they_are_stored() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    for (body, needle) in [
        (json!({}), "required"),
        (
            json!({"request": {"model": "up", "messages": []}, "conversation": "x"}),
            "not both",
        ),
        (
            json!({"request": {"model": "up", "messages": [], "stream": true}}),
            "stream",
        ),
        (json!({"request": {"model": "up"}}), "request"),
        (
            json!({"request": {"model": "up", "messages": []}, "content": "x", "client_id": "c"}),
            "belong to a conversation turn",
        ),
        (
            json!({"conversation": "conv_0123456789abcdef0123456789abcdef", "content": "x", "client_id": "c"}),
            "conversation",
        ),
        (
            json!({"request": {"model": "up", "messages": []}, "webhook": {"url": "https://example.com/hook"}}),
            "webhook",
        ),
    ] {
        let (status, v) = submit(server.url("/v1/jobs"), body.clone()).await;
        assert!(status == 400 || status == 404, "{body}: {status} {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    let resp = http()
        .post(server.url("/v1/jobs"))
        .header("x-parley-tier", "strong")
        .json(&json!({"request": {"model": "up", "messages": [{"role": "user", "content": "hi"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        400,
        "a tier header on a job is refused, not dropped"
    );
    for query in ["status=nope", "limit=5", "after=job_x"] {
        let resp = http()
            .get(server.url(&format!("/v1/jobs?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{query}");
    }
    let resp = http()
        .get(server.url("/v1/jobs/job_nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let list = job(server.url("/v1/jobs")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
}

/// A server with one job worker before an upstream that waits `ttft_ms` before answering.
fn one_slow_worker(ttft_ms: u64) -> (MockUpstream, TestServer, String) {
    let up = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_millis(ttft_ms),
        ..Behaviour::default()
    })
    .unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.jobs.workers = 1;
    let server = TestServer::start(cfg);
    let base = format!("http://{}", server.addr);
    (up, server, base)
}

#[tokio::test]
async fn queued_and_running_jobs_can_be_cancelled() {
    let (up, server, base) = one_slow_worker(1_500);
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, v) = submit(
            server.url("/v1/jobs"),
            json!({"request": {"model": "up", "messages": [{"role": "user", "content": format!("slow {i}")}]}}),
        )
        .await;
        assert_eq!(status, 202);
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // One worker: the first runs, the others wait.
    let first_url = format!("{base}/v1/jobs/{}", ids[0]);
    assert!(wait_until(Duration::from_secs(5), || up.requests() >= 1).await);
    assert_eq!(job(first_url.clone()).await["status"], "running");
    let resp = http()
        .delete(format!("{base}/v1/jobs/{}", ids[2]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    let resp = http().delete(first_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(ended(&base, &ids[0]).await["status"], "cancelled");
    assert_eq!(ended(&base, &ids[1]).await["status"], "succeeded");
    assert_eq!(ended(&base, &ids[2]).await["status"], "cancelled");
    // The cancelled queued job never reached the upstream.
    assert_eq!(up.requests(), 2);
    let resp = http()
        .delete(format!("{base}/v1/jobs/{}", ids[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "an ended job cannot be cancelled");
}

#[tokio::test]
async fn jobs_survive_kill_9_and_run_once_to_completion() {
    let up = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_millis(30),
        ..Behaviour::default()
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "[jobs]\nworkers = 2\n\n[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[routes]]\nmodel = \"up\"\ntargets = [{{ provider = \"up\", model = \"mock-1\" }}]\n",
        up.base_url()
    );
    let mut bin = BinServer::start(&config, tmp.path(), &[]);
    let mut ids = Vec::new();
    for i in 0..200 {
        let (status, v) = submit(
            bin.url("/v1/jobs"),
            json!({"request": {"model": "up", "messages": [{"role": "user", "content": format!("job {i}")}]}}),
        )
        .await;
        assert_eq!(status, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert!(wait_until(Duration::from_secs(20), || up.requests() >= 20).await);
    bin.kill9();
    // What had succeeded before the kill.
    let before = up.requests();
    let bin = BinServer::start(&config, tmp.path(), &[]);
    let base = format!("http://{}", bin.addr);
    let mut succeeded = 0;
    let mut reruns = 0;
    for (i, id) in ids.iter().enumerate() {
        let j = ended(&base, id).await;
        assert_eq!(j["status"], "succeeded", "{j}");
        assert_eq!(
            j["result"]["choices"][0]["message"]["content"],
            mock_reply(0, &[("user", &format!("job {i}"))]).as_str()
        );
        succeeded += 1;
        if j["attempts"].as_u64().unwrap() > 1 {
            reruns += 1;
        }
    }
    assert_eq!(succeeded, 200);
    // Only the jobs running at the kill (at most the two workers') ran again.
    assert!(reruns <= 2, "{reruns} jobs ran again");
    assert!(
        up.requests() <= 200 + 2,
        "{} upstream calls for 200 jobs",
        up.requests()
    );
    assert!(before >= 20);
}

/// One webhook request as received.
#[derive(Debug, Clone)]
struct Received {
    headers: std::collections::HashMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver on loopback answering `statuses` in turn (then 200), recording every
/// request.
async fn receiver(
    statuses: Vec<u16>,
) -> (String, std::sync::Arc<parking_lot::Mutex<Vec<Received>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let mut headers = std::collections::HashMap::new();
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).await.unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).await.unwrap();
            log.lock().push(Received { headers, body });
            let status = statuses.get(n).copied().unwrap_or(200);
            n += 1;
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = reader.into_inner().write_all(reply.as_bytes()).await;
        }
    });
    (url, seen)
}

/// The Standard Webhooks signature computed by an independent implementation (Python's
/// standard library), from the secret as shown.
fn python_signature(secret: &str, id: &str, ts: &str, body: &[u8]) -> String {
    use std::io::Write;
    let script = "import base64,hashlib,hmac,sys\n\
        key = base64.b64decode(sys.argv[1].split('_', 1)[1])\n\
        msg = ('%s.%s.' % (sys.argv[2], sys.argv[3])).encode() + sys.stdin.buffer.read()\n\
        print('v1,' + base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode())\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, secret, id, ts])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_webhook_failing_twice_is_delivered_three_times_with_one_id() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.jobs.allow_private_webhooks = true;
    let server = TestServer::start(cfg);
    let base = format!("http://{}", server.addr);
    let (url, seen) = receiver(vec![500, 503]).await;
    // No secret yet: refused.
    let body = json!({"request": {"model": "up", "messages": [{"role": "user", "content": "tell me when"}]}, "webhook": {"url": url}});
    let (status, v) = submit(server.url("/v1/jobs"), body.clone()).await;
    assert_eq!(status, 400, "{v}");
    let (status, secret) = submit(
        server.url("/admin/webhook-secrets"),
        json!({"tenant": "local"}),
    )
    .await;
    assert_eq!(status, 201, "{secret}");
    let secret = secret["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let (status, v) = submit(server.url("/v1/jobs"), body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(ended(&base, &id).await["status"], "succeeded");
    assert!(
        wait_until(Duration::from_secs(15), || seen.lock().len() >= 3).await,
        "three deliveries expected"
    );
    let got = seen.lock().clone();
    let ids: std::collections::HashSet<_> = got
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert_eq!(ids.len(), 1, "one webhook-id on every attempt");
    for r in &got {
        let h = &r.headers;
        assert_eq!(
            h["webhook-signature"],
            python_signature(&secret, &h["webhook-id"], &h["webhook-timestamp"], &r.body)
        );
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(payload["type"], "job.succeeded");
        assert_eq!(payload["data"]["id"], id.as_str());
    }
    // The attempts are on the job: two failures, then the 2xx.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let job = loop {
        let j = job(format!("{base}/v1/jobs/{id}")).await;
        if j["deliveries"].as_array().is_some_and(|d| d.len() == 3) {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let codes: Vec<u64> = job["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [500, 503, 200]);
    // Rotating the secret changes what later deliveries are signed with.
    let (_, rotated) = submit(
        server.url("/admin/webhook-secrets"),
        json!({"tenant": "local"}),
    )
    .await;
    assert_ne!(rotated["secret"], secret.as_str());
}

#[tokio::test]
async fn webhooks_to_local_addresses_are_refused() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let (status, _) = submit(
        server.url("/admin/webhook-secrets"),
        json!({"tenant": "local"}),
    )
    .await;
    assert_eq!(status, 201);
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "ftp://example.com/hook",
        "not a url",
    ] {
        let (status, v) = submit(
            server.url("/v1/jobs"),
            json!({"request": {"model": "up", "messages": [{"role": "user", "content": "x"}]}, "webhook": {"url": url}}),
        )
        .await;
        assert_eq!(status, 400, "{url}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("webhook.url"),
            "{v}"
        );
    }
}

/// Uploads `content` as a batch input file (multipart written by hand); answers its id.
async fn upload(base: &str, content: &str) -> String {
    let boundary = "parleyboundary7MA4YWxkTrZu0gW";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let v: Value = http()
        .post(format!("{base}/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned()
}

#[tokio::test]
async fn a_cancelled_batch_ends_cancelled_with_what_finished() {
    let (up, _server, base) = one_slow_worker(1_000);
    let lines: Vec<String> = (0..5)
        .map(|i| json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions", "body": {"model": "up", "messages": [{"role": "user", "content": format!("slow {i}")}]}}).to_string())
        .collect();
    let file = upload(&base, &lines.join("\n")).await;
    let content = http()
        .get(format!("{base}/v1/files/{file}/content"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(content, lines.join("\n"));
    let (status, batch) = submit(
        format!("{base}/v1/batches"),
        json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["status"], "in_progress");
    let id = batch["id"].as_str().unwrap().to_owned();
    assert!(wait_until(Duration::from_secs(5), || up.requests() >= 1).await);
    let (status, cancelling) = submit(format!("{base}/v1/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{cancelling}");
    assert!(
        matches!(
            cancelling["status"].as_str(),
            Some("cancelling" | "cancelled")
        ),
        "{cancelling}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let done = loop {
        let b = job(format!("{base}/v1/batches/{id}")).await;
        if b["status"] == "cancelled" {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Nothing after the one that was running reached the upstream.
    assert_eq!(up.requests(), 1);
    assert_eq!(done["request_counts"]["total"], 5);
    assert_eq!(
        done["request_counts"]["completed"].as_u64().unwrap()
            + done["request_counts"]["failed"].as_u64().unwrap(),
        5
    );
    let errors = http()
        .get(format!(
            "{base}/v1/files/{}/content",
            done["error_file_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(errors.lines().count() >= 4, "{errors}");
    // Bad requests to the API itself.
    let (status, _) = submit(
        format!("{base}/v1/batches"),
        json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = submit(format!("{base}/v1/batches"), json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(status, 404);
}

/// A batch that outlives its completion window expires: what finished stays in its output, the
/// requests not yet run never reach the upstream and are reported as `batch_expired`. Nobody
/// asks about the batch while it expires: its worker finds it past its deadline.
#[tokio::test]
async fn a_batch_past_its_window_expires_and_runs_nothing_more() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.jobs.workers = 1;
    cfg.jobs.batch_window_secs = 2;
    let server = TestServer::start(cfg);
    let base = format!("http://{}", server.addr);
    let asks = [
        "a quick one",
        "a slow one [[mock:ttft_ms=3000]]",
        "a late one",
        "another late one",
    ];
    let lines: Vec<String> = asks
        .iter()
        .enumerate()
        .map(|(i, ask)| json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions", "body": {"model": "up", "messages": [{"role": "user", "content": ask}]}}).to_string())
        .collect();
    let file = upload(&base, &lines.join("\n")).await;
    let (status, batch) = submit(
        format!("{base}/v1/batches"),
        json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    // The window in whole seconds, never shorter than asked.
    let window = batch["expires_at"].as_i64().unwrap() - batch["created_at"].as_i64().unwrap();
    assert!((2..=3).contains(&window), "{batch}");
    assert_eq!(batch["expired_at"], Value::Null);

    // The slow request ends after the deadline; then the worker finds the batch expired and
    // the two requests left are cancelled without running.
    let cancelled = format!("{base}/v1/jobs?status=cancelled");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let n = job(cancelled.clone()).await["data"]
            .as_array()
            .map_or(0, Vec::len);
        if n == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.requests(), 2);

    let done = job(format!("{base}/v1/batches/{id}")).await;
    assert_eq!(done["status"], "expired", "{done}");
    assert!(done["expired_at"].as_i64().is_some(), "{done}");
    assert_eq!(done["request_counts"]["total"], 4, "{done}");
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    assert_eq!(done["request_counts"]["failed"], 2, "{done}");
    let content = |file: &Value| {
        let url = format!("{base}/v1/files/{}/content", file.as_str().unwrap());
        async move { http().get(url).send().await.unwrap().text().await.unwrap() }
    };
    let output = content(&done["output_file_id"]).await;
    let ids: Vec<String> = output
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, ["c0", "c1"], "{output}");
    let errors = content(&done["error_file_id"]).await;
    let expired: Vec<(String, String)> = errors
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["custom_id"].as_str().unwrap().to_owned(),
                v["error"]["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        expired,
        [
            ("c2".to_owned(), "batch_expired".to_owned()),
            ("c3".to_owned(), "batch_expired".to_owned())
        ],
        "{errors}"
    );
}
