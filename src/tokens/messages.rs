//! What a request's messages cost in prompt tokens: their text, their images as OpenAI prices
//! them, the tool calls an assistant made, the framing of each message, and the tool
//! definitions offered.

use base64::Engine;

use super::{count, Encoding, MESSAGE_FRAMING_TOKENS};
use crate::domain::{Detail, ImageUrl, Message, Tool};

/// Tokens of a `low`-detail image, and the base of every other.
const IMAGE_BASE_TOKENS: u32 = 85;
/// Tokens of each 512-pixel tile of a `high`-detail image.
const IMAGE_TILE_TOKENS: u32 = 170;
/// The most a `high`-detail image can cost (2 × 4 tiles): charged when its size is unknown.
pub const IMAGE_MAX_TOKENS: u32 = IMAGE_BASE_TOKENS + 8 * IMAGE_TILE_TOKENS;
/// How much of a `data:` URL is decoded to find the image's size: formats keep it in their
/// header, and a JPEG's frame header is rarely past the first few kilobytes.
const HEADER_BASE64_CHARS: usize = 64 * 1024;

/// Tokens of one image: 85 for `low` detail; otherwise 85 + 170 per 512-pixel tile after
/// scaling to fit 2048 × 2048 and then to 768 pixels on the shorter side, from the image's real
/// size when it is a `data:` URL whose header says it, else the most an image can cost.
pub fn image_tokens(image: &ImageUrl) -> u32 {
    if image.detail == Some(Detail::Low) {
        return IMAGE_BASE_TOKENS;
    }
    match image_size(image) {
        Some((w, h)) => tiled_tokens(w, h),
        None => IMAGE_MAX_TOKENS,
    }
}

/// The pixel size of a `data:` URL image, read from its header.
fn image_size(image: &ImageUrl) -> Option<(u64, u64)> {
    let (_, data) = image.data()?;
    // Decode a prefix that is whole base64 quads (padding only at the real end).
    let mut end = data.len().min(HEADER_BASE64_CHARS);
    end -= end % 4;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&data[..end])
        .ok()?;
    let size = imagesize::blob_size(&bytes).ok()?;
    Some((size.width as u64, size.height as u64))
}

fn tiled_tokens(w: u64, h: u64) -> u32 {
    if w == 0 || h == 0 {
        return IMAGE_BASE_TOKENS;
    }
    let (mut w, mut h) = (w as f64, h as f64);
    let fit = (2048.0 / w.max(h)).min(1.0);
    w *= fit;
    h *= fit;
    let short = (768.0 / w.min(h)).min(1.0);
    w *= short;
    h *= short;
    let tiles = (w / 512.0).ceil() * (h / 512.0).ceil();
    IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles as u32
}

/// Tokens of one message, framing included.
pub fn message_tokens(encoding: Encoding, m: &Message) -> u32 {
    let mut n = count(encoding, &m.content.text()).saturating_add(MESSAGE_FRAMING_TOKENS);
    for image in m.content.images() {
        n = n.saturating_add(image_tokens(image));
    }
    for c in &m.tool_calls {
        n = n
            .saturating_add(count(encoding, &c.name))
            .saturating_add(count(encoding, &c.arguments));
    }
    n
}

/// Content tokens of a new message (its text and images, without framing), long texts counted
/// off the async threads.
pub async fn content_tokens(encoding: Encoding, m: &Message) -> u32 {
    let images: u32 = m
        .content
        .images()
        .map(image_tokens)
        .fold(0, u32::saturating_add);
    super::count_async(encoding, m.content.text())
        .await
        .saturating_add(images)
}

/// A prompt's token count, taken on first need: a key's token limits, a provider's tokens per
/// minute, or an upstream that reports no usage. A request that meets none of them (development
/// mode, an upstream that reports its usage) is never tokenized.
#[derive(Debug)]
pub struct PromptTokens {
    encoding: Encoding,
    counted: std::sync::OnceLock<u32>,
}

impl PromptTokens {
    /// A count already known (a conversation sums the stored sizes of what it sends).
    pub fn known(encoding: Encoding, tokens: u32) -> Self {
        let counted = std::sync::OnceLock::new();
        let _ = counted.set(tokens);
        Self { encoding, counted }
    }

    /// A count to be taken, if ever, of the request it belongs to.
    pub fn uncounted(encoding: Encoding) -> Self {
        Self {
            encoding,
            counted: std::sync::OnceLock::new(),
        }
    }

    /// The count: of `messages` and `tools` the first time (the request this count belongs
    /// to, as it goes upstream), remembered after.
    pub fn of(&self, messages: &[Message], tools: &[Tool]) -> u32 {
        *self
            .counted
            .get_or_init(|| request_tokens(self.encoding, messages, tools))
    }

    /// Whether the count has been taken (tests).
    pub fn is_counted(&self) -> bool {
        self.counted.get().is_some()
    }
}

/// Prompt tokens of a whole request: its messages and the tools it offers.
pub fn request_tokens(encoding: Encoding, messages: &[Message], tools: &[Tool]) -> u32 {
    let mut n: u32 = messages
        .iter()
        .map(|m| message_tokens(encoding, m))
        .fold(0, u32::saturating_add);
    for t in tools {
        let schema = serde_json::to_string(&t).unwrap_or_default();
        n = n.saturating_add(count(encoding, &schema));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> String {
        // A PNG signature and IHDR chunk are all `imagesize` reads.
        let mut b = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13];
        b.extend_from_slice(b"IHDR");
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    }

    fn image(url: String, detail: Option<Detail>) -> ImageUrl {
        ImageUrl { url, detail }
    }

    #[test]
    fn images_cost_what_openai_charges() {
        // OpenAI's worked examples: 1024 × 1024 high → 765; 2048 × 4096 → 1105; low → 85.
        assert_eq!(image_tokens(&image(png(1024, 1024), None)), 765);
        assert_eq!(
            image_tokens(&image(png(2048, 4096), Some(Detail::High))),
            1105
        );
        assert_eq!(image_tokens(&image(png(4096, 8192), Some(Detail::Low))), 85);
        // Small images are one tile.
        assert_eq!(image_tokens(&image(png(100, 80), None)), 255);
        // Unknown size: the most an image costs.
        assert_eq!(
            image_tokens(&image("https://e.x/a.png".into(), None)),
            IMAGE_MAX_TOKENS
        );
        assert_eq!(
            image_tokens(&image("data:image/png;base64,!!!!".into(), None)),
            IMAGE_MAX_TOKENS
        );
    }

    #[test]
    fn messages_count_text_images_calls_and_framing() {
        let m = Message::text(crate::domain::Role::User, "hello world");
        assert_eq!(
            message_tokens(Encoding::Cl100kBase, &m),
            2 + MESSAGE_FRAMING_TOKENS
        );
        let with_call = Message {
            role: crate::domain::Role::Assistant,
            tool_calls: vec![crate::domain::ToolCall {
                id: "c".into(),
                name: "get".into(),
                arguments: "{}".into(),
            }],
            ..Message::default()
        };
        assert!(message_tokens(Encoding::Cl100kBase, &with_call) > MESSAGE_FRAMING_TOKENS);
    }
}
