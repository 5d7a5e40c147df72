//! The turn's mapping between real values and pseudonyms. It lives only in memory, only for
//! the turn (the whole conversation is re-masked each turn, so the same value gets the same
//! pseudonym throughout it), and never leaves the device.

use super::recognize::{Entity, Recognizers};
use std::collections::HashMap;
use std::sync::Mutex;

/// How found values are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// `<PERSON_1>`, restored on the way back.
    Pseudonym,
    /// `<PERSON>`, irreversible.
    Redact,
}

#[derive(Default)]
struct Maps {
    to_pseudonym: HashMap<String, String>,
    to_value: HashMap<String, String>,
    next: HashMap<String, usize>,
    /// Pseudonym-looking text the user wrote themselves: never handed out, never restored.
    reserved: Vec<String>,
    found: Vec<Entity>,
}

pub struct Vault {
    replace: Replace,
    maps: Mutex<Maps>,
}

/// Longest pseudonym we hand out (`<CREDENTIAL_9999>`), so a stream restorer knows how much
/// to hold back.
pub const MAX_PSEUDONYM_LEN: usize = 48;

impl Vault {
    pub fn new(replace: Replace) -> Self {
        Vault {
            replace,
            maps: Mutex::new(Maps::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entities found so far (for events and the block policy).
    pub fn found(&self) -> Vec<Entity> {
        self.lock().found.clone()
    }

    /// Replaces every recognized value in `text`.
    pub fn mask(&self, recognizers: &Recognizers, text: &str) -> String {
        let spans = recognizers.find(text);
        if spans.is_empty() {
            return text.to_string();
        }
        let mut maps = self.lock();
        // Literal placeholders the user typed must stay literal.
        let mut i = 0;
        while let Some(off) = text[i..].find('<') {
            let start = i + off;
            if let Some(len) = text[start..].find('>') {
                let candidate = &text[start..=start + len];
                if candidate.len() <= MAX_PSEUDONYM_LEN
                    && !maps.reserved.iter().any(|r| r == candidate)
                {
                    maps.reserved.push(candidate.to_string());
                }
            }
            i = start + 1;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for span in spans {
            out.push_str(&text[at..span.start]);
            let value = &text[span.start..span.end];
            let label = span.entity.label();
            maps.found.push(span.entity.clone());
            let replacement = match self.replace {
                Replace::Redact => format!("<{label}>"),
                Replace::Pseudonym => match maps.to_pseudonym.get(value) {
                    Some(p) => p.clone(),
                    None => {
                        let p = loop {
                            let n = maps.next.entry(label.clone()).or_insert(0);
                            *n += 1;
                            let p = format!("<{label}_{n}>");
                            if !maps.reserved.contains(&p) {
                                break p;
                            }
                        };
                        maps.to_pseudonym.insert(value.to_string(), p.clone());
                        maps.to_value.insert(p.clone(), value.to_string());
                        p
                    }
                },
            };
            out.push_str(&replacement);
            at = span.end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// Puts the real values back.
    pub fn restore(&self, text: &str) -> String {
        if self.replace == Replace::Redact || !text.contains('<') {
            return text.to_string();
        }
        let maps = self.lock();
        if maps.to_value.is_empty() {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find('<') {
            out.push_str(&rest[..start]);
            let tail = &rest[start..];
            let end = tail.find('>').filter(|e| *e < MAX_PSEUDONYM_LEN);
            match end.and_then(|e| maps.to_value.get(&tail[..=e]).map(|v| (e, v))) {
                Some((e, value)) => {
                    out.push_str(value);
                    rest = &tail[e + 1..];
                }
                None => {
                    out.push('<');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// Restores a streamed text piece by piece: a pseudonym split across chunks (`<PER` + `SON_1>`)
/// is held back only until it is complete or cannot be one.
#[derive(Default)]
pub struct StreamRestorer {
    held: String,
}

impl StreamRestorer {
    /// The text that can be shown now.
    pub fn push(&mut self, vault: &Vault, piece: &str) -> String {
        self.held.push_str(piece);
        // Hold from the last '<' that may still open a pseudonym.
        let cut = match self.held.rfind('<') {
            Some(i) => {
                let tail = &self.held[i..];
                let could_be = !tail.contains('>')
                    && tail.len() < MAX_PSEUDONYM_LEN
                    && tail[1..]
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if could_be {
                    i
                } else {
                    self.held.len()
                }
            }
            None => self.held.len(),
        };
        let ready: String = self.held.drain(..cut).collect();
        vault.restore(&ready)
    }

    /// Whatever is still held at the end of the stream.
    pub fn finish(&mut self, vault: &Vault) -> String {
        let rest = std::mem::take(&mut self.held);
        vault.restore(&rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::contacts::{Contact, Directory};

    fn recognizers() -> Recognizers {
        let dir = Directory::new(vec![Contact {
            name: "张伟".into(),
            title: "产品经理".into(),
            ..Default::default()
        }]);
        Recognizers::new(&dir, &[]).unwrap()
    }

    #[test]
    fn same_value_same_pseudonym_and_back() {
        let r = recognizers();
        let v = Vault::new(Replace::Pseudonym);
        let text = "张经理的电话是13800138000，再打一次13800138000给张经理";
        let masked = v.mask(&r, text);
        assert_eq!(
            masked,
            "<PERSON_1>的电话是<PHONE_1>，再打一次<PHONE_1>给<PERSON_1>"
        );
        assert_eq!(v.restore(&masked), text);
        // A literal placeholder the user wrote is left alone both ways.
        let tricky = "keep <PERSON_1> literal, call 13900139000";
        let v2 = Vault::new(Replace::Pseudonym);
        let m = v2.mask(&r, tricky);
        assert!(m.contains("<PERSON_1> literal") && !m.contains("13900139000"));
        assert_eq!(v2.restore(&m), tricky);
    }

    #[test]
    fn redaction_is_irreversible() {
        let v = Vault::new(Replace::Redact);
        let masked = v.mask(&recognizers(), "张经理 13800138000");
        assert_eq!(masked, "<PERSON> <PHONE>");
        assert_eq!(v.restore(&masked), masked);
    }

    #[test]
    fn split_pseudonyms_are_restored_across_chunks() {
        let r = recognizers();
        let v = Vault::new(Replace::Pseudonym);
        let masked = v.mask(&r, "请通知张经理");
        assert_eq!(masked, "请通知<PERSON_1>");
        let mut s = StreamRestorer::default();
        let mut out = String::new();
        for piece in ["已通知", "<PE", "RSON", "_1", ">，", "a < b", " done <"] {
            out.push_str(&s.push(&v, piece));
        }
        out.push_str(&s.finish(&v));
        assert_eq!(out, "已通知张经理，a < b done <");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn fragment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("张经理".to_string()),
                Just("13800138000".to_string()),
                Just("+86 139 0013 9000".to_string()),
                Just("zhang.wei@example.com".to_string()),
                Just("11010519491231002X".to_string()),
                Just("<PERSON_1>".to_string()),
                Just("<PHONE_".to_string()),
                Just("<".to_string()),
                Just(">".to_string()),
                "[a-zA-Z0-9 <>_@.:-]{0,8}",
                "\\PC{0,6}",
            ]
        }

        proptest! {
            /// mask → restore is the identity on any text, and a stream cut anywhere restores
            /// to the same text.
            #[test]
            fn mask_then_restore_is_the_identity(
                parts in proptest::collection::vec(fragment(), 0..16),
                cuts in proptest::collection::vec(0usize..64, 0..8),
            ) {
                let text: String = parts.concat();
                let r = recognizers();
                let v = Vault::new(Replace::Pseudonym);
                let masked = v.mask(&r, &text);
                prop_assert_eq!(v.restore(&masked), text.clone());
                let mut stream = StreamRestorer::default();
                let mut out = String::new();
                let mut at = 0;
                for c in cuts {
                    let mut end = (at + c).min(masked.len());
                    while !masked.is_char_boundary(end) {
                        end += 1;
                    }
                    out.push_str(&stream.push(&v, &masked[at..end]));
                    at = end;
                }
                out.push_str(&stream.push(&v, &masked[at..]));
                out.push_str(&stream.finish(&v));
                prop_assert_eq!(out, text);
            }
        }
    }
}
