//! Pipeline stages, one module each, listed here in the canonical order. Config enables and
//! configures stages; it cannot reorder them. Later stages (PII guard, rules, cache, router,
//! tool loop, voice reply) slot into `build` at their place in the order.

pub mod act;
pub mod cache;
pub mod llm;
pub mod pii_guard;
pub mod router;
pub mod rules;
pub mod system_prompt;

use crate::cost::CloudBudget;
use crate::embedding;
use crate::pipeline::{Pipeline, Stage};
use crate::tools::ToolRegistry;
use crate::upstream::pool::Pool;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    pub rules: rules::RulesConfig,
    pub cache: cache::CacheConfig,
    pub router: router::RouterConfig,
    pub system_prompt: system_prompt::SystemPromptConfig,
    pub llm: llm::LlmConfig,
    pub act: act::ActConfig,
    pub pii_guard: pii_guard::PiiGuardConfig,
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
    pub budget: Arc<CloudBudget>,
    pub tools: Arc<ToolRegistry>,
    /// The tool loop, built by the app (the actions API resumes its pending actions).
    pub act: Option<Arc<act::Act>>,
    /// The contacts directory's config: the guard recognizes its names.
    pub contacts: crate::tools::contacts::ContactsConfig,
}

/// Builds the pipeline in canonical order; every problem is reported with its key path.
/// Optional parts that cannot start (an unreadable cache file, a missing embedding model) are
/// left out and returned as warnings: the agent still serves.
pub fn build(
    config: &StagesConfig,
    deps: &StageDeps,
) -> Result<(Pipeline, Vec<String>), Vec<String>> {
    let mut warnings = Vec::new();
    let mut stages: Vec<Arc<dyn Stage>> = Vec::new();
    let mut problems = Vec::new();
    // The guard first (and so last on the way out): nothing further in sees real values.
    match pii_guard::PiiGuard::new(&config.pii_guard, &deps.contacts) {
        Ok(Some(s)) => stages.push(Arc::new(s)),
        Ok(None) => {}
        Err(mut p) => problems.append(&mut p),
    }
    // Local rules next: instant answers never wait for anything else.
    match rules::Rules::new(&config.rules, deps.tools.clone()) {
        Ok(Some(s)) => stages.push(Arc::new(s)),
        Ok(None) => {}
        Err(mut p) => problems.append(&mut p),
    }
    if config.cache.enabled {
        let embed = if config.cache.semantic {
            match embedding::load(&config.cache.embedding_model) {
                Ok(e) => Some(e),
                Err(e) => {
                    warnings.push(format!("cache: semantic matching off: {e}"));
                    None
                }
            }
        } else {
            None
        };
        match cache::Cache::new(&config.cache, embed) {
            Ok(c) => stages.push(Arc::new(c)),
            Err(e) => warnings.push(format!("cache disabled: {e}")),
        }
    }
    match router::Router::new(&config.router, deps.pool.clone(), deps.budget.clone()) {
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
    stages.push(Arc::new(llm::Llm::new(
        &config.llm,
        deps.pool.clone(),
        deps.budget.clone(),
        deps.act.clone(),
    )));
    for w in &warnings {
        tracing::error!("{w}");
    }
    if problems.is_empty() {
        Ok((Pipeline::new(stages), warnings))
    } else {
        Err(problems)
    }
}
