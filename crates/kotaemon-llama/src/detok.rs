//! Incremental detokenization: token bytes in, valid UTF-8 text out, stop strings cut.
//!
//! A token is a run of bytes, not a run of characters: a CJK character or an emoji can be split
//! across two or more tokens, and a stop string can be split across any number of them.
//! [`Detokenizer`] is pure (no llama.cpp types) so both properties are unit-tested here.
//!
//! Rules:
//! - Bytes are buffered until they form complete UTF-8 sequences; only those are emitted.
//!   Bytes that can never become valid UTF-8 are replaced by U+FFFD at once, and an incomplete
//!   sequence still pending at [`Detokenizer::finish`] becomes one U+FFFD.
//! - Text that could be the beginning of a stop string is held back until it is known not to be.
//! - When a stop string appears, the text before it is emitted and everything from the stop
//!   string on is dropped; the earliest-starting stop string wins.

/// What one [`Detokenizer::push`] produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Text safe to hand to the caller now (may be empty).
    pub text: String,
    /// A stop string was found: generation must end, and `text` is the last text to emit.
    pub stopped: bool,
}

/// Turns a stream of token bytes into a stream of valid UTF-8 pieces, honouring stop strings.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    stops: Vec<String>,
    /// Length in bytes of the longest stop string.
    max_stop_len: usize,
    /// Bytes of an incomplete UTF-8 sequence (at most 3).
    pending: Vec<u8>,
    /// Decoded text not yet emitted: a possible stop-string prefix.
    held: String,
    stopped: bool,
}

impl Detokenizer {
    /// A detokenizer that cuts at any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_stop_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            max_stop_len,
            ..Self::default()
        }
    }

    /// Feeds the bytes of one token. After a step with `stopped == true`, further pushes
    /// return nothing.
    pub fn push(&mut self, bytes: &[u8]) -> Step {
        if self.stopped {
            return Step::default();
        }
        self.pending.extend_from_slice(bytes);
        let decoded = decode_complete(&mut self.pending);
        self.held.push_str(&decoded);
        self.release()
    }

    /// Ends the stream: returns everything still held (an incomplete UTF-8 tail becomes
    /// U+FFFD). Stop strings are still honoured.
    pub fn finish(&mut self) -> Step {
        if self.stopped {
            return Step::default();
        }
        if !self.pending.is_empty() {
            self.held.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
        let mut step = self.release();
        if !step.stopped {
            step.text.push_str(&self.held);
            self.held.clear();
        }
        step
    }

    /// Emits what is known not to be part of a stop string.
    fn release(&mut self) -> Step {
        if let Some(pos) = self.earliest_stop() {
            self.stopped = true;
            let text = self.held[..pos].to_owned();
            self.held.clear();
            self.pending.clear();
            return Step {
                text,
                stopped: true,
            };
        }
        let keep_from = self.partial_stop_start();
        let text = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        Step {
            text,
            stopped: false,
        }
    }

    /// Byte offset in `held` of the earliest complete stop string.
    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
    }

    /// Byte offset in `held` where the longest suffix that is a proper prefix of some stop
    /// string begins (`held.len()` when there is none).
    fn partial_stop_start(&self) -> usize {
        let len = self.held.len();
        let lowest = len.saturating_sub(self.max_stop_len.saturating_sub(1));
        (lowest..len)
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(len)
    }
}

