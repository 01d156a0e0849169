//! Line framing with bounded memory, and the DATA body decoder.
//!
//! `LineBuffer` cuts the input into LF-terminated lines without ever
//! holding more than the current line limit: a line that outgrows the limit
//! is dropped byte by byte until its LF and reported as overlong.
//!
//! `DataReader` turns the lines of a DATA body into the message handed
//! off: un-dot-stuffed (RFC 5321 §4.5.2), CRLF line endings, bounded by the
//! maximum message size. Only `<CR><LF>.<CR><LF>` ends the body — the
//! `.<CR><LF>` line must follow a line that itself ended in CRLF (the DATA
//! command's own CRLF counts). `\n.\n`, `\r.\n`, `\n.\r\n` and `\r.\r\n`
//! never end it: the SMTP smuggling family (CVE-2023-51764 and friends)
//! depends on two MTAs disagreeing about exactly this.
//!
//! A bare LF (line ending in LF without CR) or bare CR (CR not followed by
//! LF) anywhere in the body is handled per [`BareLfPolicy`]:
//! `Reject` fails the message after the final dot (`550 5.5.2`), `Normalize`
//! turns each bare LF or bare CR into CRLF. Either way, what is handed off
//! contains CRLF only, so re-sending it with dot-stuffing can never produce
//! an end-of-data marker the client did not send.

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const COMMAND_LINE_MAX: usize = 512;
/// Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6).
pub const DATA_LINE_MAX: usize = 1000;

/// What to do with bare LF / bare CR in message data (and with command
/// lines ending in a bare LF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BareLfPolicy {
    /// Fail the message with `550 5.5.2` after the final dot; a command line
    /// ending in a bare LF gets `500 5.5.2`.
    #[default]
    Reject,
    /// Convert each bare LF or bare CR in the data to CRLF; accept command
    /// lines ending in a bare LF. The end of data still needs
    /// `<CR><LF>.<CR><LF>`.
    Normalize,
}

/// A complete line from [`LineBuffer::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framed {
    /// The line (LF included) is in [`LineBuffer::take`].
    Line,
    /// The line exceeded the limit and was discarded; `crlf` tells whether
    /// it ended in CRLF (needed to recognise a following end-of-data line).
    Overlong { crlf: bool },
}

/// Accumulates one line at a time; never holds more than [`DATA_LINE_MAX`]
/// bytes (its capacity is allocated once).
#[derive(Debug)]
pub(crate) struct LineBuffer {
    buf: Vec<u8>,
    /// Discarding the rest of an overlong line.
    overflow: bool,
    /// Last byte discarded while in overflow.
    last: u8,
}

impl LineBuffer {
    pub(crate) fn new() -> Self {
        LineBuffer {
            buf: Vec::with_capacity(DATA_LINE_MAX),
            overflow: false,
            last: 0,
        }
    }

    /// Take bytes from the front of `input` (non-empty) up to and including
    /// the first LF. Returns how many were taken and, if a line ended, what
    /// kind. A line longer than `limit` bytes (LF included) is discarded.
    pub(crate) fn push(&mut self, input: &[u8], limit: usize) -> (usize, Option<Framed>) {
        debug_assert!(!input.is_empty() && limit <= DATA_LINE_MAX);
        let (chunk, complete) = match input.iter().position(|&b| b == b'\n') {
            Some(i) => (&input[..=i], true),
            None => (input, false),
        };
        let prev = if self.overflow {
            self.last
        } else {
            self.buf.last().copied().unwrap_or(0)
        };
        if !self.overflow && self.buf.len() + chunk.len() > limit {
            self.overflow = true;
            self.buf.clear();
        }
        if self.overflow {
            self.last = chunk[chunk.len() - 1];
        } else {
            self.buf.extend_from_slice(chunk);
        }
        if !complete {
            return (chunk.len(), None);
        }
        if self.overflow {
            let crlf = if chunk.len() >= 2 {
                chunk[chunk.len() - 2] == b'\r'
            } else {
                prev == b'\r'
            };
            self.overflow = false;
            self.last = 0;
            return (chunk.len(), Some(Framed::Overlong { crlf }));
        }
        (chunk.len(), Some(Framed::Line))
    }

    /// Move the completed line out (hand it back with [`restore`](Self::restore)
    /// so its allocation is reused).
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Give back the vector obtained from [`take`](Self::take).
    pub(crate) fn restore(&mut self, mut line: Vec<u8>) {
        line.clear();
        self.buf = line;
    }

    /// Forget any partial line.
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
        self.last = 0;
    }

    /// Current allocation (for the memory-bound tests).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Split a complete line (LF included) into content and whether it ended
/// in CRLF (as opposed to a bare LF).
pub(crate) fn split_terminator(line: &[u8]) -> (&[u8], bool) {
    debug_assert_eq!(line.last(), Some(&b'\n'));
    match line {
        [head @ .., b'\r', b'\n'] => (head, true),
        [head @ .., b'\n'] => (head, false),
        _ => (line, false),
    }
}

