//! `llm` stage, the innermost: sends the turn where the router decided — the cloud pool or
//! the local model — and accounts the tokens reported. When the cloud cannot answer before its
//! first byte (down, breakers open, busy, too slow), the local model answers instead and the
//! turn is marked degraded. With server-side tools configured, the tool loop (`act`) calls
//! the model once per step through [`ModelCall`].

use crate::cost::{CloudBudget, OnExhausted};
use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::stages::act::Act;
use crate::turn::{Reply, Route, Turn, TurnCtx};
use crate::upstream::pool::{Pool, PoolError, Served};
use crate::wire::{ChatRequest, Usage};
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Answer from the local model when the cloud cannot (marked degraded).
    pub fallback_to_local: bool,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            fallback_to_local: true,
        }
    }
}

/// Calls the model for one request of a turn — where the router decided, falling back to the
/// local model, within the cloud budget. The tool loop calls it once per step.
#[derive(Clone)]
pub struct ModelCall {
    pool: Arc<Pool>,
    budget: Arc<CloudBudget>,
    fallback_to_local: bool,
}

impl ModelCall {
    /// Enforces the cloud budget even without the router (which only reports the reason):
    /// a cloud turn with the allowance spent goes local or is refused, per the policy.
    fn within_budget(&self, turn: &Turn, route: Route) -> Result<Route, TurnError> {
        let Some(spent) = self.budget.exhausted().filter(|_| route == Route::Cloud) else {
            return Ok(route);
        };
        if spent.policy == OnExhausted::Local && self.pool.has_local() {
            if turn.route != Some(Route::Local) && !turn.ctx.meta().degraded {
                turn.ctx.emit(TurnEvent::Degraded {
                    turn: turn.id().clone(),
                    reason: "budget_exhausted",
                });
                turn.ctx.annotate(|m| m.degraded = true);
            }
            return Ok(Route::Local);
        }
        Err(TurnError::BudgetExhausted {
            resets_in: spent.resets_in,
        })
    }

    /// The router's decision; without a router: cloud, unless the model names the local one.
    fn route_for(&self, turn: &Turn) -> Route {
        turn.route
            .unwrap_or(if self.pool.is_local_model_name(&turn.request.model) {
                Route::Local
            } else {
                Route::Cloud
            })
    }

    async fn call(
        &self,
        turn: &Turn,
        request: &ChatRequest,
        route: Route,
    ) -> Result<Reply, PoolError> {
        let ctx = turn.ctx.clone();
        let budget = self.budget.clone();
        let (hints, deadline) = (&turn.hints, turn.deadline);
        if request.wants_stream() {
            let (stream, served) = self
                .pool
                .stream(&ctx, request, hints, route, deadline)
                .await?;
            // Usage arrives in the last chunk; account it when seen.
            let stream = stream.inspect(move |item| {
                if let Ok(chunk) = item {
                    if let Some(usage) = chunk.usage() {
                        account(&ctx, &budget, &served, usage);
                    }
                }
            });
            Ok(Reply::Stream(stream.boxed()))
        } else {
            let (completion, served) = self
                .pool
                .complete(&ctx, request, hints, route, deadline)
                .await?;
            if let Some(usage) = completion.usage() {
                account(&ctx, &budget, &served, usage);
            }
            Ok(Reply::Complete(completion))
        }
    }

    /// One model answer for `request` (the turn's own, or a step of the tool loop), and the
    /// route that answered it.
    pub async fn answer(&self, turn: &Turn, request: &ChatRequest) -> Result<Reply, TurnError> {
        let route = self.within_budget(turn, self.route_for(turn))?;
        let result = match self.call(turn, request, route).await {
            Err(e)
                if route == Route::Cloud
                    && self.fallback_to_local
                    && self.pool.has_local()
                    && e.cloud_unavailable()
                    && !turn.deadline.passed() =>
            {
                let reason = match &e {
                    PoolError::Failed { last, .. } => last.code(),
                    _ => "cloud_unavailable",
                };
                tracing::warn!(turn = %turn.id(), reason, "cloud unavailable; answering from the local model");
                turn.ctx.emit(TurnEvent::Degraded {
                    turn: turn.id().clone(),
                    reason,
                });
                turn.ctx.annotate(|m| m.degraded = true);
                self.call(turn, request, Route::Local)
                    .await
                    .map(|r| (r, Route::Local))
            }
            other => other.map(|r| (r, route)),
        };
        let (reply, answered) = result?;
        turn.ctx
            .annotate(|m| m.answered_by = Some(answered.as_str()));
        Ok(reply)
    }
}

pub struct Llm {
    model: ModelCall,
    /// The server-side tool loop, when tools are configured.
    act: Option<Arc<Act>>,
}

impl Llm {
    pub fn new(
        config: &LlmConfig,
        pool: Arc<Pool>,
        budget: Arc<CloudBudget>,
        act: Option<Arc<Act>>,
    ) -> Self {
        Llm {
            model: ModelCall {
                pool,
                budget,
                fallback_to_local: config.fallback_to_local,
            },
            act,
        }
    }
}

fn account(ctx: &TurnCtx, budget: &CloudBudget, served: &Served, usage: Usage) {
    if !served.local {
        budget.charge(usage.prompt_tokens + usage.completion_tokens);
    }
    ctx.emit(TurnEvent::TokensUsed {
        turn: ctx.id.clone(),
        upstream: served.upstream.clone(),
        model: served.model_label.clone(),
        prompt: usage.prompt_tokens,
        completion: usage.completion_tokens,
    });
}

#[async_trait]
impl Stage for Llm {
    fn name(&self) -> &'static str {
        "llm"
    }

    async fn handle(&self, turn: Turn, _next: Next<'_>) -> Result<Reply, TurnError> {
        turn.ctx.emit(TurnEvent::StageDecided {
            turn: turn.id().clone(),
            stage: self.name(),
            decision: self.model.route_for(&turn).as_str(),
        });
        // Client-side tools pass through untouched: the client runs them, not us.
        match &self.act {
            Some(act) if turn.request.tools.is_none() && act.has_tools() => {
                act.run(self.model.clone(), turn).await
            }
            _ => self.model.answer(&turn, &turn.request).await,
        }
    }
}
