//! Recognizers: where the personal data in a text is. Each finds candidate spans with a
//! linear-time regex (the `regex` crate cannot backtrack catastrophically) or an Aho-Corasick
//! automaton over the contacts directory, then validates them (ID checksum, Luhn, address
//! parsing, digit boundaries). Overlaps are resolved longest-first.

use crate::tools::contacts::Directory;
use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;
use std::net::{Ipv4Addr, Ipv6Addr};

/// What kind of personal data a span is; its label names the pseudonym (`<PHONE_1>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    Person,
    Email,
    Phone,
    IdNumber,
    BankCard,
    Ip,
    Credential,
    Custom(String),
}

impl Entity {
    pub fn label(&self) -> String {
        match self {
            Entity::Person => "PERSON".into(),
            Entity::Email => "EMAIL".into(),
            Entity::Phone => "PHONE".into(),
            Entity::IdNumber => "ID".into(),
            Entity::BankCard => "CARD".into(),
            Entity::Ip => "IP".into(),
            Entity::Credential => "CREDENTIAL".into(),
            Entity::Custom(name) => name.to_ascii_uppercase(),
        }
    }

    /// Bounded metric/config names.
    pub fn kind(&self) -> &str {
        match self {
            Entity::Person => "person",
            Entity::Email => "email",
            Entity::Phone => "phone",
            Entity::IdNumber => "id_number",
            Entity::BankCard => "bank_card",
            Entity::Ip => "ip",
            Entity::Credential => "credential",
            Entity::Custom(_) => "custom",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub entity: Entity,
}

pub struct Recognizers {
    email: Regex,
    phone: Regex,
    digits: Regex,
    ipv4: Regex,
    ipv6: Regex,
    credential: Regex,
    names: Option<AhoCorasick>,
    custom: Vec<(Entity, Regex)>,
}

/// Titles that make "张经理" / "Manager Zhang" out of a contact.
const ZH_TITLES: &[&str] = &[
    "经理", "总监", "总", "主任", "部长", "老师", "工", "博士", "教授",
];
const ZH_POLITE: &[&str] = &["先生", "女士", "小姐"];
const EN_TITLES: &[&str] = &[
    "Mr.",
    "Mr",
    "Mrs.",
    "Mrs",
    "Ms.",
    "Ms",
    "Dr.",
    "Dr",
    "Manager",
    "Director",
    "President",
];

/// Every way people refer to the contacts: full names, aliases, surname + title.
fn name_forms(directory: &Directory) -> Vec<String> {
    let mut forms = Vec::new();
    for c in directory.contacts() {
        let name = c.name.trim();
        if name.chars().count() >= 2 {
            forms.push(name.to_string());
        }
        forms.extend(
            c.aliases
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| a.chars().count() >= 2),
        );
        let is_cjk = name.chars().next().is_some_and(|ch| !ch.is_ascii());
        if is_cjk {
            let surname: String = name.chars().take(1).collect();
            for t in ZH_TITLES {
                if c.title.contains(t) {
                    forms.push(format!("{surname}{t}"));
                }
            }
            for t in ZH_POLITE {
                forms.push(format!("{surname}{t}"));
            }
        } else {
            // "Li Na" or "Na Li": either word may be the family name.
            let words: Vec<&str> = name.split_whitespace().collect();
            for family in [words.first(), words.last()].into_iter().flatten() {
                for t in EN_TITLES {
                    forms.push(format!("{t} {family}"));
                }
            }
        }
    }
    forms.sort();
    forms.dedup();
    forms
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants checked by the unit tests.
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad built-in pattern {pattern}: {e}"))
}

impl Recognizers {
    pub fn new(directory: &Directory, custom: &[(String, String)]) -> Result<Self, String> {
        let forms = name_forms(directory);
        let names = if forms.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .ascii_case_insensitive(true)
                    .build(&forms)
                    .map_err(|e| format!("contacts: {e}"))?,
            )
        };
        let mut compiled = Vec::new();
        for (label, pattern) in custom {
            let r = regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("custom `{label}`: {e}"))?;
            compiled.push((Entity::Custom(label.clone()), r));
        }
        Ok(Recognizers {
            email: re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
            // +86 138 0013 8000, 13800138000, 010-12345678, +44 20 7946 0958
            phone: re(r"\+?\d[\d \-]{6,18}\d"),
            digits: re(r"\d[\d ]{11,22}[\dXx]"),
            ipv4: re(r"\d{1,3}(?:\.\d{1,3}){3}"),
            ipv6: re(r"[0-9A-Fa-f:]*:[0-9A-Fa-f:]+"),
            credential: re(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@"),
            names,
            custom: compiled,
        })
    }

    /// Every recognized span, non-overlapping, in text order.
    pub fn find(&self, text: &str) -> Vec<Span> {
        let mut spans = Vec::new();
        let mut push =
            |start: usize, end: usize, entity: Entity| spans.push(Span { start, end, entity });
        for m in self.credential.find_iter(text) {
            // The user:password part, not the scheme or host.
            let s = m.as_str();
            let after_scheme = s.find("://").map(|i| i + 3).unwrap_or(0);
            push(m.start() + after_scheme, m.end() - 1, Entity::Credential);
        }
        for m in self.email.find_iter(text) {
            push(m.start(), m.end(), Entity::Email);
        }
        for m in self.digits.find_iter(text) {
            let (s, e) = trim_span(text, m.start(), m.end());
            if !digit_bounded(text, s, e) {
                continue;
            }
            let compact: String = text[s..e].chars().filter(|c| !c.is_whitespace()).collect();
            if compact.len() == 18 && china_id_valid(&compact) {
                push(s, e, Entity::IdNumber);
            } else if (13..=19).contains(&compact.len())
                && compact.chars().all(|c| c.is_ascii_digit())
                && luhn_valid(&compact)
            {
                push(s, e, Entity::BankCard);
            }
        }
        for m in self.phone.find_iter(text) {
            let (s, e) = trim_span(text, m.start(), m.end());
            if digit_bounded(text, s, e) && phone_like(&text[s..e]) {
                push(s, e, Entity::Phone);
            }
        }
        for m in self.ipv4.find_iter(text) {
            if digit_bounded(text, m.start(), m.end()) && m.as_str().parse::<Ipv4Addr>().is_ok() {
                push(m.start(), m.end(), Entity::Ip);
            }
        }
        for m in self.ipv6.find_iter(text) {
            let s = m.as_str().trim_end_matches(':');
            if s.matches(':').count() >= 2 && s.parse::<Ipv6Addr>().is_ok() {
                push(m.start(), m.start() + s.len(), Entity::Ip);
            }
        }
        if let Some(names) = &self.names {
            for m in names.find_iter(text) {
                if latin_word_bounded(text, m.start(), m.end()) {
                    push(m.start(), m.end(), Entity::Person);
                }
            }
        }
        for (entity, r) in &self.custom {
            for m in r.find_iter(text) {
                if m.end() > m.start() {
                    push(m.start(), m.end(), entity.clone());
                }
            }
        }
        resolve_overlaps(spans)
    }
}