/// How a DATA body ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DataOutcome {
    /// A good message: un-stuffed, CRLF line endings.
    Message(Vec<u8>),
    /// Bare LF or bare CR seen, policy `Reject`.
    BareLineEnding,
    /// A text line exceeded 1000 octets.
    LineTooLong,
    /// The message exceeded the maximum size.
    TooBig,
}

/// First allocation for a message body (grows by doubling up to the max).
const INITIAL_CAPACITY: usize = 16 * 1024;

/// Decodes one DATA body, a line at a time.
#[derive(Debug)]
pub(crate) struct DataReader {
    buf: Vec<u8>,
    max_size: usize,
    policy: BareLfPolicy,
    /// The previous line ended in CRLF (true at the start: the DATA
    /// command's CRLF).
    prev_crlf: bool,
    bare: bool,
    too_long: bool,
    too_big: bool,
}

impl DataReader {
    pub(crate) fn new(max_size: usize, policy: BareLfPolicy) -> Self {
        DataReader {
            buf: Vec::new(),
            max_size,
            policy,
            prev_crlf: true,
            bare: false,
            too_long: false,
            too_big: false,
        }
    }

    fn failed(&self) -> bool {
        self.too_long || self.too_big || (self.bare && self.policy == BareLfPolicy::Reject)
    }

    fn fail(&mut self) {
        // Nothing will be handed off: free the body now.
        self.buf = Vec::new();
    }

    /// Feed one complete line (LF included). Returns the outcome when this
    /// line was the end-of-data marker.
    pub(crate) fn line(&mut self, line: &[u8]) -> Option<DataOutcome> {
        let (content, crlf) = split_terminator(line);
        if crlf && self.prev_crlf && content == b"." {
            return Some(self.finish());
        }
        self.prev_crlf = crlf;
        if !crlf || content.contains(&b'\r') {
            self.bare = true;
        }
        if self.failed() {
            self.fail();
            return None;
        }
        // §4.5.2: a leading period with other characters after it is removed.
        let content = match content {
            [b'.', rest @ ..] if !rest.is_empty() => rest,
            _ => content,
        };
        // Each bare CR becomes CRLF (Normalize; under Reject we never get here
        // with one), plus the line's own CRLF.
        let bare_crs = content.iter().filter(|&&b| b == b'\r').count();
        let add = content.len() + bare_crs + 2;
        if self.buf.len() + add > self.max_size {
            self.too_big = true;
            self.fail();
            return None;
        }
        self.reserve(add);
        if bare_crs == 0 {
            self.buf.extend_from_slice(content);
        } else {
            for (i, seg) in content.split(|&b| b == b'\r').enumerate() {
                if i > 0 {
                    self.buf.extend_from_slice(b"\r\n");
                }
                self.buf.extend_from_slice(seg);
            }
        }
        self.buf.extend_from_slice(b"\r\n");
        None
    }

    /// A line over [`DATA_LINE_MAX`] went by (already discarded).
    pub(crate) fn overlong(&mut self, crlf: bool) {
        self.prev_crlf = crlf;
        self.too_long = true;
        self.fail();
    }

    /// Grow the body without letting the capacity exceed the maximum size
    /// (plain `Vec` doubling could reach twice the limit).
    fn reserve(&mut self, add: usize) {
        let needed = self.buf.len() + add;
        if needed <= self.buf.capacity() {
            return;
        }
        let target = (self.buf.capacity() * 2)
            .max(INITIAL_CAPACITY)
            .min(self.max_size)
            .max(needed);
        self.buf.reserve_exact(target - self.buf.len());
    }

    fn finish(&mut self) -> DataOutcome {
        if self.bare && self.policy == BareLfPolicy::Reject {
            DataOutcome::BareLineEnding
        } else if self.too_long {
            DataOutcome::LineTooLong
        } else if self.too_big {
            DataOutcome::TooBig
        } else {
            DataOutcome::Message(std::mem::take(&mut self.buf))
        }
    }

    /// Current allocation of the body (for the memory-bound tests).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `input` through a LineBuffer + DataReader; returns the outcome
    /// (if the body ended) and the number of bytes consumed up to its end.
    fn decode(input: &[u8], max: usize, policy: BareLfPolicy) -> (Option<DataOutcome>, usize) {
        let mut lb = LineBuffer::new();
        let mut dr = DataReader::new(max, policy);
        let mut pos = 0;
        while pos < input.len() {
            let (n, framed) = lb.push(&input[pos..], DATA_LINE_MAX);
            pos += n;
            match framed {
                Some(Framed::Line) => {
                    let line = lb.take();
                    let out = dr.line(&line);
                    lb.restore(line);
                    if out.is_some() {
                        return (out, pos);
                    }
                }
                Some(Framed::Overlong { crlf }) => dr.overlong(crlf),
                None => {}
            }
        }
        (None, pos)
    }

    fn msg(v: &[u8]) -> Option<DataOutcome> {
        Some(DataOutcome::Message(v.to_vec()))
    }

