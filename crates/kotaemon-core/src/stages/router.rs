//! `router` stage: decides per turn between the local model and the cloud, from signals that
//! are cheap on a Pi. Every decision is an event and a metric with its reason, and a response
//! header. Clients can force a route with `x-kotaemon-route: local|cloud` or the local model's
//! name.

use crate::cost::{CloudBudget, OnExhausted};
use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::turn::{Reply, Route, Turn};
use crate::upstream::pool::Pool;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    pub enabled: bool,
    /// Turns scoring below this complexity (0 to 1) go to the local model while the cloud is
    /// healthy; 0 sends everything to the cloud unless it is down.
    pub local_below_complexity: f32,
    /// Longer prompts (characters, whole conversation) always go to the cloud.
    pub max_local_prompt_chars: usize,
    /// Conversations with more messages than this always go to the cloud.
    pub max_local_messages: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            enabled: true,
            local_below_complexity: 0.2,
            max_local_prompt_chars: 1_500,
            max_local_messages: 8,
        }
    }
}

impl RouterConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.local_below_complexity) {
            p.push(format!(
                "{path}.local_below_complexity: must be between 0 and 1"
            ));
        }
    }
}

/// A route and the reason code behind it (bounded: metric label and header).
pub type Decision = (Route, &'static str);

pub struct Router {
    config: RouterConfig,
    pool: Arc<Pool>,
    budget: Arc<CloudBudget>,
}

impl Router {
    pub fn new(
        config: &RouterConfig,
        pool: Arc<Pool>,
        budget: Arc<CloudBudget>,
    ) -> Result<Option<Self>, Vec<String>> {
        let mut p = Vec::new();
        config.validate("stages.router", &mut p);
        if !p.is_empty() {
            return Err(p);
        }
        Ok(config.enabled.then(|| Router {
            config: config.clone(),
            pool,
            budget,
        }))
    }

    pub fn decide(&self, turn: &Turn) -> Decision {
        let local_available = self.pool.has_local();
        match turn.hints.route {
            // Forced local stays local even without a model (the client may not want the
            // cloud to see this turn): the llm stage then answers 503 no_local_model.
            Some(Route::Local) => return (Route::Local, "forced_header"),
            _ => {}
        }
        // A spent budget outranks a client's wish for the cloud: that is what a budget is for.
        // With no local model, the llm stage refuses the turn (429 insufficient_quota).
        if let Some(spent) = self.budget.exhausted_for(turn.hints.client.as_deref()) {
            return match (spent.policy, local_available) {
                (OnExhausted::Local, true) => (Route::Local, "budget_exhausted"),
                _ => (Route::Cloud, "budget_exhausted"),
            };
        }
        if turn.hints.route == Some(Route::Cloud) {
            return (Route::Cloud, "forced_header");
        }
        if !local_available {
            return (Route::Cloud, "no_local_model");
        }
        if self.pool.is_local_model_name(&turn.request.model) {
            return (Route::Local, "forced_model");
        }
        if turn.request.tools.is_some() {
            return (Route::Cloud, "tools");
        }
        if !self.pool.cloud_ready() {
            return (Route::Local, "cloud_unavailable");
        }
        if turn.request.prompt_chars() > self.config.max_local_prompt_chars {
            return (Route::Cloud, "long_prompt");
        }
        if turn.request.messages.len() > self.config.max_local_messages {
            return (Route::Cloud, "deep_conversation");
        }
        let text = turn.request.last_user_text().unwrap_or("");
        if complexity(text) < self.config.local_below_complexity {
            (Route::Local, "simple")
        } else {
            (Route::Cloud, "complex")
        }
    }
}

const QUESTION_WORDS: &[&str] = &[
    "why",
    "how",
    "explain",
    "compare",
    "analy",
    "prove",
    "derive",
    "evaluate",
    "design",
    "plan",
    "summari",
    "translate",
    "为什么",
    "怎么",
    "如何",
    "解释",
    "比较",
    "分析",
    "证明",
    "推导",
    "评估",
    "设计",
    "计划",
    "总结",
    "翻译",
];
const CODE_MARKERS: &[&str] = &[
    "```", "fn ", "def ", "class ", "function", "select ", "#include", "=>", "();", "代码", "程序",
    "code",
];
const MATH_MARKERS: &[&str] = &[
    "solve",
    "equation",
    "integral",
    "derivative",
    "calculate",
    "方程",
    "积分",
    "求解",
    "计算",
    "公式",
];
const STEP_MARKERS: &[&str] = &[
    "step",
    "first",
    "then",
    "after that",
    "finally",
    "and also",
    "首先",
    "然后",
    "接着",
    "步骤",
    "最后",
    "并且",
];

/// A transparent complexity score in [0, 1] from features a person can read: length, question
/// words, code, math and multi-step markers. Meant to be replaced by a small learned
/// classifier on embeddings later; its inputs stay the same.
pub fn complexity(text: &str) -> f32 {
    let lower = text.to_lowercase();
    let count = |words: &[&str]| words.iter().filter(|w| lower.contains(*w)).count() as f32;
    // CJK carries about twice the meaning per character.
    let weight: usize = text.chars().map(|c| if c.is_ascii() { 1 } else { 2 }).sum();
    let mut score = (weight as f32 / 600.0).min(1.0) * 0.3;
    score += (count(QUESTION_WORDS) * 0.2).min(0.4);
    if count(CODE_MARKERS) > 0.0 {
        score += 0.4;
    }
    let has_arithmetic =
        text.chars().any(|c| c.is_ascii_digit()) && text.chars().any(|c| "+-*/^=".contains(c));
    if count(MATH_MARKERS) > 0.0 || has_arithmetic {
        score += 0.3;
    }
    score += (count(STEP_MARKERS) * 0.15).min(0.3);
    score.min(1.0)
}

#[async_trait]
impl Stage for Router {
    fn name(&self) -> &'static str {
        "router"
    }

    async fn handle(&self, mut turn: Turn, next: Next<'_>) -> Result<Reply, TurnError> {
        let (route, reason) = self.decide(&turn);
        turn.route = Some(route);
        turn.ctx
            .annotate(|m| m.route = Some((route.as_str(), reason)));
        turn.ctx.emit(TurnEvent::Routed {
            turn: turn.id().clone(),
            route,
            reason,
        });
        // Either way the user gets the small model instead of the one they would have had.
        if route == Route::Local && matches!(reason, "cloud_unavailable" | "budget_exhausted") {
            turn.ctx.emit(TurnEvent::Degraded {
                turn: turn.id().clone(),
                reason,
            });
            turn.ctx.annotate(|m| {
                m.degraded = true;
                m.degraded_reason = Some(reason);
            });
        }
        next.run(turn).await
    }
}

#[cfg(test)]
mod tests {
    use super::complexity;

    #[test]
    fn complexity_orders_simple_below_hard_in_both_languages() {
        let simple = ["tell me a joke", "good morning", "讲个笑话", "早上好"];
        let hard = [
            "Explain why the sky is blue and compare it with sunsets, step by step",
            "Write a function in Rust that parses JSON: ```fn parse()```",
            "solve the equation 3x^2 + 2x = 7",
            "请分析一下这个方案的风险，首先列出问题，然后给出解决步骤",
        ];
        for s in simple {
            for h in hard {
                assert!(
                    complexity(s) < complexity(h),
                    "{s} ({}) vs {h} ({})",
                    complexity(s),
                    complexity(h)
                );
            }
            assert!(complexity(s) < 0.2, "{s}: {}", complexity(s));
        }
        for h in hard {
            assert!(complexity(h) >= 0.2, "{h}: {}", complexity(h));
        }
    }
}
