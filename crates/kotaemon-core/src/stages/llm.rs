//! `llm` stage, the innermost: sends the turn where the router decided — the cloud pool or
//! the local model — and accounts the tokens reported. When the cloud cannot answer before its
//! first byte (down, breakers open, busy, too slow), the local model answers instead and the
//! turn is marked degraded. With server-side tools configured, the tool loop (`act`) calls
//! the model once per step through [`ModelCall`].

use crate::cost::ledger::CallRow;
use crate::cost::pricing::{estimate_request_tokens, estimate_tokens};
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
        let client = turn.hints.client.as_deref();
        let Some(spent) = self
            .budget
            .exhausted_for(client)
            .filter(|_| route == Route::Cloud)
        else {
            return Ok(route);
        };
        if spent.policy == OnExhausted::Local && self.pool.has_local() && !turn.hints.deferrable {
            if turn.route != Some(Route::Local) && !turn.ctx.meta().degraded {
                turn.ctx.emit(TurnEvent::Degraded {
                    turn: turn.id().clone(),
                    reason: "budget_exhausted",
                });
                turn.ctx.annotate(|m| {
                    m.degraded = true;
                    m.degraded_reason = Some("budget_exhausted");
                });
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
        let (hints, deadline) = (&turn.hints, turn.deadline);
        if request.wants_stream() {
            let (stream, served) = self
                .pool
                .stream(&turn.ctx, request, hints, route, deadline)
                .await?;
            // Usage arrives in the last chunk; accounted when seen, or estimated from the
            // text when the stream ends without it (the guard's drop).
            let mut meter = StreamMeter {
                bill: Bill::new(turn, request, served, self.budget.clone()),
                completion_text: String::new(),
                accounted: false,
            };
            let stream = stream.inspect(move |item| {
                if let Ok(chunk) = item {
                    meter
                        .completion_text
                        .push_str(chunk.content_delta().unwrap_or(""));
                    if let Some(usage) = chunk.usage() {
                        meter.bill.account(usage, false);
                        meter.accounted = true;
                    }
                }
            });
            Ok(Reply::Stream(stream.boxed()))
        } else {
            let (completion, served) = self
                .pool
                .complete(&turn.ctx, request, hints, route, deadline)
                .await?;
            let bill = Bill::new(turn, request, served, self.budget.clone());
            match completion.usage() {
                Some(usage) => bill.account(usage, false),
                None => bill.account(bill.estimate(completion.content().unwrap_or("")), true),
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
                    && !turn.hints.deferrable
                    && self.pool.has_local()
                    && e.cloud_unavailable()
                    && !turn.deadline.passed() =>
            {
                let reason = match &e {
                    PoolError::Failed { last, .. } => last.code(),
                    // The cloud GPU is off: starting (this turn asked for it) or out of hours.
                    PoolError::Parked { code } => code,
                    _ => "cloud_unavailable",
                };
                tracing::warn!(turn = %turn.id(), reason, "cloud unavailable; answering from the local model");
                turn.ctx.emit(TurnEvent::Degraded {
                    turn: turn.id().clone(),
                    reason,
                });
                turn.ctx.annotate(|m| {
                    m.degraded = true;
                    m.degraded_reason = Some(reason);
                });
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

/// What one model call is charged to: the turn, its client and model, the upstream that
/// answered. Tokens the upstream reports go to the budget, the ledger and the metrics.
struct Bill {
    ctx: TurnCtx,
    client: Option<String>,
    model: String,
    prompt_estimate: u64,
    served: Served,
    budget: Arc<CloudBudget>,
}

impl Bill {
    fn new(turn: &Turn, request: &ChatRequest, served: Served, budget: Arc<CloudBudget>) -> Self {
        Bill {
            ctx: turn.ctx.clone(),
            client: turn.hints.client.clone(),
            model: request.model.chars().take(64).collect(),
            prompt_estimate: estimate_request_tokens(request),
            served,
            budget,
        }
    }

    /// Usage for an upstream that reported none.
    fn estimate(&self, completion_text: &str) -> Usage {
        let completion = estimate_tokens(completion_text);
        Usage {
            prompt_tokens: self.prompt_estimate,
            completion_tokens: completion,
            total_tokens: self.prompt_estimate + completion,
        }
    }

    fn account(&self, usage: Usage, estimated: bool) {
        let (ctx, served) = (&self.ctx, &self.served);
        let ledger = ctx.bus.ledger();
        let cost = if served.local {
            ctx.annotate(|m| {
                m.local_tokens = (usage.prompt_tokens, usage.completion_tokens);
            });
            0.0
        } else {
            self.budget
                .charge(usage.prompt_tokens + usage.completion_tokens);
            let cost = ledger.pricing().call_cost(
                &served.upstream,
                &self.model,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
            crate::events::metrics::cloud_cost(&served.upstream, &served.model_label, cost);
            for crossed in self.budget.charge_usd(self.client.as_deref(), cost) {
                if let TurnEvent::BudgetThreshold {
                    scope,
                    period,
                    hard,
                    spent_usd,
                    limit_usd,
                } = &crossed
                {
                    tracing::warn!(%scope, period, hard, spent_usd, limit_usd, "cloud budget threshold reached");
                }
                ctx.emit(crossed);
            }
            cost
        };
        ledger.record_call(CallRow {
            turn: ctx.id.to_string(),
            client: self.client.clone().unwrap_or_default(),
            upstream: served.upstream.to_string(),
            model: self.model.clone(),
            local: served.local,
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
            estimated,
            cost_usd: cost,
        });
        ctx.emit(TurnEvent::TokensUsed {
            turn: ctx.id.clone(),
            upstream: served.upstream.clone(),
            model: served.model_label.clone(),
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
        });
    }
}

/// A stream's bill: charged from the usage chunk, or estimated when the stream ends (or the
/// client goes away) without one.
struct StreamMeter {
    bill: Bill,
    completion_text: String,
    accounted: bool,
}

impl Drop for StreamMeter {
    fn drop(&mut self) {
        if !self.accounted {
            let usage = self.bill.estimate(&self.completion_text);
            self.bill.account(usage, true);
        }
    }
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
            Some(act)
                if turn.request.tools.is_none()
                    && act.has_tools()
                    && !turn.hints.no_device_tools =>
            {
                act.run(self.model.clone(), turn).await
            }
            _ => self.model.answer(&turn, &turn.request).await,
        }
    }
}
