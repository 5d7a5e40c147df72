//! The precision guard: a semantic hit must also agree with the question on the things
//! sentence embeddings blur — numbers and dates, negation and opposite actions, who does what
//! to whom, and which thing is meant. A near-miss such as "can I…" / "can't I…", "10 点" /
//! "11 点", "打开" / "关闭", "from A to B" / "from B to A" or "reset my password" / "reset my
//! router" scores 0.9+ cosine, so the threshold alone cannot stop it. Cheap (microseconds,
//! no allocation-heavy parsing), language-aware for English and Chinese. Measured with
//! `kotaemon bench cache` on `tests/data/cache_pairs.tsv`.

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
    let (tq, tc) = (tokens(&q), tokens(&c));
    if opposite(&q, &tq, &c, &tc) {
        return Some("opposite");
    }
    if time_conflict(&q, &tq, &c, &tc) {
        return Some("time");
    }
    if roles_conflict(&roles(&q), &roles(&c)) || swapped(&tq, &tc) {
        return Some("roles");
    }
    substitution(&tq, &tc)
}

/// Words (ASCII runs, apostrophes kept) and single CJK characters; the rest separates.
fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, ch) in text.char_indices() {
        if ch.is_ascii_alphanumeric() || (ch == '\'' && start.is_some()) {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            out.push(&text[s..i]);
        }
        if is_cjk(ch) {
            out.push(&text[i..i + ch.len_utf8()]);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

fn is_cjk(ch: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&ch) || ('\u{3400}'..='\u{4dbf}').contains(&ch)
}

/// Opposite actions and directions: (one side, the other side). English entries are whole
/// words; Chinese ones substrings (so never a lone 开 or 关, which are in 开会 and 关于).
const OPPOSITES: &[(&[&str], &[&str])] = &[
    (&["on"], &["off"]),
    (
        &["open", "opens", "opened", "reopen"],
        &["close", "closes", "closed", "shut"],
    ),
    (&["lock", "locked"], &["unlock", "unlocked"]),
    (
        &["enable", "enabled", "activate"],
        &["disable", "disabled", "deactivate"],
    ),
    (
        &["start", "begin", "resume"],
        &["stop", "end", "pause", "finish"],
    ),
    (&["mute"], &["unmute"]),
    (&["connect", "connected"], &["disconnect", "disconnected"]),
    (&["accept"], &["decline", "reject"]),
    (&["add"], &["remove", "delete"]),
    (
        &[
            "increase", "raise", "up", "higher", "louder", "brighter", "warmer", "gain",
        ],
        &[
            "decrease", "lower", "down", "reduce", "quieter", "dimmer", "dim", "cooler", "lose",
        ],
    ),
    (&["high"], &["low"]),
    (&["before"], &["after"]),
    (&["buy"], &["sell"]),
    (&["arrive", "arrival"], &["depart", "departure", "leave"]),
    (&["subscribe"], &["unsubscribe"]),
    (&["safe"], &["unsafe"]),
    (&["best"], &["worst"]),
    (
        &[
            "打开",
            "开启",
            "开灯",
            "开一下",
            "启动",
            "开着",
            "开门",
            "营业",
        ],
        &[
            "关闭",
            "关掉",
            "关上",
            "关一下",
            "关灯",
            "关着",
            "关门",
            "闭馆",
            "打烊",
            "熄灭",
        ],
    ),
    (&["锁上", "锁门", "上锁", "锁好"], &["解锁", "开锁"]),
    (
        &[
            "调高", "调大", "开大", "升高", "提高", "增加", "加大", "调亮", "变多", "涨", "增肥",
        ],
        &[
            "调低", "调小", "关小", "降低", "减少", "减小", "调暗", "变少", "跌", "减肥",
        ],
    ),
    (
        &["之前", "以前", "饭前", "前提醒"],
        &["之后", "以后", "饭后", "后提醒"],
    ),
    (&["开始"], &["结束"]),
    (&["连接", "连上"], &["断开"]),
    (&["接受", "同意"], &["拒绝"]),
    (&["添加", "加入"], &["删除", "移除"]),
    (&["解冻"], &["冻结"]),
    (&["买", "购买"], &["卖", "出售"]),
];

fn has(text: &str, toks: &[&str], word: &str) -> bool {
    if word.is_ascii() {
        toks.contains(&word)
    } else {
        text.contains(word)
    }
}

/// +1 / -1 for which side of a pair the text takes; 0 for neither or both.
fn side(text: &str, toks: &[&str], (plus, minus): (&[&str], &[&str])) -> i8 {
    let p = plus.iter().any(|w| has(text, toks, w));
    let m = minus.iter().any(|w| has(text, toks, w));
    i8::from(p) - i8::from(m)
}

fn opposite(q: &str, tq: &[&str], c: &str, tc: &[&str]) -> bool {
    OPPOSITES.iter().any(|pair| {
        let (a, b) = (side(q, tq, *pair), side(c, tc, *pair));
        a != 0 && b != 0 && a != b
    })
}

/// Relative days, parts of the day, weekdays and months, as (class, value) tags.
const TIME_WORDS: &[(&str, &str, i8)] = &[
    ("today", "day", 0),
    ("tonight", "day", 0),
    ("tomorrow", "day", 1),
    ("yesterday", "day", -1),
    ("今天", "day", 0),
    ("今晚", "day", 0),
    ("今早", "day", 0),
    ("今日", "day", 0),
    ("明天", "day", 1),
    ("明早", "day", 1),
    ("明晚", "day", 1),
    ("明日", "day", 1),
    ("后天", "day", 2),
    ("昨天", "day", -1),
    ("昨晚", "day", -1),
    ("前天", "day", -2),
    ("am", "part", 0),
    ("morning", "part", 0),
    ("pm", "part", 1),
    ("afternoon", "part", 1),
    ("evening", "part", 1),
    ("tonight", "part", 1),
    ("上午", "part", 0),
    ("早上", "part", 0),
    ("早晨", "part", 0),
    ("清晨", "part", 0),
    ("今早", "part", 0),
    ("明早", "part", 0),
    ("下午", "part", 1),
    ("晚上", "part", 1),
    ("傍晚", "part", 1),
    ("今晚", "part", 1),
    ("明晚", "part", 1),
    ("昨晚", "part", 1),
    ("monday", "weekday", 1),
    ("tuesday", "weekday", 2),
    ("wednesday", "weekday", 3),
    ("thursday", "weekday", 4),
    ("friday", "weekday", 5),
    ("saturday", "weekday", 6),
    ("sunday", "weekday", 7),
    ("january", "month", 1),
    ("february", "month", 2),
    ("march", "month", 3),
    ("april", "month", 4),
    ("june", "month", 6),
    ("july", "month", 7),
    ("august", "month", 8),
    ("september", "month", 9),
    ("october", "month", 10),
    ("november", "month", 11),
    ("december", "month", 12),
];

fn time_tags(text: &str, toks: &[&str]) -> BTreeSet<(&'static str, i8)> {
    TIME_WORDS
        .iter()
        .filter(|(w, _, _)| has(text, toks, w))
        .map(|(_, class, v)| (*class, *v))
        .collect()
}

/// Both texts name a day (or part of day, weekday, month) and the names differ.
fn time_conflict(q: &str, tq: &[&str], c: &str, tc: &[&str]) -> bool {
    let (a, b) = (time_tags(q, tq), time_tags(c, tc));
    ["day", "part", "weekday", "month"].iter().any(|class| {
        let x: BTreeSet<i8> = a.iter().filter(|t| t.0 == *class).map(|t| t.1).collect();
        let y: BTreeSet<i8> = b.iter().filter(|t| t.0 == *class).map(|t| t.1).collect();
        !x.is_empty() && !y.is_empty() && x != y
    })
}

/// The common frame of two token lists: lengths of the shared prefix and suffix.
fn frame(a: &[&str], b: &[&str]) -> (usize, usize) {
    let pre = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let max_suf = a.len().min(b.len()) - pre;
    let suf = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take(max_suf)
        .take_while(|(x, y)| x == y)
        .count();
    (pre, suf)
}

/// PAWS-style swap: "X m Y" vs "Y m X" inside a shared frame ("does sarah report to tom" /
/// "does tom report to sarah", 猫追狗 / 狗追猫). A non-empty middle keeps "turn on the tv" /
/// "turn the tv on" apart from it.
fn swapped(a: &[&str], b: &[&str]) -> bool {
    fn content<'a>(t: &[&'a str]) -> Vec<&'a str> {
        t.iter()
            .copied()
            .filter(|w| !matches!(*w, "a" | "an" | "the"))
            .collect()
    }
    let (a, b) = (&content(a)[..], &content(b)[..]);
    if a.len() != b.len() || a == b {
        return false;
    }
    let (pre, suf) = frame(a, b);
    let (x, y) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let n = x.len();
    (1..n).any(|i| {
        (1..n - i).any(|j| {
            // x = X(i) M Y(j), y = Y(j) M X(i)
            let (xa, xm, xb) = (&x[..i], &x[i..n - j], &x[n - j..]);
            xa != xb && y[..j] == *xb && y[j..n - i] == *xm && y[n - i..] == *xa
        })
    })
}

