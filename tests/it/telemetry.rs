//! OpenTelemetry export and structured logs, against the built binary: an OTLP/HTTP receiver in
//! the test decodes what `parley serve` exports and checks the spans of a request that fell
//! back from a failing target to a healthy one, then of the same request served from the cache
//! (GenAI semantic-convention attributes, the caller's `traceparent`, fallback and cache-hit
//! events, no message content); and `log_format = "json"` writes JSON lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;

/// A minimal OTLP/HTTP receiver: every `POST /v1/traces` body, decoded.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let sink = sink.clone();
                std::thread::spawn(move || serve(conn, &sink));
            }
        });
        Self { port, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// One keep-alive connection: requests with a `content-length`, each answered 200.
fn serve(conn: std::net::TcpStream, sink: &Mutex<Vec<Span>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if first {
                assert!(line.starts_with("POST /v1/traces"), "{line}");
                first = false;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                sink.lock().unwrap().extend(ss.spans);
            }
        }
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    find(&span.attributes, key)
}

fn find<'a>(
    attributes: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<&'a Any> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        Any::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Any::IntValue(i)) => *i,
        other => panic!("{key}: {other:?} in {}", span.name),
    }
}

#[tokio::test]
async fn a_fallback_and_a_cache_hit_are_traced_with_genai_attributes() {
    let bad = MockUpstream::spawn(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    })
    .unwrap();
    let good = MockUpstream::spawn(Behaviour::default()).unwrap();
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\n\n[retry]\nmax_retries = 0\n\n\
         [[providers]]\nname = \"bad\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[providers]]\nname = \"good\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[routes]]\nmodel = \"fb\"\ntargets = [{{ provider = \"bad\", model = \"m-bad\" }}, {{ provider = \"good\", model = \"m-good\" }}]\n",
        receiver.port,
        bad.base_url(),
        good.base_url()
    );
    let server = BinServer::start(&config, dir.path(), &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body =
        json!({"model": "fb", "messages": [{"role": "user", "content": "what is a fjord?"}]});
    for _ in 0..2 {
        let resp = http()
            .post(server.url("/v1/chat/completions"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // A conversation turn over REST, in the same trace: the turn runs on its conversation's
    // actor, and its span still descends from the request's.
    let traced = |req: reqwest::RequestBuilder| {
        req.header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
    };
    let conv: serde_json::Value = traced(http().post(server.url("/v1/conversations")))
        .json(&json!({"model": "fb"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv = conv["id"].as_str().unwrap().to_owned();
    let resp = traced(http().post(server.url(&format!("/v1/conversations/{conv}/messages"))))
        .json(&json!({"content": "and what is a skerry?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Every request's spans arrive (the exporter sends every 100 ms).
    let chats = |spans: &[Span]| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| s.name == "chat fb")
            .cloned()
            .collect()
    };
    let ok = wait_until(Duration::from_secs(15), || {
        let spans = receiver.spans();
        chats(&spans).len() >= 3
            && spans.iter().any(|s| s.name == "turn")
            && spans
                .iter()
                .filter(|s| s.name.starts_with("chat m-"))
                .count()
                >= 2
    })
    .await;
    let spans = receiver.spans();
    assert!(
        ok,
        "spans: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // Everything is in the caller's trace.
    let want_trace = hex::decode(trace_id).unwrap();
    for s in &spans {
        assert_eq!(
            s.trace_id, want_trace,
            "{} is not in the caller's trace",
            s.name
        );
    }
    let https: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "POST /v1/chat/completions")
        .collect();
    assert_eq!(https.len(), 2);
    for h in &https {
        assert_eq!(h.parent_span_id, hex::decode("00f067aa0ba902b7").unwrap());
        assert_eq!(text(h, "http.response.status_code").as_deref(), Some("200"));
    }

    let mut chats = chats(&spans);
    chats.sort_by_key(|s| s.start_time_unix_nano);
    let (first, second, turned) = (&chats[0], &chats[1], &chats[2]);
    // The turn's generation: its span is a child of the turn's, the turn's of the request's.
    let turn = spans.iter().find(|s| s.name == "turn").unwrap();
    assert_eq!(turned.parent_span_id, turn.span_id);
    let posted = spans
        .iter()
        .find(|s| s.span_id == turn.parent_span_id)
        .expect("the turn's parent span");
    assert_eq!(posted.name, "POST /v1/conversations/{id}/messages");
    assert_eq!(
        text(turned, "gen_ai.conversation.id").as_deref(),
        Some(conv.as_str())
    );
    assert_eq!(
        text(turned, "gen_ai.response.model").as_deref(),
        Some("m-good")
    );
    for c in [first, second] {
        assert_eq!(text(c, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(text(c, "gen_ai.request.model").as_deref(), Some("fb"));
        assert_eq!(text(c, "gen_ai.provider.name").as_deref(), Some("good"));
        assert_eq!(text(c, "gen_ai.response.model").as_deref(), Some("m-good"));
        assert!(int(c, "gen_ai.usage.input_tokens") > 0);
        assert!(int(c, "gen_ai.usage.output_tokens") > 0);
        assert_eq!(
            text(c, "gen_ai.response.finish_reasons").as_deref(),
            Some("[\"stop\"]")
        );
        assert!(https.iter().any(|h| h.span_id == c.parent_span_id));
        // No content without `capture_content`.
        assert!(attr(c, "gen_ai.input.messages").is_none());
        assert!(attr(c, "gen_ai.output.messages").is_none());
        assert!(!c.events.iter().any(|e| e.name.starts_with("gen_ai.")));
    }
    // Nor anywhere else: no span's attributes or events carry the question.
    for s in &spans {
        let all = format!("{:?} {:?}", s.attributes, s.events);
        assert!(!all.contains("fjord"), "content in {}: {all}", s.name);
    }
    // The first fell back: one failed attempt on `bad`, one on `good`, and the event between.
    let attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == first.span_id && s.name.starts_with("chat m-"))
        .collect();
    let bad_try = attempts
        .iter()
        .find(|s| s.name == "chat m-bad")
        .expect("attempt on bad");
    assert_eq!(
        text(bad_try, "gen_ai.provider.name").as_deref(),
        Some("bad")
    );
    assert_eq!(text(bad_try, "error.type").as_deref(), Some("500"));
    let good_try = attempts
        .iter()
        .find(|s| s.name == "chat m-good")
        .expect("attempt on good");
    assert!(attr(good_try, "error.type").is_none());
    assert!(
        first
            .events
            .iter()
            .any(|e| e.name.contains("trying the next")),
        "fallback event: {:?}",
        first.events
    );
    assert_eq!(text(first, "parley.cached").as_deref(), Some("false"));
    // The second came from the cache: no attempt, a cache-hit event.
    assert_eq!(text(second, "parley.cached").as_deref(), Some("true"));
    assert!(
        second.events.iter().any(|e| e.name == "cache_hit"),
        "{:?}",
        second.events
    );
    assert!(!spans
        .iter()
        .any(|s| s.parent_span_id == second.span_id && s.name.starts_with("chat m-")));

    // The GenAI histograms are on /metrics, Prometheus-named.
    let metrics = http()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "gen_ai_client_operation_duration_seconds_bucket",
        "gen_ai_client_token_usage_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)
                && l.contains("gen_ai_request_model=\"fb\"")
                && l.contains("gen_ai_provider_name=\"good\"")),
            "{name} missing"
        );
    }
    assert!(metrics.contains("gen_ai_token_type=\"output\""));
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("parley.toml");
    std::fs::write(&cfg, "[telemetry]\nlog_format = \"json\"\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env_remove("PARLEY_CONFIG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let listening = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("no log line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        seen.push(v.clone());
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on"))
        {
            break v;
        }
    };
    assert_eq!(listening["level"], "INFO");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_reads_is_exported() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/parley.json")).unwrap();
    let mut cfg = config_with(None);
    // A low similarity bar, so a question one word away is a candidate its guard refuses.
    cfg.cache.min_similarity = 0.5;
    let mut auto = route("auto", &[]);
    auto.strategy = parley::config::Strategy::Semantic;
    auto.tiers = ["fast", "strong"]
        .iter()
        .map(|name| parley::config::TierConfig {
            name: (*name).into(),
            targets: vec![parley::config::TargetConfig::new("mock", "mock-1")],
            strategy: parley::config::Strategy::Fallback,
        })
        .collect();
    cfg.routes.push(auto);
    let server = TestServer::start(cfg);
    // Traffic that gives every labelled family a series: turns, a failure, a routing decision,
    // a cache near miss (a question one word away from a cached one).
    for (model, content, ok) in [
        ("mock", "What is the capital of France?", true),
        ("mock", "What is the capital of Spain?", true),
        ("mock", "[[mock:status=500]] fail", false),
        ("auto", "hi", true),
    ] {
        let resp = http()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": model, "messages": [{"role": "user", "content": content}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().is_success(), ok, "{content}");
    }
    let metrics = get_text(&server, "/metrics").await;
    let name = regex::Regex::new(r"\b(parley_[a-z_]+|gen_ai_[a-z_]+)").unwrap();
    let by = regex::Regex::new(r"by \([^)]*\)").unwrap();
    let selector = regex::Regex::new(r"\{[^}]*\}").unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            // Label names in `by (...)` and in selectors are not families.
            let expr = by.replace_all(target["expr"].as_str().unwrap(), "");
            let expr = selector.replace_all(&expr, "");
            for m in name.find_iter(&expr) {
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .fold(m.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
                // Cluster mode's own families exist only with `[cluster]`.
                if family.starts_with("parley_redis_") {
                    continue;
                }
                assert!(
                    metrics.contains(&format!("# TYPE {family} ")),
                    "the dashboard reads {family}, which /metrics does not export"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");
}

#[tokio::test]
async fn content_is_in_the_spans_only_when_the_config_opts_in() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}/v1/traces\"\ncapture_content = true\n",
        receiver.port
    );
    let server = BinServer::start(&config, dir.path(), &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let resp = http()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "mock", "messages": [{"role": "user", "content": "where do puffins nest?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: serde_json::Value = resp.json().await.unwrap();
    let reply = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        wait_until(Duration::from_secs(15), || receiver
            .spans()
            .iter()
            .any(|s| s.name == "chat mock"))
        .await
    );
    let spans = receiver.spans();
    let chat = spans.iter().find(|s| s.name == "chat mock").unwrap();
    // In an event of the span (span fields would be printed on log lines).
    let details = chat
        .events
        .iter()
        .find(|e| e.name == "gen_ai.client.inference.operation.details")
        .expect("the content event");
    let json = |key: &str| -> serde_json::Value {
        match find(&details.attributes, key) {
            Some(Any::StringValue(s)) => serde_json::from_str(s).unwrap(),
            other => panic!("{key}: {other:?}"),
        }
    };
    assert!(attr(chat, "gen_ai.input.messages").is_none());
    let input = json("gen_ai.input.messages");
    assert_eq!(input[0]["role"], "user");
    assert_eq!(input[0]["parts"][0]["content"], "where do puffins nest?");
    let output = json("gen_ai.output.messages");
    assert_eq!(output[0]["parts"][0]["content"], reply.as_str());
}
