//! The turn pipeline: an onion of stages in a fixed canonical order. Each stage gets the turn
//! and [`Next`] — by value, so it can call the rest of the chain at most once — and may answer
//! itself, change the turn on the way in, or change the reply on the way out.

use crate::turn::{Reply, Turn};
use crate::upstream::pool::PoolError;
use async_trait::async_trait;
use std::sync::Arc;

#[async_trait]
pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;
    async fn handle(&self, turn: Turn, next: Next<'_>) -> Result<Reply, TurnError>;
}

/// Why a turn produced no reply. Stages return these, never HTTP responses: `api/error.rs`
/// alone decides statuses, so "cloud down" stays distinguishable from "bad request".
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the pipeline has no stage that answers (the last stage called next)")]
    NoAnsweringStage,
    #[error("the cloud token budget is spent; it resets in {}s", .resets_in.as_secs())]
    BudgetExhausted { resets_in: std::time::Duration },
    /// A tool failed through the device's own fault (not the model's, not the remote's).
    #[error("tool `{tool}` failed: {message}")]
    Tool { tool: String, message: String },
}

impl TurnError {
    /// The cloud could not take the turn now (down, busy, a parked GPU, the budget spent):
    /// work that can wait should wait.
    pub fn is_cloud_away(&self) -> bool {
        match self {
            TurnError::Pool(p) => p.cloud_unavailable(),
            TurnError::BudgetExhausted { .. } => true,
            TurnError::NoAnsweringStage | TurnError::Tool { .. } => false,
        }
    }
}

/// The rest of the chain after the current stage.
pub struct Next<'a> {
    rest: &'a [Arc<dyn Stage>],
}

impl<'a> Next<'a> {
    pub async fn run(self, turn: Turn) -> Result<Reply, TurnError> {
        match self.rest.split_first() {
            Some((stage, rest)) => stage.handle(turn, Next { rest }).await,
            None => Err(TurnError::NoAnsweringStage),
        }
    }
}

/// Stages in canonical order, built and checked at start-up.
#[derive(Clone)]
pub struct Pipeline {
    stages: Arc<[Arc<dyn Stage>]>,
}

impl Pipeline {
    pub fn new(stages: Vec<Arc<dyn Stage>>) -> Self {
        Pipeline {
            stages: stages.into(),
        }
    }

    pub async fn run(&self, turn: Turn) -> Result<Reply, TurnError> {
        Next { rest: &self.stages }.run(turn).await
    }

    pub fn stage_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.name()).collect()
    }
}