/// Words that change the wording, not the subject: a substitution containing one of them
/// is a paraphrase move ("how" / "what", 会下 / 有), not another thing.
const FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "my", "your", "our", "his", "her", "their", "me", "i", "you", "it", "is",
    "are", "was", "be", "do", "does", "did", "can", "could", "will", "would", "should", "may",
    "what", "what's", "how", "when", "where", "why", "which", "who", "whose", "to", "for", "of",
    "in", "on", "at", "by", "with", "from", "some", "any", "this", "that", "these", "those",
    "please", "way", "much", "many", "get", "make", "there", "here", "and", "or", "so", "up",
];
const FUNCTION_CHARS: &str =
    "的了吗呢吧啊呀么什怎如何哪几多少是有会能可要想在把被给让请帮我你他她它们这那个一些点不没很太更最好大小高低";

fn is_function(tok: &str) -> bool {
    if tok.is_ascii() {
        FUNCTION_WORDS.contains(&tok)
    } else {
        FUNCTION_CHARS.contains(tok)
    }
}

/// One slot filled differently in an otherwise identical question: "reset my password" /
/// "reset my router", 打开客厅的灯 / 打开卧室的灯, "the capital of france" / "… germany".
/// English needs a shared beginning (a changed first word is usually a verb paraphrase:
/// "call" / "phone"); a prefix pair like safe / unsafe is an opposite.
fn substitution(a: &[&str], b: &[&str]) -> Option<&'static str> {
    let (pre, suf) = frame(a, b);
    if pre + suf < 2 {
        return None;
    }
    // Articles do not change the thing: "a tv" / "money".
    fn article(w: &&&str) -> bool {
        matches!(**w, "a" | "an" | "the")
    }
    let trim = |s: &[&str]| -> (usize, usize) {
        let lead = s.iter().take_while(article).count();
        (
            lead,
            s.len() - s[lead..].iter().rev().take_while(article).count(),
        )
    };
    let (x, y) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let ((xs, xe), (ys, ye)) = (trim(x), trim(y));
    let (x, y) = (&x[xs..xe], &y[ys..ye]);
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let cjk = x.iter().chain(y).all(|t| !t.is_ascii());
    let ascii = x.iter().chain(y).all(|t| t.is_ascii());
    if let ([p], [q]) = (x, y) {
        for prefix in ["un", "dis", "in", "im", "non"] {
            if p.strip_prefix(prefix) == Some(*q) || q.strip_prefix(prefix) == Some(*p) {
                return Some("opposite");
            }
        }
    }
    let fits = if cjk {
        x.len() <= 3 && y.len() <= 3
    } else {
        ascii && pre > 0 && x.len() <= 2 && y.len() <= 2
    };
    let content = !x.iter().chain(y).any(|t| is_function(t));
    (fits && content).then_some("entity")
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
    let chars: Vec<char> = text.chars().collect();
    let zh = chars
        .iter()
        .filter(|c| "不没别勿未无非".contains(**c))
        .count();
    // A-not-A questions (是不是, 冷不冷, 有没有, 可不可以) and "…了没(有)" ask; they do not negate.
    let zh_questions = (0..chars.len())
        .filter(|&i| {
            matches!(chars[i], '不' | '没')
                && ((i > 0 && chars.get(i + 1) == Some(&chars[i - 1]))
                    || (chars[i] == '没' && i > 0 && chars[i - 1] == '了'))
        })
        .count();
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
    fn opposite_actions_disagree() {
        for (a, b) in [
            ("打开会议室的灯", "关闭会议室的灯"),
            ("把音量调高", "把音量调低"),
            ("这个药饭前吃", "这个药饭后吃"),
            ("Turn on the heater", "Turn off the heater"),
            ("Lock the car.", "Unlock the car."),
            (
                "Is the meeting before lunch?",
                "Is the meeting after lunch?",
            ),
            (
                "Is it safe to eat raw eggs?",
                "Is it unsafe to eat raw eggs?",
            ),
        ] {
            assert_eq!(disagreement(a, b), Some("opposite"), "{a} / {b}");
        }
        // Same direction in other words.
        assert_eq!(disagreement("Dim the lights", "Lower the lights"), None);
        assert_eq!(disagreement("药店几点关门？", "药店什么时候关门？"), None);
    }

    #[test]
    fn days_and_parts_of_day_disagree() {
        for (a, b) in [
            ("What's the weather tomorrow?", "What's the weather today?"),
            ("Wake me up at 6 am.", "Wake me up at 6 pm."),
            ("早上七点叫我", "晚上七点叫我"),
            ("昨天的会议纪要", "今天的会议纪要"),
            (
                "What's on my calendar for Tuesday?",
                "What's on my calendar for Thursday?",
            ),
        ] {
            assert_eq!(disagreement(a, b), Some("time"), "{a} / {b}");
        }
        assert_eq!(disagreement("明天上午10点开会", "明早十点有会议"), None);
    }

    #[test]
    fn swapped_arguments_disagree() {
        for (a, b) in [
            ("Does Sarah report to Tom?", "Does Tom report to Sarah?"),
            ("Why do dogs chase cats?", "Why do cats chase dogs?"),
            (
                "How do I convert a PDF to Word?",
                "How do I convert Word to PDF?",
            ),
            ("猫追狗", "狗追猫"),
            ("北京比上海大吗", "上海比北京大吗"),
            ("老张是老李的领导吗", "老李是老张的领导吗"),
        ] {
            assert_eq!(disagreement(a, b), Some("roles"), "{a} / {b}");
        }
        assert_eq!(disagreement("Turn on the TV", "Turn the TV on"), None);
    }

    #[test]
    fn another_thing_in_the_same_frame_disagrees() {
        for (a, b) in [
            ("How do I reset my password?", "How do I reset my router?"),
            (
                "What is the function of a TV?",
                "What is the function of money?",
            ),
            ("打开客厅的灯", "打开卧室的灯"),
            ("电视的作用是什么？", "钱的作用是什么？"),
            ("约王总明天开会", "约刘总明天开会"),
        ] {
            assert_eq!(disagreement(a, b), Some("entity"), "{a} / {b}");
        }
        // Wording changes are not another thing.
        for (a, b) in [
            ("Call my wife.", "Phone my wife."),
            ("今天会下雨吗？", "今天有雨吗？"),
            ("花呗怎么还款", "花呗如何还款"),
        ] {
            assert_eq!(disagreement(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn a_not_a_questions_are_not_negations() {
        assert_eq!(disagreement("今天外面冷不冷", "今天外面冷吗"), None);
        assert_eq!(disagreement("今天股市涨了没有", "今天股市涨了吗"), None);
        assert_eq!(disagreement("可不可以带狗", "可以带狗吗"), None);
        assert_eq!(negations("我不可以取消订单吗"), 1);
    }

    #[test]
    fn chinese_numerals_parse() {
        assert_eq!(numbers("十一点"), BTreeSet::from([11]));
        assert_eq!(numbers("二十三个"), BTreeSet::from([23]));
        assert_eq!(numbers("一起去"), BTreeSet::new());
        assert_eq!(numbers("三百"), BTreeSet::from([300]));
    }
}