/// Removes and returns the longest decodable prefix of `buf`, leaving only an incomplete
/// trailing UTF-8 sequence in it. Invalid bytes become U+FFFD.
fn decode_complete(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = buf.len();
                break;
            }
            Err(e) => {
                let valid_end = start + e.valid_up_to();
                // `valid_up_to` guarantees this range is valid UTF-8.
                out.push_str(&String::from_utf8_lossy(&buf[start..valid_end]));
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid_end + bad;
                    }
                    None => {
                        // Incomplete sequence at the end: wait for more bytes.
                        start = valid_end;
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` and returns (pieces, stopped), with the finish step included.
    fn run(stops: &[&str], chunks: &[&[u8]]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        let mut d = Detokenizer::new(&stops);
        let mut pieces = Vec::new();
        for c in chunks {
            let step = d.push(c);
            if !step.text.is_empty() {
                pieces.push(step.text);
            }
            if step.stopped {
                return (pieces, true);
            }
        }
        let step = d.finish();
        if !step.text.is_empty() {
            pieces.push(step.text);
        }
        (pieces, step.stopped)
    }

    fn joined(stops: &[&str], chunks: &[&[u8]]) -> (String, bool) {
        let (p, s) = run(stops, chunks);
        (p.concat(), s)
    }

    const SAMPLES: &[&str] = &[
        "Hello, world!",
        "北京是中国的首都。",
        "emoji 👩‍👩‍👧 and 🇫🇷 flags",
        "mixed: café 東京 🎉 end",
    ];

    #[test]
    fn every_two_way_split_round_trips() {
        for s in SAMPLES {
            let b = s.as_bytes();
            for i in 0..=b.len() {
                let (out, stopped) = joined(&[], &[&b[..i], &b[i..]]);
                assert_eq!(out, *s, "split at {i}");
                assert!(!stopped);
            }
        }
    }

    #[test]
    fn byte_by_byte_pieces_are_whole_chars() {
        for s in SAMPLES {
            let chunks: Vec<&[u8]> = s.as_bytes().chunks(1).collect();
            let (pieces, _) = run(&[], &chunks);
            assert_eq!(pieces.concat(), *s);
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
            // Every char arrives exactly when its last byte does.
            assert_eq!(pieces.len(), s.chars().count());
        }
    }

    #[test]
    fn chinese_three_byte_chars_split_inside() {
        let s = "用一句话介绍北京。";
        let b = s.as_bytes();
        // Chunks of 2 bytes never align with 3-byte characters.
        let chunks: Vec<&[u8]> = b.chunks(2).collect();
        let (pieces, _) = run(&[], &chunks);
        assert_eq!(pieces.concat(), s);
        assert!(pieces
            .iter()
            .all(|p| !p.is_empty() && !p.contains('\u{FFFD}')));
    }

    #[test]
    fn emoji_four_byte_split_emits_nothing_until_complete() {
        let mut d = Detokenizer::new(&[]);
        let b = "🎉".as_bytes();
        assert_eq!(d.push(&b[..1]).text, "");
        assert_eq!(d.push(&b[1..3]).text, "");
        assert_eq!(d.push(&b[3..]).text, "🎉");
    }

    #[test]
    fn invalid_bytes_become_replacement_chars() {
        let (out, _) = joined(&[], &[b"a\xffb", b"\xc3"]);
        assert_eq!(out, "a\u{FFFD}b\u{FFFD}");
        // A lone continuation byte is invalid at once, not held.
        let mut d = Detokenizer::new(&[]);
        assert_eq!(d.push(b"\x80x").text, "\u{FFFD}x");
    }

    #[test]
    fn stop_string_in_one_piece() {
        let (out, stopped) = joined(&["STOP"], &[b"abc STOP def"]);
        assert_eq!(out, "abc ");
        assert!(stopped);
    }

    #[test]
    fn stop_string_split_at_every_position_across_pieces() {
        let text = "The answer is Paris. Next question";
        let stop = "Paris.";
        let b = text.as_bytes();
        for i in 0..=b.len() {
            for j in i..=b.len() {
                let (pieces, stopped) = run(&[stop], &[&b[..i], &b[i..j], &b[j..]]);
                assert!(stopped, "split {i},{j}");
                assert_eq!(pieces.concat(), "The answer is ", "split {i},{j}");
                assert!(pieces.iter().all(|p| !p.contains('P')));
            }
        }
    }

    #[test]
    fn chinese_stop_string_split_bytewise() {
        let text = "北京是中国的首都。上海是最大的城市。";
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        let (out, stopped) = joined(&["首都"], &chunks);
        assert!(stopped);
        assert_eq!(out, "北京是中国的");
    }

    #[test]
    fn held_prefix_is_released_when_it_turns_out_not_to_be_a_stop() {
        let mut d = Detokenizer::new(&["<end>".to_owned()]);
        assert_eq!(d.push(b"a <e").text, "a ");
        assert_eq!(d.push(b"n").text, "");
        assert_eq!(d.push(b"x").text, "<enx");
        // A partial stop at the very end is text after all.
        assert_eq!(d.push(b" <en").text, " ");
        let fin = d.finish();
        assert_eq!(fin.text, "<en");
        assert!(!fin.stopped);
    }

    #[test]
    fn earliest_stop_wins_and_nothing_after_stop() {
        let (out, stopped) = joined(&["world", "lo"], &[b"hello world"]);
        assert!(stopped);
        assert_eq!(out, "hel");
        let mut d = Detokenizer::new(&["x".to_owned()]);
        assert!(d.push(b"axb").stopped);
        assert_eq!(d.push(b"more"), Step::default());
        assert_eq!(d.finish(), Step::default());
    }

    #[test]
    fn overlapping_stop_prefixes() {
        // "aab" must be found even though "aa" first looks like a failing prefix of "ab"-ish text.
        let chunks: &[&[u8]] = &[b"x", b"a", b"a", b"a", b"b", b"y"];
        let (out, stopped) = joined(&["aab"], chunks);
        assert!(stopped);
        assert_eq!(out, "xa");
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let (out, stopped) = joined(&[""], &[b"abc"]);
        assert_eq!(out, "abc");
        assert!(!stopped);
    }

    #[test]
    fn stop_completed_by_lossy_tail_at_finish() {
        let (out, stopped) = joined(&["\u{FFFD}"], &[b"ok\xe4\xb8"]);
        assert!(stopped);
        assert_eq!(out, "ok");
    }
}
