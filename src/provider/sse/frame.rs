//! Server-sent event framing (the WHATWG `text/event-stream` format): bytes in, one event
//! (its name and data) out at a time, read straight from one reused buffer.
//!
//! Lines end at LF, CRLF or a lone CR (a CR ends its line at once; a LF right after it, even
//! in the next read, belongs to it); a
//! leading byte order mark (or several) is dropped; `:` lines are comments; `data` lines are
//! joined with LF; `event` names the event; `id` and `retry` are read and ignored (an upstream
//! generation is never resumed); a blank line ends an event, which is passed on only if it has
//! data. What is left unended when the stream stops is not an event.

/// The UTF-8 byte order mark an event stream may open with.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The longest line, and the most data in one event: an upstream that never ends either is
/// cut off, not buffered without end.
pub const MAX_EVENT: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct Framer {
    /// Bytes received and not yet read as lines, from `at`.
    buf: Vec<u8>,
    at: usize,
    /// `buf[at..scanned]` holds no line end (a long line is not searched again per read).
    scanned: usize,
    /// The event being read.
    data: String,
    event: String,
    /// The last line ended with a CR: a LF that follows belongs to it.
    after_cr: bool,
    /// The opening byte order marks are behind us.
    opened: bool,
    /// The event last answered is still in `data`/`event`, to be cleared first.
    answered: bool,
}

/// An event stream that cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    NotUtf8,
    /// A line or an event longer than [`MAX_EVENT`].
    TooLong,
}

/// The room an event's data starts with: a chat chunk's JSON fits without growing.
const DATA_START: usize = 512;

impl Framer {
    pub fn new() -> Self {
        Self {
            data: String::with_capacity(DATA_START),
            ..Self::default()
        }
    }

    /// Takes the next bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
            self.scanned = 0;
        } else if self.at > 4096 && self.at * 2 > self.buf.len() {
            self.buf.drain(..self.at);
            self.scanned -= self.at.min(self.scanned);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole event, as `(name, data)` (`"message"` when it has no name), or `None`
    /// until more bytes come.
    ///
    /// # Errors
    /// A line that is not UTF-8, or a line or event longer than [`MAX_EVENT`].
    pub fn next_event(&mut self) -> Result<Option<(&str, &str)>, FrameError> {
        if self.answered {
            self.answered = false;
            self.data.clear();
            self.event.clear();
        }
        if !self.opened && !self.open() {
            return Ok(None);
        }
        loop {
            let rest = &self.buf[self.at..];
            if self.after_cr {
                match rest.first() {
                    None => return Ok(None),
                    Some(b'\n') => self.at += 1,
                    Some(_) => {}
                }
                self.after_cr = false;
                continue;
            }
            let from = self.scanned.saturating_sub(self.at).min(rest.len());
            let Some(end) = rest[from..]
                .iter()
                .position(|b| *b == b'\n' || *b == b'\r')
                .map(|i| from + i)
            else {
                self.scanned = self.buf.len();
                return if rest.len() > MAX_EVENT {
                    Err(FrameError::TooLong)
                } else {
                    Ok(None)
                };
            };
            let line_at = self.at;
            self.after_cr = rest[end] == b'\r';
            self.at += end + 1;
            let line = std::str::from_utf8(&self.buf[line_at..line_at + end])
                .map_err(|_| FrameError::NotUtf8)?;
            if line.is_empty() {
                if self.data.is_empty() {
                    self.event.clear();
                    continue;
                }
                if self.data.ends_with('\n') {
                    self.data.pop();
                }
                self.answered = true;
                let name = if self.event.is_empty() {
                    "message"
                } else {
                    self.event.as_str()
                };
                return Ok(Some((name, self.data.as_str())));
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if self.data.len() + value.len() > MAX_EVENT {
                        return Err(FrameError::TooLong);
                    }
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                "event" => {
                    self.event.clear();
                    self.event.push_str(value);
                }
                // Comments (an empty field name), `id`, `retry` and unknown fields.
                _ => {}
            }
        }
    }

    /// Drops the opening byte order marks; false while the bytes so far could still be one.
    fn open(&mut self) -> bool {
        loop {
            let rest = &self.buf[self.at..];
            if rest.starts_with(BOM) {
                self.at += BOM.len();
            } else if BOM.starts_with(rest) {
                return false;
            } else {
                self.opened = true;
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c);
            while let Ok(Some((name, data))) = f.next_event() {
                out.push((name.to_owned(), data.to_owned()));
            }
        }
        out
    }

    #[test]
    fn lines_fields_and_events() {
        let body = b"\xEF\xBB\xBF: hello\r\nevent: delta\r\ndata: a\r\ndata:b\r\n\r\ndata: c\rid: 1\r\rretry: 5\n\nevent: empty\n\ndata\n\n";
        let want = vec![
            ("delta".to_owned(), "a\nb".to_owned()),
            ("message".to_owned(), "c".to_owned()),
            ("message".to_owned(), String::new()),
        ];
        // The data-less `empty` event is none; a bare `data` line is an event with empty data.
        let got = events(&[body]);
        assert_eq!(got, want);
        for cut in 0..body.len() {
            assert_eq!(events(&[&body[..cut], &body[cut..]]), got, "cut at {cut}");
        }
        // Unended at the end: nothing.
        assert!(events(&[b"data: half"]).is_empty());
        let mut f = Framer::default();
        f.push(b"data: \xff\n\n");
        assert_eq!(f.next_event(), Err(FrameError::NotUtf8));
        // A line that never ends is cut off once past the bound, not buffered for ever.
        let mut f = Framer::default();
        f.push(b"data: ");
        f.push(&vec![b'x'; MAX_EVENT + 1]);
        assert_eq!(f.next_event(), Err(FrameError::TooLong));
    }
}
