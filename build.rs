//! Turns the tiktoken vocabularies in `src/tokens/vocab/` into compact blobs in `OUT_DIR`.
//!
//! A `.tiktoken` file is base64 text (`<token bytes in base64> <rank>` per line). Decoding it at
//! run time would keep the text's pages resident next to the decoded tokens, so the decoding
//! happens here, once: the blob holds, for every rank from 0 in order, one length byte followed
//! by the token's bytes. `src/tokens/vocab.rs` embeds the blob and indexes it.

use std::error::Error;
use std::path::Path;

use base64::Engine as _;

const VOCABULARIES: [&str; 2] = ["cl100k_base", "o200k_base"];

fn main() -> Result<(), Box<dyn Error>> {
    let out_dir = std::env::var("OUT_DIR")?;
    println!("cargo:rerun-if-changed=build.rs");
    for name in VOCABULARIES {
        let source = format!("src/tokens/vocab/{name}.tiktoken");
        println!("cargo:rerun-if-changed={source}");
        let text = std::fs::read_to_string(&source)?;
        let blob = compact(&text).map_err(|e| format!("{source}: {e}"))?;
        std::fs::write(Path::new(&out_dir).join(format!("{name}.bpe")), blob)?;
    }
    Ok(())
}

/// The blob of one vocabulary; ranks must run 0, 1, 2 … in file order.
fn compact(text: &str) -> Result<Vec<u8>, String> {
    let mut blob = Vec::with_capacity(text.len());
    for (expected, line) in text.lines().enumerate() {
        let line_no = expected + 1;
        let (token, rank) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {line_no}: no rank"))?;
        let rank: usize = rank
            .parse()
            .map_err(|e| format!("line {line_no}: rank: {e}"))?;
        if rank != expected {
            return Err(format!("line {line_no}: rank {rank}, expected {expected}"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|e| format!("line {line_no}: base64: {e}"))?;
        let len = u8::try_from(bytes.len())
            .ok()
            .filter(|&len| len > 0)
            .ok_or_else(|| format!("line {line_no}: token of {} bytes", bytes.len()))?;
        blob.push(len);
        blob.extend_from_slice(&bytes);
    }
    Ok(blob)
}
