//! Renders a committed chunk stream as server-sent events: one `data:` event per chunk as it
//! arrives (no buffering), `data: [DONE]` at a clean end, an explicit error event — never a
//! silent, truncated end — when the upstream fails after commit.

use super::error::ApiError;
use crate::events::metrics::ActiveStreamGuard;
use crate::events::{TurnEvent, TurnOutcome};
use crate::turn::{ChunkStream, TurnCtx};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use std::convert::Infallible;

/// Emits `TurnFinished` exactly once when the stream ends or is dropped (client gone), and
/// holds the turn's resources (concurrency slot, active-stream gauge) until then.
pub struct StreamTurn {
    pub ctx: TurnCtx,
    outcome: Option<TurnOutcome>,
    _active: ActiveStreamGuard,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl StreamTurn {
    pub fn new(ctx: TurnCtx, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        StreamTurn {
            ctx,
            outcome: None,
            _active: ActiveStreamGuard::new(),
            _slot: slot,
        }
    }
}

impl Drop for StreamTurn {
    fn drop(&mut self) {
        self.ctx.emit(TurnEvent::TurnFinished {
            turn: self.ctx.id.clone(),
            outcome: self.outcome.unwrap_or(TurnOutcome::ClientGone),
            elapsed: self.ctx.started.elapsed(),
            stream: true,
        });
    }
}

fn event(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    b.put_slice(b"data: ");
    b.put_slice(json);
    b.put_slice(b"\n\n");
    b.freeze()
}

/// `include_usage`: whether the client asked for the usage chunk (we always ask upstreams).
pub fn encode(
    stream: ChunkStream,
    include_usage: bool,
    turn: StreamTurn,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    struct State {
        stream: ChunkStream,
        turn: StreamTurn,
        include_usage: bool,
        first: bool,
        finished: bool,
    }
    let state = State {
        stream,
        turn,
        include_usage,
        first: true,
        finished: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.finished {
                return None;
            }
            match s.stream.next().await {
                Some(Ok(mut chunk)) => {
                    if !s.include_usage {
                        if chunk.is_usage_only() {
                            continue;
                        }
                        chunk.strip_usage();
                    }
                    if s.first {
                        s.first = false;
                        let overhead = s
                            .turn
                            .ctx
                            .started
                            .elapsed()
                            .saturating_sub(s.turn.ctx.upstream_wait());
                        s.turn.ctx.emit(TurnEvent::Overhead {
                            turn: s.turn.ctx.id.clone(),
                            overhead,
                        });
                    }
                    let json = serde_json::to_vec(&chunk.body).unwrap_or_default();
                    return Some((Ok(event(&json)), s));
                }
                Some(Err(e)) => {
                    let api = ApiError::from_stream_error(&e);
                    tracing::warn!(turn = %s.turn.ctx.id, code = api.code, "stream failed after commit; ending it with an error event");
                    s.turn.outcome = Some(TurnOutcome::StreamAborted { code: api.code });
                    s.finished = true;
                    let json = serde_json::to_vec(&api.body()).unwrap_or_default();
                    return Some((Ok(event(&json)), s));
                }
                None => {
                    s.turn.outcome = Some(TurnOutcome::Ok);
                    s.finished = true;
                    return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), s));
                }
            }
        }
    })
}
