//! `rules` stage: intents defined in config (regex patterns or keyword sets, English and
//! Chinese) answered from a template on the device — no model, no network. First match wins.
//! It runs on every turn, follow-ups included, against the last user message.

use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::tools::ToolRegistry;
use crate::turn::{Reply, Turn};
use crate::wire::{LocalAnswer, Usage};
use async_trait::async_trait;
use futures::StreamExt;
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub enabled: bool,
    pub intents: Vec<IntentConfig>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            enabled: false,
            intents: Vec::new(),
        }
    }
}

/// One intent. It matches when any pattern matches, or when every keyword appears.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentConfig {
    /// Name in events and metrics.
    pub name: String,
    /// Regular expressions (case-insensitive) searched in the last user message. Named
    /// groups become template slots: `(?P<room>meeting room|会议室)` fills `{room}`.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Words that must all appear (case-insensitive).
    #[serde(default)]
    pub keywords: Vec<String>,
    /// The answer. Slots: named groups, and `{time}` (HH:MM), `{date}` (YYYY-MM-DD),
    /// `{weekday}` (Monday…), `{weekday_zh}` (星期一…), all in the device's time zone.
    pub answer: String,
    /// Run this tool directly (no model) before answering: e.g. `mqtt_publish` to switch a
    /// light. String values in `arguments` take the same slots as the answer.
    #[serde(default)]
    pub tool: Option<IntentTool>,
    /// The answer when the tool fails; `{error}` is the reason.
    #[serde(default = "default_error_answer")]
    pub error_answer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentTool {
    pub name: String,
    #[serde(default)]
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

fn default_error_answer() -> String {
    "Sorry, that did not work: {error} / 抱歉，操作没有成功：{error}".into()
}

const BUILTIN_SLOTS: &[&str] = &["time", "date", "weekday", "weekday_zh"];

impl RulesConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        let _ = Rules::compile(self, path).map_err(|mut e| p.append(&mut e));
    }
}

struct Intent {
    name: Arc<str>,
    patterns: Vec<Regex>,
    keywords: Vec<String>,
    answer: String,
    tool: Option<IntentTool>,
    error_answer: String,
}

impl Intent {
    /// The slots this message fills, if the intent matches it.
    fn matches(&self, text: &str) -> Option<Vec<(String, String)>> {
        for re in &self.patterns {
            if let Some(caps) = re.captures(text) {
                let slots = re
                    .capture_names()
                    .flatten()
                    .filter_map(|n| {
                        caps.name(n)
                            .map(|m| (n.to_string(), m.as_str().to_string()))
                    })
                    .collect();
                return Some(slots);
            }
        }
        let lower = text.to_lowercase();
        (!self.keywords.is_empty() && self.keywords.iter().all(|k| lower.contains(k.as_str())))
            .then(Vec::new)
    }
}

pub struct Rules {
    intents: Vec<Intent>,
    tools: Arc<ToolRegistry>,
}

impl Rules {
    /// `None` when disabled. Every bad pattern, template or tool is reported with its key path.
    pub fn new(
        config: &RulesConfig,
        tools: Arc<ToolRegistry>,
    ) -> Result<Option<Self>, Vec<String>> {
        let mut rules = Self::compile(config, "stages.rules")?;
        if config.enabled {
            let missing: Vec<String> = config
                .intents
                .iter()
                .enumerate()
                .filter_map(|(i, intent)| {
                    let name = &intent.tool.as_ref()?.name;
                    // MCP tools (`namespace__tool`) arrive after start-up.
                    (!name.contains("__") && tools.spec(name).is_none()).then(|| {
                        format!("stages.rules.intents[{i}].tool.name: no tool `{name}` is configured (see [tools])")
                    })
                })
                .collect();
            if !missing.is_empty() {
                return Err(missing);
            }
        }
        rules.tools = tools;
        Ok(config.enabled.then_some(rules))
    }

    fn compile(config: &RulesConfig, path: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut intents = Vec::new();
        for (i, intent) in config.intents.iter().enumerate() {
            let at = format!("{path}.intents[{i}]");
            if intent.patterns.is_empty() && intent.keywords.is_empty() {
                problems.push(format!("{at}: needs patterns or keywords"));
            }
            let mut patterns = Vec::new();
            for (j, pattern) in intent.patterns.iter().enumerate() {
                match RegexBuilder::new(pattern)
                    .case_insensitive(true)
                    .size_limit(1 << 20)
                    .build()
                {
                    Ok(re) => patterns.push(re),
                    Err(e) => problems.push(format!("{at}.patterns[{j}]: {e}")),
                }
            }
            let slots: Vec<&str> = patterns
                .iter()
                .flat_map(|re| re.capture_names().flatten())
                .collect();
            for slot in placeholders(&intent.answer) {
                if !BUILTIN_SLOTS.contains(&slot) && !slots.contains(&slot) {
                    problems.push(format!("{at}.answer: `{{{slot}}}` is neither a named group of its patterns nor one of {BUILTIN_SLOTS:?}"));
                }
            }
            intents.push(Intent {
                name: intent.name.as_str().into(),
                patterns,
                keywords: intent.keywords.iter().map(|k| k.to_lowercase()).collect(),
                answer: intent.answer.clone(),
                tool: intent.tool.clone(),
                error_answer: intent.error_answer.clone(),
            });
        }
        if problems.is_empty() {
            Ok(Rules {
                intents,
                tools: Arc::new(ToolRegistry::new()),
            })
        } else {
            Err(problems)
        }
    }

