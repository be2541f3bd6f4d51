//! The `kill -9` loop: trials of killing the server at a random moment under WebSocket load,
//! restarting it on the same data, and checking that every acked message and every `done`
//! reply of every trial so far is stored as the client was told. CI runs a few trials;
//! `PARLEY_KILL_TRIALS=200 cargo test --release --all-features --test it kill_9_loop -- --nocapture`
//! runs the figure the README reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::*;

const SOCKETS: usize = 4;

/// What the clients were told: acked user messages (seq → client id) and done replies
/// (seq → text), per conversation.
#[derive(Default)]
struct Told {
    acked: HashMap<String, HashMap<u64, String>>,
    done: HashMap<String, HashMap<u64, String>>,
}

/// One socket sending turns back to back in its own conversation until the server dies.
async fn drive(addr: String, told: Arc<Mutex<Told>>, trial: usize, n: usize) {
    let Ok((stream, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await
    else {
        return;
    };
    let mut ws = Ws { stream };
    ws.send(json!({"type": "create", "client_id": "c", "model": "mock"}))
        .await;
    let Some(created) = ws.try_recv(TIMEOUT).await else {
        return;
    };
    let Some(conv) = created["conversation"].as_str().map(str::to_owned) else {
        return;
    };
    let mut deltas: HashMap<u64, String> = HashMap::new();
    for turn in 0.. {
        let cid = format!("t{trial}-{n}-{turn}");
        ws.send(
            json!({"type": "user_message", "conversation": conv, "client_id": cid,
                       "content": format!("turn {turn} [[mock:words=20,tps=400]]")}),
        )
        .await;
        loop {
            let Some(f) = ws.try_recv(TIMEOUT).await else {
                return;
            };
            match f["type"].as_str() {
                Some("ack") => {
                    let seq = f["seq"].as_u64().unwrap_or(0);
                    told.lock()
                        .unwrap()
                        .acked
                        .entry(conv.clone())
                        .or_default()
                        .insert(seq, cid.clone());
                }
                Some("delta") => {
                    let to = f["reply_to"].as_u64().unwrap_or(0);
                    deltas
                        .entry(to)
                        .or_default()
                        .push_str(f["text"].as_str().unwrap_or(""));
                }
                Some("done") => {
                    let seq = f["seq"].as_u64().unwrap_or(0);
                    let to = f["reply_to"].as_u64().unwrap_or(0);
                    let text = deltas.remove(&to).unwrap_or_default();
                    told.lock()
                        .unwrap()
                        .done
                        .entry(conv.clone())
                        .or_default()
                        .insert(seq, text);
                    break;
                }
                Some("error") => break,
                _ => {}
            }
        }
    }
}

/// Checks everything the clients were told against what the restarted server stores.
async fn verify(bin: &BinServer, told: &Told) -> (usize, usize) {
    let (mut acked, mut done) = (0, 0);
    for (conv, acks) in &told.acked {
        let stored = bin.messages(conv).await;
        let by_seq: HashMap<u64, &Value> = stored
            .iter()
            .map(|m| (m["seq"].as_u64().unwrap(), m))
            .collect();
        for (seq, cid) in acks {
            let m = by_seq
                .get(seq)
                .unwrap_or_else(|| panic!("{conv}: acked message {seq} ({cid}) lost"));
            assert_eq!(m["client_id"], cid.as_str(), "{conv}: seq {seq}");
            acked += 1;
        }
        for (seq, text) in told.done.get(conv).into_iter().flatten() {
            let m = by_seq
                .get(seq)
                .unwrap_or_else(|| panic!("{conv}: done reply {seq} lost"));
            assert_eq!(m["role"], "assistant");
            assert_eq!(
                m["content"],
                text.as_str(),
                "{conv}: reply {seq} differs from its deltas"
            );
            done += 1;
        }
    }
    (acked, done)
}

#[tokio::test]
async fn kill_9_loop() {
    let trials: usize = std::env::var("PARLEY_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .min(1000);
    let tmp = tempfile::tempdir().unwrap();
    let told = Arc::new(Mutex::new(Told::default()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for trial in 0..trials {
        let mut bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
        let drivers: Vec<_> = (0..SOCKETS)
            .map(|n| tokio::spawn(drive(bin.addr.to_string(), told.clone(), trial, n)))
            .collect();
        // A random moment under load: the kill is the event under test, not a wait.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..400))).await;
        bin.kill9();
        for d in drivers {
            let _ = d.await;
        }
    }
    let bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let told = Arc::try_unwrap(told)
        .ok()
        .expect("every driver has ended")
        .into_inner()
        .unwrap();
    let (acked, done) = verify(&bin, &told).await;
    assert!(acked > 0 && done > 0, "no load reached the server");
    eprintln!(
        "kill -9 loop: {trials} trials, {acked} acked messages and {done} done replies checked, none lost"
    );
}
