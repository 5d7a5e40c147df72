//! Pipeline stages, one module each, listed here in the canonical order. Config enables and
//! configures stages; it cannot reorder them. Later stages (PII guard, rules, cache, router,
//! tool loop, voice reply) slot into `build` at their place in the order.

pub mod llm;
pub mod router;
pub mod rules;
pub mod system_prompt;

use crate::pipeline::{Pipeline, Stage};
use crate::upstream::pool::Pool;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    pub rules: rules::RulesConfig,
    pub router: router::RouterConfig,
    pub system_prompt: system_prompt::SystemPromptConfig,
    pub llm: llm::LlmConfig,
}

impl StagesConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        self.system_prompt
            .validate(&format!("{path}.system_prompt"), p);
    }
}

/// What stages may be built from, besides their own config.
pub struct StageDeps {
    pub pool: Arc<Pool>,
}

/// Builds the pipeline in canonical order; every problem is reported with its key path.
pub fn build(config: &StagesConfig, deps: &StageDeps) -> Result<Pipeline, Vec<String>> {
    let mut stages: Vec<Arc<dyn Stage>> = Vec::new();
    let mut problems = Vec::new();
    // Local rules first: instant answers never wait for anything else.
    match rules::Rules::new(&config.rules) {
        Ok(Some(s)) => stages.push(Arc::new(s)),
        Ok(None) => {}
        Err(mut p) => problems.append(&mut p),
    }
    match router::Router::new(&config.router, deps.pool.clone()) {
        Ok(Some(s)) => stages.push(Arc::new(s)),
        Ok(None) => {}
        Err(mut p) => problems.append(&mut p),
    }
    match system_prompt::SystemPrompt::new(&config.system_prompt) {
        Ok(Some(s)) => stages.push(Arc::new(s)),
        Ok(None) => {}
        Err(mut p) => problems.append(&mut p),
    }
    // Innermost: the model, cloud or local (the tool loop arrives here later).
    stages.push(Arc::new(llm::Llm::new(&config.llm, deps.pool.clone())));
    if problems.is_empty() {
        Ok(Pipeline::new(stages))
    } else {
        Err(problems)
    }
}