    /// The first intent matching `text`, and its rendered answer (templates only; tools are
    /// run by [`Rules::act`]).
    pub fn answer(
        &self,
        text: &str,
        now: chrono::DateTime<chrono::Local>,
    ) -> Option<(Arc<str>, String)> {
        self.intents.iter().find_map(|intent| {
            let slots = intent.matches(text)?;
            Some((intent.name.clone(), render(&intent.answer, &slots, now)))
        })
    }

    /// The first intent matching `text`: runs its tool if it has one, and renders the answer.
    async fn act(
        &self,
        turn: &Turn,
        text: &str,
        now: chrono::DateTime<chrono::Local>,
    ) -> Option<(Arc<str>, String)> {
        let (intent, slots) = self
            .intents
            .iter()
            .find_map(|intent| Some((intent, intent.matches(text)?)))?;
        let Some(tool) = &intent.tool else {
            return Some((intent.name.clone(), render(&intent.answer, &slots, now)));
        };
        let mut args = render_json(
            &serde_json::Value::Object(tool.arguments.clone()),
            &slots,
            now,
        );
        // Slots hold what the guard left in the text (pseudonyms); the tool gets real values,
        // the audit log the pseudonyms.
        let audited = args.clone();
        if let Some(pii) = &turn.pii {
            pii.restore_json(&mut args);
        }
        let result = self
            .tools
            .call_for_turn(
                turn,
                &tool.name,
                args,
                audited,
                format!("{}-rule", turn.id()),
            )
            .await;
        turn.ctx.annotate(|m| m.acted = true);
        let answer = match result {
            Ok(_) => render(&intent.answer, &slots, now),
            Err(e) => {
                tracing::warn!(turn = %turn.id(), tool = %tool.name, "rule's tool failed: {e}");
                let mut with_error = slots.clone();
                with_error.push(("error".into(), e.to_string()));
                render(&intent.error_answer, &with_error, now)
            }
        };
        Some((intent.name.clone(), answer))
    }
}

/// Fills slots in every string of a JSON value (a rule's tool arguments).
fn render_json(
    value: &serde_json::Value,
    slots: &[(String, String)],
    now: chrono::DateTime<chrono::Local>,
) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(render(s, slots, now)),
        Value::Array(a) => Value::Array(a.iter().map(|v| render_json(v, slots, now)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), render_json(v, slots, now)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn placeholders(template: &str) -> Vec<&str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .collect()
}

fn render(
    template: &str,
    slots: &[(String, String)],
    now: chrono::DateTime<chrono::Local>,
) -> String {
    use chrono::Datelike;
    const ZH: [&str; 7] = [
        "星期一",
        "星期二",
        "星期三",
        "星期四",
        "星期五",
        "星期六",
        "星期日",
    ];
    let mut out = template.to_string();
    let builtins = [
        ("time", now.format("%H:%M").to_string()),
        ("date", now.format("%Y-%m-%d").to_string()),
        ("weekday", now.format("%A").to_string()),
        (
            "weekday_zh",
            ZH[now.weekday().num_days_from_monday() as usize].to_string(),
        ),
    ];
    for (name, value) in slots
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .chain(builtins.iter().map(|(n, v)| (*n, v.clone())))
    {
        out = out.replace(&format!("{{{name}}}"), &value);
    }
    out
}

/// Splits an answer into stream pieces at word boundaries (or per character for CJK), so a
/// streamed rule answer looks like any other stream.
pub fn stream_pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices().skip(1) {
        if c == ' ' || !c.is_ascii() {
            pieces.push(&text[start..i]);
            start = i;
        }
    }
    pieces.push(&text[start..]);
    pieces.retain(|p| !p.is_empty());
    pieces
}

/// Replies with a text answered on the device, as JSON or as a stream.
pub fn local_reply(answer: &LocalAnswer, stream: bool) -> Reply {
    if stream {
        let chunks = answer.chunks(&stream_pieces(&answer.text));
        Reply::Stream(futures::stream::iter(chunks.into_iter().map(Ok)).boxed())
    } else {
        Reply::Complete(answer.completion())
    }
}

