//! The chat page and the dashboard in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver, the `fantoccini` client), against the real server and mock
//! provider. `PARLEY_SCREENSHOTS=<dir>` also saves the screenshots the README shows.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// One browser test at a time: Chromium is heavy on two cores, and the suite's timing-bound
/// tests run beside these.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// chromedriver on a free port and one browser session; both end on drop.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Command::new(
            std::env::var("PARLEY_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()),
        )
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; scripts/test.sh installs it)");
        let profile = tempfile::tempdir().unwrap();
        let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": std::env::var("PARLEY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1200,800",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }))
        .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        let client = loop {
            // chromedriver speaks plain HTTP on loopback: no TLS.
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no browser session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Polls a JavaScript expression until it is truthy; answers its value.
    async fn until(&self, expr: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.eval(&format!("return ({expr});")).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {expr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn click(&self, id: &str) {
        self.client
            .find(Locator::Id(id))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The words of the `i`th reply as the page shows it.
    async fn reply_words(&self, i: usize) -> Vec<String> {
        let shown = self
            .eval(&format!(
                "return {ASSISTANT}[{i}].querySelector('.body').innerText;"
            ))
            .await;
        words(shown.as_str().unwrap())
    }

    async fn screenshot(&self, name: &str) {
        if let Ok(dir) = std::env::var("PARLEY_SCREENSHOTS") {
            std::fs::create_dir_all(&dir).unwrap();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(std::path::Path::new(&dir).join(name), png).unwrap();
        }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// A server whose mock provider streams at `tokens_per_sec`, so a test sees a reply grow.
fn paced_server(tokens_per_sec: f64) -> TestServer {
    let mut cfg = config_with(None);
    for p in &mut cfg.providers {
        if p.name == "mock" {
            p.tokens_per_sec = Some(tokens_per_sec);
        }
    }
    // Priced, so each turn shows its cost.
    cfg.prices.insert(
        "mock-1".into(),
        parley::domain::Price {
            input_per_mtok: 1.0,
            output_per_mtok: 2.0,
        },
    );
    TestServer::start(cfg)
}

/// Types `text` into the composer and presses Enter.
async fn say(b: &Browser, text: &str) {
    let input = b.client.find(Locator::Id("input")).await.unwrap();
    input.send_keys(text).await.unwrap();
    input.send_keys("\u{E007}").await.unwrap(); // Enter
}

const ASSISTANT: &str = "document.querySelectorAll('.msg.assistant')";

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// Starts a conversation on the page and answers its id.
async fn new_conversation(b: &Browser) -> String {
    b.until("document.querySelectorAll('#model option').length > 0")
        .await;
    b.click("new").await;
    let id = b
        .until("location.hash.length > 5 && !document.getElementById('input').disabled && location.hash.slice(1)")
        .await;
    b.until("document.getElementById('status').textContent === 'connected'")
        .await;
    id.as_str().unwrap().to_owned()
}

async fn stored(server: &TestServer, conv: &str) -> Vec<Value> {
    messages(server, None, conv).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_streams_survives_a_reload_a_cancel_and_a_dropped_socket() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = paced_server(60.0);
    let b = Browser::start().await;
    b.client.goto(&server.url("/")).await.unwrap();
    let conv = new_conversation(&b).await;

    // It streams: the reply is seen part-way before it is done.
    say(&b, "[[mock:words=60]] hello there").await;
    b.until(&format!("{ASSISTANT}.length === 1 && {ASSISTANT}[0].innerText.length > 0 && !{ASSISTANT}[0].classList.contains('done')"))
        .await;
    b.until(&format!("{ASSISTANT}[0].classList.contains('done')"))
        .await;
    let history = stored(&server, &conv).await;
    assert_eq!(history.len(), 2);
    // Its badges: model, tokens and cost, as stored.
    let meta = b
        .eval(&format!(
            "return {ASSISTANT}[0].querySelector('.meta').innerText;"
        ))
        .await;
    let meta = meta.as_str().unwrap();
    assert!(history[1]["cost"].as_f64().unwrap() > 0.0, "{}", history[1]);
    let usage = &history[1]["usage"];
    for part in [
        "mock-1".to_owned(),
        format!(
            "{} + {} tokens",
            usage["prompt_tokens"], usage["completion_tokens"]
        ),
        "cost 0.000".to_owned(),
    ] {
        assert!(meta.contains(&part), "{part} not in {meta}");
    }
    assert_eq!(
        b.reply_words(0).await,
        words(history[1]["content"].as_str().unwrap())
    );
    b.screenshot("chat.png").await;

    // A reload shows the history.
    b.client.refresh().await.unwrap();
    b.until("document.querySelectorAll('.msg').length === 2")
        .await;
    b.until("document.getElementById('status').textContent === 'connected'")
        .await;

    // Stop mid-reply: the reply ends cancelled, and so it is stored.
    say(&b, "[[mock:words=2000]] a long one").await;
    b.until(&format!(
        "{ASSISTANT}.length === 2 && {ASSISTANT}[1].innerText.length > 0"
    ))
    .await;
    b.click("cancel").await;
    b.until(&format!("{ASSISTANT}[1].classList.contains('done') && {ASSISTANT}[1].innerText.includes('cancelled')"))
        .await;
    let history = stored(&server, &conv).await;
    assert_eq!(history.len(), 4);
    assert_eq!(history[3]["finish_reason"], "cancelled");

    // The socket drops while a reply streams: the page reconnects, resumes from its last seq,
    // and ends with the whole stored reply, once.
    say(&b, "[[mock:words=150]] and another").await;
    b.until(&format!(
        "{ASSISTANT}.length === 3 && {ASSISTANT}[2].innerText.length > 0"
    ))
    .await;
    b.eval("window.parley.dropSocket(); return true;").await;
    b.until(&format!("{ASSISTANT}[2].classList.contains('done')"))
        .await;
    // A message typed while the socket is down is sent once it is back.
    b.eval("window.parley.dropSocket(); return true;").await;
    say(&b, "sent while offline").await;
    b.until(&format!(
        "{ASSISTANT}.length === 4 && {ASSISTANT}[3].classList.contains('done')"
    ))
    .await;
    let history = stored(&server, &conv).await;
    assert_eq!(history.len(), 8, "{history:?}");
    let users = history.iter().filter(|m| m["role"] == "user").count();
    assert_eq!(users, 4);
    assert_eq!(
        b.reply_words(2).await,
        words(history[5]["content"].as_str().unwrap())
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('.msg').length;")
            .await,
        8
    );

    // The socket drops after the ack, before the first word: the reply is joined mid-way on
    // the new socket, and its beginning is read back once it is done.
    say(&b, "[[mock:ttft_ms=200]] [[mock:words=40]] a slow start").await;
    b.until("document.querySelectorAll('.msg.user[data-seq]:not(.pending)').length === 5")
        .await;
    b.eval("window.parley.dropSocket(); return true;").await;
    b.until(&format!(
        "{ASSISTANT}.length === 5 && {ASSISTANT}[4].classList.contains('done')"
    ))
    .await;
    let history = stored(&server, &conv).await;
    assert_eq!(history.len(), 10);
    assert_eq!(
        b.reply_words(4).await,
        words(history[9]["content"].as_str().unwrap())
    );
    // A reload shows the same ten, once each.
    b.client.refresh().await.unwrap();
    b.until("document.querySelectorAll('.msg').length === 10")
        .await;
    assert_eq!(
        b.reply_words(4).await,
        words(history[9]["content"].as_str().unwrap())
    );
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_show_the_same_conversation_live() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = paced_server(200.0);
    let one = Browser::start().await;
    one.client.goto(&server.url("/")).await.unwrap();
    let conv = new_conversation(&one).await;
    let two = Browser::start().await;
    two.client
        .goto(&server.url(&format!("/#{conv}")))
        .await
        .unwrap();
    two.until("document.getElementById('status').textContent === 'connected' && !document.getElementById('input').disabled")
        .await;
    say(&one, "[[mock:words=30]] seen twice").await;
    for b in [&one, &two] {
        b.until(&format!(
            "{ASSISTANT}.length === 1 && {ASSISTANT}[0].classList.contains('done')"
        ))
        .await;
        b.until("document.querySelectorAll('.msg.user').length === 1 && document.querySelector('.msg.user').innerText.includes('seen twice')")
            .await;
    }
    // And the other way round.
    say(&two, "from the second tab").await;
    one.until(&format!(
        "{ASSISTANT}.length === 2 && {ASSISTANT}[1].classList.contains('done')"
    ))
    .await;
    one.until("document.querySelectorAll('.msg.user').length === 2")
        .await;
    one.close().await;
    two.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markup_in_a_reply_is_shown_as_text_and_never_runs() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = paced_server(0.0);
    let b = Browser::start().await;
    b.client.goto(&server.url("/")).await.unwrap();
    new_conversation(&b).await;
    let attack = "[[mock:echo]] <img src=x onerror=\"window.pwned=1\"> <script>window.pwned=2</script> [x](javascript:window.pwned=3) **bold**";
    say(&b, attack).await;
    b.until(&format!(
        "{ASSISTANT}.length === 1 && {ASSISTANT}[0].classList.contains('done')"
    ))
    .await;
    let reply = b
        .eval(&format!(
            "return {ASSISTANT}[0].querySelector('.body').innerText;"
        ))
        .await;
    let reply = reply.as_str().unwrap();
    assert!(reply.contains("<img src=x onerror="), "{reply}");
    assert!(reply.contains("<script>window.pwned=2</script>"), "{reply}");
    assert_eq!(
        b.eval("return document.querySelectorAll('#messages img, #messages script, #messages a[href^=\"javascript\"]').length;").await,
        0
    );
    assert_eq!(
        b.eval(&format!(
            "return {ASSISTANT}[0].querySelectorAll('strong').length;"
        ))
        .await,
        1,
        "Markdown still renders"
    );
    // A fenced code block is a code block, its markup still text.
    b.eval(
        "document.getElementById('input').value = '[[mock:echo]] see:\\n```html\\n<b onmouseover=x>hi</b>\\n```'; \
         document.getElementById('send').click(); return true;",
    )
    .await;
    b.until(&format!(
        "{ASSISTANT}.length === 2 && {ASSISTANT}[1].classList.contains('done')"
    ))
    .await;
    let code = b
        .eval(&format!(
            "return {ASSISTANT}[1].querySelector('pre > code').innerText;"
        ))
        .await;
    assert!(
        code.as_str().unwrap().contains("<b onmouseover=x>hi</b>"),
        "{code}"
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('#messages b').length;")
            .await,
        0
    );
    // No element of the conversation carries an event handler attribute, and none ran.
    assert_eq!(
        b.eval("return document.querySelectorAll('#messages [onerror], #messages [onmouseover], #messages [onclick]').length;").await,
        0
    );
    assert_eq!(b.eval("return typeof window.pwned;").await, "undefined");
    // The same after a reload, where the history is rendered from the store.
    b.client.refresh().await.unwrap();
    b.until(&format!("{ASSISTANT}.length === 2")).await;
    assert_eq!(
        b.eval("return document.querySelectorAll('#messages img, #messages script, #messages [onerror]').length;").await,
        0
    );
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_breaker_a_test_opened() {
    let _one = ONE_AT_A_TIME.lock().await;
    let up = MockUpstream::spawn(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    })
    .unwrap();
    let mut cfg = config_with(Some(&up));
    for p in &mut cfg.providers {
        if p.name == "up" {
            p.breaker.failures = 2;
            p.breaker.cooldown_ms = 600_000;
        }
    }
    let server = TestServer::start(cfg);
    for _ in 0..3 {
        let resp = http()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_server_error(), "{}", resp.status());
    }
    // Some traffic that succeeds, for the usage table.
    for i in 0..3 {
        let resp = http()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "mock", "messages": [{"role": "user", "content": format!("q{i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let b = Browser::start().await;
    b.client.goto(&server.url("/dashboard")).await.unwrap();
    b.until("document.querySelector('.breaker-open[data-provider=\"up\"]')")
        .await;
    b.until("[...document.querySelectorAll('#errors tbody tr')].some(r => r.innerText.includes('upstream_error'))")
        .await;
    // The usage table reads /admin/usage: the mock model's three requests.
    b.until("[...document.querySelectorAll('#by-model tbody tr')].some(r => r.cells[0].innerText === 'mock-1' && r.cells[1].innerText === '3')")
        .await;
    b.screenshot("dashboard.png").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_the_admin_key_and_keeps_it_hidden() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = TestServer::start_with_admin(config_with(None));
    let admin = server.admin_key.clone().unwrap();
    let b = Browser::start().await;
    b.client.goto(&server.url("/dashboard")).await.unwrap();
    b.until("!document.getElementById('error').hidden && document.getElementById('error').innerText.includes('refused')")
        .await;
    b.click("admin-key").await;
    let input = b.client.find(Locator::Id("key-input")).await.unwrap();
    assert_eq!(
        input.attr("type").await.unwrap().as_deref(),
        Some("password")
    );
    input.send_keys(&admin).await.unwrap();
    b.eval("document.querySelector('#key-form button[value=save]').click(); return true;")
        .await;
    b.until("document.querySelectorAll('#providers tbody tr').length > 0 && document.getElementById('error').hidden")
        .await;
    // The key is nowhere in the page.
    let html = b.eval("return document.documentElement.outerHTML;").await;
    assert!(!html.as_str().unwrap().contains(&admin));
    b.close().await;
}
