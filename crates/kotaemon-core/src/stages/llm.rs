//! `llm` stage, the innermost: sends the turn to the cloud pool and accounts the tokens the
//! upstream reports. The local-model fallback and the server-side tool loop join here later.

use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::turn::{Reply, Turn, TurnCtx};
use crate::upstream::pool::{Pool, Served};
use crate::wire::Usage;
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::Arc;

pub struct Llm {
    pool: Arc<Pool>,
}

impl Llm {
    pub fn new(pool: Arc<Pool>) -> Self {
        Llm { pool }
    }
}

fn account(ctx: &TurnCtx, served: &Served, usage: Usage) {
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
        let ctx = turn.ctx.clone();
        ctx.emit(TurnEvent::StageDecided {
            turn: ctx.id.clone(),
            stage: self.name(),
            decision: "cloud",
        });
        ctx.annotate(|m| m.answered_by = Some("cloud"));
        if turn.request.wants_stream() {
            let (stream, served) = self
                .pool
                .stream(&ctx, &turn.request, &turn.hints, turn.deadline)
                .await?;
            // Usage arrives in the last chunk; account it when seen.
            let stream = stream.inspect(move |item| {
                if let Ok(chunk) = item {
                    if let Some(usage) = chunk.usage() {
                        account(&ctx, &served, usage);
                    }
                }
            });
            Ok(Reply::Stream(stream.boxed()))
        } else {
            let (completion, served) = self
                .pool
                .complete(&ctx, &turn.request, &turn.hints, turn.deadline)
                .await?;
            if let Some(usage) = completion.usage() {
                account(&ctx, &served, usage);
            }
            Ok(Reply::Complete(completion))
        }
    }
}