    #[test]
    fn end_of_data_only_on_crlf_dot_crlf() {
        use BareLfPolicy::*;
        let cases: &[(&[u8], BareLfPolicy, Option<DataOutcome>)] = &[
            (b".\r\n", Reject, msg(b"")),
            (b"a\r\n.\r\n", Reject, msg(b"a\r\n")),
            (b"a\r\n.\r\nMAIL", Reject, msg(b"a\r\n")),
            // none of these ends the body
            (b"a\n.\n", Normalize, None),
            (b"a\r\n.\n", Normalize, None),
            (b"a\n.\r\n", Normalize, None),
            (b"a\r.\r\n", Normalize, None),
            (b"a\r.\n", Normalize, None),
            (b"a\n.\n", Reject, None),
            (b"a\n.\r\n", Reject, None),
            (b"a\r.\r\n", Reject, None),
            // ... until a real one follows
            (b"a\n.\nb\r\n.\r\n", Normalize, msg(b"a\r\n.\r\nb\r\n")),
            (b"a\n.\r\nb\r\n.\r\n", Normalize, msg(b"a\r\n.\r\nb\r\n")),
            (b"a\r.\r\nb\r\n.\r\n", Normalize, msg(b"a\r\n.\r\nb\r\n")),
            (
                b"a\n.\nb\r\n.\r\n",
                Reject,
                Some(DataOutcome::BareLineEnding),
            ),
            (
                b"a\r.\r\nb\r\n.\r\n",
                Reject,
                Some(DataOutcome::BareLineEnding),
            ),
            (b"a\rb\r\n.\r\n", Reject, Some(DataOutcome::BareLineEnding)),
        ];
        for (input, policy, want) in cases {
            let (got, _) = decode(input, 1 << 20, *policy);
            assert_eq!(
                &got,
                want,
                "{:?} {policy:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn consumes_exactly_through_the_terminator() {
        let (_, n) = decode(b"x\r\n.\r\nQUIT\r\n", 1 << 20, BareLfPolicy::Reject);
        assert_eq!(n, 6);
    }

    #[test]
    fn dot_unstuffing() {
        let (got, _) = decode(
            b"..\r\n...x\r\n.a\r\n \r\n\r\n.\r\n",
            1 << 20,
            BareLfPolicy::Reject,
        );
        assert_eq!(got, msg(b".\r\n..x\r\na\r\n \r\n\r\n"));
    }

    #[test]
    fn normalize_bare_endings() {
        let (got, _) = decode(b"a\nb\rc\r\r\n.\r\n", 1 << 20, BareLfPolicy::Normalize);
        assert_eq!(got, msg(b"a\r\nb\r\nc\r\n\r\n"));
    }

    #[test]
    fn line_length_limit() {
        let ok = [vec![b'x'; 998], b"\r\n.\r\n".to_vec()].concat();
        assert!(matches!(
            decode(&ok, 1 << 20, BareLfPolicy::Reject).0,
            Some(DataOutcome::Message(_))
        ));
        let long = [vec![b'x'; 999], b"\r\n.\r\n".to_vec()].concat();
        assert_eq!(
            decode(&long, 1 << 20, BareLfPolicy::Reject).0,
            Some(DataOutcome::LineTooLong)
        );
        // An overlong line ending in a bare LF does not arm the terminator.
        let long = [vec![b'x'; 2000], b"\n.\r\n".to_vec()].concat();
        assert_eq!(decode(&long, 1 << 20, BareLfPolicy::Normalize).0, None);
        // Split right before the LF of an overlong CRLF line.
        let long = [vec![b'x'; 2000], b"\r".to_vec(), b"\n.\r\n".to_vec()].concat();
        let mut lb = LineBuffer::new();
        let mut dr = DataReader::new(1 << 20, BareLfPolicy::Reject);
        for b in long.chunks(1) {
            match lb.push(b, DATA_LINE_MAX).1 {
                Some(Framed::Overlong { crlf }) => dr.overlong(crlf),
                Some(Framed::Line) => {
                    let line = lb.take();
                    assert_eq!(dr.line(&line), Some(DataOutcome::LineTooLong));
                    return;
                }
                None => assert!(lb.capacity() <= DATA_LINE_MAX),
            }
        }
        panic!("terminator not seen");
    }

    #[test]
    fn size_limit_and_bounded_capacity() {
        let max = 100_000;
        let line = [vec![b'y'; 98], b"\r\n".to_vec()].concat();
        let fits = [line.repeat(1000), b".\r\n".to_vec()].concat();
        assert!(
            matches!(decode(&fits, max, BareLfPolicy::Reject).0, Some(DataOutcome::Message(m)) if m.len() == 100_000)
        );
        let over = [line.repeat(1001), b".\r\n".to_vec()].concat();
        assert_eq!(
            decode(&over, max, BareLfPolicy::Reject).0,
            Some(DataOutcome::TooBig)
        );

        let mut dr = DataReader::new(max, BareLfPolicy::Reject);
        for _ in 0..1000 {
            dr.line(&line);
            assert!(dr.capacity() <= max);
        }
    }
}