/// Credentials first (the `user:pass@host` of a URL must not lose to an email-like match),
/// then longest, then earliest; a span overlapping a kept one is dropped.
fn resolve_overlaps(mut spans: Vec<Span>) -> Vec<Span> {
    let rank = |s: &Span| u8::from(s.entity != Entity::Credential);
    spans.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<Span> = Vec::new();
    for s in spans {
        if kept.iter().all(|k| s.end <= k.start || s.start >= k.end) {
            kept.push(s);
        }
    }
    kept.sort_by_key(|s| s.start);
    kept
}

fn trim_span(text: &str, mut s: usize, mut e: usize) -> (usize, usize) {
    let b = text.as_bytes();
    while s < e && matches!(b[s], b' ' | b'-') {
        s += 1;
    }
    while e > s && matches!(b[e - 1], b' ' | b'-') {
        e -= 1;
    }
    (s, e)
}

/// Not part of a longer run of digits (or letters, for ID numbers ending in X).
fn digit_bounded(text: &str, s: usize, e: usize) -> bool {
    let before = text[..s].chars().next_back();
    let after = text[e..].chars().next();
    !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '.')
        && !after.is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A Latin name must not be glued to other Latin letters ("Li" inside "Lisbon").
fn latin_word_bounded(text: &str, s: usize, e: usize) -> bool {
    let first = text[s..].chars().next();
    if !first.is_some_and(|c| c.is_ascii_alphabetic()) {
        return true;
    }
    let before = text[..s].chars().next_back();
    let after = text[e..].chars().next();
    !before.is_some_and(|c| c.is_ascii_alphanumeric())
        && !after.is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Chinese mobile (1[3-9] + 9 digits, optional +86), landline (0 + area code + 7–8 digits),
/// or international E.164 (+ and 8–15 digits).
fn phone_like(s: &str) -> bool {
    let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    let plus = s.starts_with('+');
    let national = digits
        .strip_prefix("86")
        .filter(|_| plus)
        .unwrap_or(&digits);
    let mobile = national.len() == 11
        && national.starts_with('1')
        && matches!(national.as_bytes()[1], b'3'..=b'9');
    let landline = !plus && national.starts_with('0') && (10..=12).contains(&national.len());
    let e164 = plus && (8..=15).contains(&digits.len()) && !digits.starts_with('0');
    mobile || landline || e164
}

/// GB 11643 checksum of an 18-character resident ID.
pub fn china_id_valid(id: &str) -> bool {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = id.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b[..17]
        .iter()
        .zip(W)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == b[17].to_ascii_uppercase()
}

pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(c - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::contacts::Contact;

    fn recognizers() -> Recognizers {
        let dir = Directory::new(vec![
            Contact {
                name: "张伟".into(),
                email: "zhang.wei@example.com".into(),
                title: "产品经理".into(),
                aliases: vec!["Manager Zhang".into()],
                ..Default::default()
            },
            Contact {
                name: "Li Na".into(),
                title: "Director".into(),
                ..Default::default()
            },
        ]);
        Recognizers::new(&dir, &[("employee".into(), r"EMP-\d{5}".into())]).unwrap()
    }

    fn kinds(text: &str) -> Vec<(String, &str)> {
        let r = recognizers();
        r.find(text)
            .into_iter()
            .map(|s| (s.entity.label(), &text[s.start..s.end]))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(l, t)| (l, t))
            .collect()
    }

    #[test]
    fn finds_each_kind_in_chinese_and_english_text() {
        let text = "请张经理打电话13800138000或+86 139 0013 9000，座机010-62345678，邮箱zhang.wei@example.com，身份证11010519491231002X，卡号6222020200112233446？Mr. Li called from 192.168.1.20 and fe80::1ff:fe23:4567:890a about EMP-12345; see https://bob:hunter2@git.example.com/x";
        let found = kinds(text);
        let has = |label: &str, value: &str| found.iter().any(|(l, v)| l == label && *v == value);
        assert!(has("PERSON", "张经理"), "{found:?}");
        assert!(has("PHONE", "13800138000"), "{found:?}");
        assert!(has("PHONE", "+86 139 0013 9000"), "{found:?}");
        assert!(has("PHONE", "010-62345678"), "{found:?}");
        assert!(has("EMAIL", "zhang.wei@example.com"), "{found:?}");
        assert!(has("ID", "11010519491231002X"), "{found:?}");
        assert!(has("IP", "192.168.1.20"), "{found:?}");
        assert!(has("IP", "fe80::1ff:fe23:4567:890a"), "{found:?}");
        assert!(has("EMPLOYEE", "EMP-12345"), "{found:?}");
        assert!(has("CREDENTIAL", "bob:hunter2"), "{found:?}");
        assert!(has("CARD", "6222020200112233446"), "{found:?}");
        assert!(has("PERSON", "Mr. Li"), "{found:?}");
    }

    #[test]
    fn validation_keeps_ordinary_numbers_and_words() {
        let found =
            kinds("Order 12345678 costs 1999 yuan, version 1.2.3.4567, in Lisbon at 10:30, 共3人");
        assert!(found.is_empty(), "{found:?}");
        // Wrong checksum: not an ID; wrong Luhn: not a card.
        assert!(!china_id_valid("110105194912310021"));
        assert!(china_id_valid("11010519491231002X"));
        assert!(luhn_valid("4539578763621486"));
        assert!(!luhn_valid("4539578763621487"));
    }

    #[test]
    fn long_inputs_are_linear() {
        let long = "1".repeat(200_000) + &"a@".repeat(50_000) + &":".repeat(50_000);
        let r = recognizers();
        let _ = r.find(&long);
    }
}
