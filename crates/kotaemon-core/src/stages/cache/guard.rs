//! The precision guard: a semantic hit must also agree with the question on the things
//! sentence embeddings blur — numbers, negation, and who does what to whom. A near-miss such
//! as "can I…" / "can't I…", "10 点" / "11 点" or "from A to B" / "from B to A" scores 0.9+
//! cosine, so the threshold alone cannot stop it. Cheap (microseconds), language-aware for
//! English and Chinese.

use std::collections::BTreeSet;

/// Why a candidate was refused (for metrics), or `None` when the two agree.
pub fn disagreement(query: &str, candidate: &str) -> Option<&'static str> {
    let (q, c) = (query.to_lowercase(), candidate.to_lowercase());
    if numbers(&q) != numbers(&c) {
        return Some("numbers");
    }
    if negations(&q) % 2 != negations(&c) % 2 {
        return Some("negation");
    }
    if roles_conflict(&roles(&q), &roles(&c)) {
        return Some("roles");
    }
    None
}

const EN_NUMBERS: &[(&str, u64)] = &[
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("twenty", 20),
    ("thirty", 30),
    ("hundred", 100),
    ("thousand", 1000),
    ("first", 1),
    ("second", 2),
    ("third", 3),
];

fn cjk_digit(c: char) -> Option<u64> {
    "零一二三四五六七八九"
        .chars()
        .position(|d| d == c)
        .map(|p| p as u64)
        .or(if c == '两' { Some(2) } else { None })
}

/// Numbers as values: digits, English number words, Chinese numerals (十一 = 11, 二十 = 20).
pub fn numbers(text: &str) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit()) {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            if let Ok(n) = s.parse() {
                out.insert(n);
            }
            continue;
        }
        if cjk_digit(c).is_some() || c == '十' || c == '百' {
            let mut value = 0u64;
            let mut current = 0u64;
            let start = i;
            while i < chars.len() {
                let ch = chars[i];
                if let Some(d) = cjk_digit(ch) {
                    current = d;
                } else if ch == '十' {
                    value += current.max(1) * 10;
                    current = 0;
                } else if ch == '百' {
                    value += current.max(1) * 100;
                    current = 0;
                } else {
                    break;
                }
                i += 1;
            }
            // A lone 一 inside a word (一起, 一下) is not a number.
            if !(i - start == 1 && c == '一') {
                out.insert(value + current);
            }
            continue;
        }
        i += 1;
    }
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if let Some((_, n)) = EN_NUMBERS.iter().find(|(w, _)| *w == word) {
            out.insert(*n);
        }
    }
    out
}

fn negations(text: &str) -> usize {
    let words = text
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty());
    let en = words
        .filter(|w| {
            matches!(
                *w,
                "not" | "no" | "never" | "without" | "cannot" | "nobody" | "nothing"
            ) || w.ends_with("n't")
        })
        .count();
    let zh = text
        .chars()
        .filter(|c| "不没别勿未无非".contains(*c))
        .count();
    // 不是…吗 / 是不是 questions are not negations of the statement.
    let zh_questions = text.matches("是不是").count()
        + text.matches("能不能").count()
        + text.matches("会不会").count()
        + text.matches("有没有").count();
    en + zh.saturating_sub(zh_questions)
}

/// (marker, argument) pairs: what follows "from", "to", "than", 从, 到, 给, 比 …
fn roles(text: &str) -> Vec<(&'static str, String)> {
    const EN: &[&str] = &["from", "to", "into", "than", "by", "for", "vs", "versus"];
    const ZH: &[(&str, &str)] = &[
        ("从", "from"),
        ("到", "to"),
        ("给", "for"),
        ("比", "than"),
        ("向", "to"),
        ("往", "to"),
        ("被", "by"),
    ];
    let mut out = Vec::new();
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for pair in words.windows(2) {
        if let Some(m) = EN.iter().find(|m| **m == pair[0]) {
            if pair[1].is_ascii() {
                out.push((*m, pair[1].to_string()));
            }
        }
    }
    let chars: Vec<char> = text.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if let Some((_, role)) = ZH.iter().find(|(m, _)| m.starts_with(*c)) {
            let arg: String = chars[i + 1..]
                .iter()
                .take_while(|c| !c.is_ascii() && !"的了吗呢？。，,".contains(**c))
                .take(2)
                .collect();
            if !arg.is_empty() {
                out.push((*role, arg));
            }
        }
    }
    out
}

/// Conflict: the same role is filled by different arguments that both texts mention, e.g.
/// "from beijing … to shanghai" vs "from shanghai … to beijing".
fn roles_conflict(a: &[(&'static str, String)], b: &[(&'static str, String)]) -> bool {
    let args_a: BTreeSet<&str> = a.iter().map(|(_, x)| x.as_str()).collect();
    let args_b: BTreeSet<&str> = b.iter().map(|(_, x)| x.as_str()).collect();
    a.iter().any(|(role, x)| {
        b.iter().any(|(r, y)| {
            r == role && x != y && args_b.contains(x.as_str()) && args_a.contains(y.as_str())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paraphrases_agree() {
        for (a, b) in [
            (
                "How do I reset my password?",
                "How can I change my password",
            ),
            ("明天上午10点开会", "明早十点有会议"),
            (
                "What's the weather in Paris today?",
                "Tell me today's weather in Paris",
            ),
            (
                "Book a flight from Beijing to Shanghai",
                "I need a flight from Beijing to Shanghai",
            ),
            ("能不能帮我订个会议室", "帮我订个会议室可以吗"),
        ] {
            assert_eq!(disagreement(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn near_misses_disagree() {
        for (a, b, why) in [
            (
                "Can I return the item after 30 days?",
                "Can I return the item after 14 days?",
                "numbers",
            ),
            ("明天上午10点开会", "明天上午11点开会", "numbers"),
            ("明天上午十点开会", "明天上午十一点开会", "numbers"),
            ("Can I bring my dog?", "Can't I bring my dog?", "negation"),
            ("我能参加吗", "我不能参加吗", "negation"),
            (
                "Is Python 2 supported?",
                "Is Python 3 supported?",
                "numbers",
            ),
            (
                "Transfer money from savings to checking",
                "Transfer money from checking to savings",
                "roles",
            ),
            ("从北京到上海的高铁", "从上海到北京的高铁", "roles"),
        ] {
            assert_eq!(disagreement(a, b), Some(why), "{a} / {b}");
        }
    }

    #[test]
    fn chinese_numerals_parse() {
        assert_eq!(numbers("十一点"), BTreeSet::from([11]));
        assert_eq!(numbers("二十三个"), BTreeSet::from([23]));
        assert_eq!(numbers("一起去"), BTreeSet::new());
        assert_eq!(numbers("三百"), BTreeSet::from([300]));
    }
}
