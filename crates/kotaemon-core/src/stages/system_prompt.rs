//! `system_prompt` stage: gives turns without a system message the device's default one.

use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::turn::{Reply, Turn};
use crate::wire::{ChatMessage, Role};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemPromptConfig {
    pub enabled: bool,
    pub text: String,
}

impl Default for SystemPromptConfig {
    fn default() -> Self {
        SystemPromptConfig {
            enabled: false,
            text: "You are Kotaemon, a concise assistant running on an edge device.".into(),
        }
    }
}

impl SystemPromptConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.enabled && self.text.trim().is_empty() {
            p.push(format!(
                "{path}.text: must not be empty when the stage is enabled"
            ));
        }
    }
}

pub struct SystemPrompt {
    text: String,
}

impl SystemPrompt {
    /// `None` when disabled: a disabled stage is not in the chain at all.
    pub fn new(config: &SystemPromptConfig) -> Result<Option<Self>, Vec<String>> {
        let mut p = Vec::new();
        config.validate("stages.system_prompt", &mut p);
        if !p.is_empty() {
            return Err(p);
        }
        Ok(config.enabled.then(|| SystemPrompt {
            text: config.text.clone(),
        }))
    }
}

#[async_trait]
impl Stage for SystemPrompt {
    fn name(&self) -> &'static str {
        "system_prompt"
    }

    async fn handle(&self, mut turn: Turn, next: Next<'_>) -> Result<Reply, TurnError> {
        let has_system = turn
            .request
            .messages
            .iter()
            .any(|m| matches!(m.role, Role::System | Role::Developer));
        let decision = if has_system {
            "kept_client_prompt"
        } else {
            turn.request
                .messages
                .insert(0, ChatMessage::text(Role::System, self.text.clone()));
            "added"
        };
        turn.ctx.emit(TurnEvent::StageDecided {
            turn: turn.id().clone(),
            stage: self.name(),
            decision,
        });
        next.run(turn).await
    }
}