#[async_trait]
impl Stage for Rules {
    fn name(&self) -> &'static str {
        "rules"
    }

    async fn handle(&self, turn: Turn, next: Next<'_>) -> Result<Reply, TurnError> {
        // A client that brought its own tools or asked for structured output wants the model.
        let eligible =
            turn.request.tools.is_none() && !turn.request.extra.contains_key("response_format");
        let matched = match eligible.then(|| turn.request.last_user_text()).flatten() {
            Some(text) => self.act(&turn, text, chrono::Local::now()).await,
            None => None,
        };
        let Some((intent, text)) = matched else {
            turn.ctx.emit(TurnEvent::StageDecided {
                turn: turn.id().clone(),
                stage: self.name(),
                decision: "passed",
            });
            return next.run(turn).await;
        };
        turn.ctx.emit(TurnEvent::StageDecided {
            turn: turn.id().clone(),
            stage: self.name(),
            decision: "answered",
        });
        turn.ctx.emit(TurnEvent::RuleMatched {
            turn: turn.id().clone(),
            intent,
        });
        turn.ctx.answered_on_device("rules", &text);
        let answer = LocalAnswer::new("rules", &turn.request.model, text, Usage::default());
        Ok(local_reply(&answer, turn.request.wants_stream()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn rules(toml_text: &str) -> Result<Rules, Vec<String>> {
        let cfg: RulesConfig = toml::from_str(toml_text).unwrap();
        Rules::compile(&cfg, "stages.rules")
    }

    const SAMPLE: &str = r#"
        enabled = true
        [[intents]]
        name = "greeting"
        patterns = ['^\s*(hi|hello|hey)[\s!.]*$', '^\s*(你好|您好)[\s!！。]*$']
        answer = "Hello!"
        [[intents]]
        name = "time"
        patterns = ['^\s*what time is it\??\s*$', '现在几点']
        answer = "It is {time} / 现在是{time}"
        [[intents]]
        name = "light"
        patterns = ['turn (?P<state>on|off) the (?P<room>meeting room|kitchen) light', '(?P<state>打开|关闭)(?P<room>会议室)的?灯']
        answer = "OK: {room} light {state}"
        [[intents]]
        name = "thanks"
        keywords = ["thank", "you"]
        answer = "You're welcome."
    "#;

    fn at_ten() -> chrono::DateTime<chrono::Local> {
        chrono::Local
            .with_ymd_and_hms(2026, 11, 25, 10, 5, 0)
            .single()
            .unwrap()
    }

    #[test]
    fn english_and_chinese_intents_with_slots() {
        let r = rules(SAMPLE).unwrap();
        assert_eq!(r.answer("Hello!", at_ten()).unwrap().1, "Hello!");
        assert_eq!(r.answer("您好！", at_ten()).unwrap().1, "Hello!");
        assert_eq!(
            r.answer("现在几点了？", at_ten()).unwrap().1,
            "It is 10:05 / 现在是10:05"
        );
        assert_eq!(
            r.answer("please turn ON the Meeting Room light", at_ten())
                .unwrap()
                .1,
            "OK: Meeting Room light ON"
        );
        assert_eq!(
            r.answer("打开会议室的灯", at_ten()).unwrap().1,
            "OK: 会议室 light 打开"
        );
        assert_eq!(
            r.answer("Thank you so much", at_ten()).unwrap().0.as_ref(),
            "thanks"
        );
    }

    #[test]
    fn near_misses_are_left_to_the_model() {
        let r = rules(SAMPLE).unwrap();
        for text in [
            "hi, can you explain quantum physics?",
            "你好，帮我写一封邮件",
            "what time is it in Tokyo?",
            "thanks",
        ] {
            assert!(r.answer(text, at_ten()).is_none(), "{text} must not match");
        }
    }

    #[test]
    fn bad_patterns_and_unknown_slots_are_reported_with_paths() {
        let err = rules("[[intents]]\nname='a'\npatterns=['(unclosed']\nanswer='x {nope}'\n[[intents]]\nname='b'\nanswer='y'").err().expect("must be refused");
        let all = err.join("\n");
        assert!(all.contains("stages.rules.intents[0].patterns[0]"), "{all}");
        assert!(
            all.contains("stages.rules.intents[0].answer") && all.contains("{nope}"),
            "{all}"
        );
        assert!(
            all.contains("stages.rules.intents[1]: needs patterns or keywords"),
            "{all}"
        );
    }

    #[test]
    fn stream_pieces_rebuild_the_text() {
        for text in ["Hello there, friend", "现在是10:05", "OK"] {
            assert_eq!(stream_pieces(text).concat(), text);
        }
    }
}
