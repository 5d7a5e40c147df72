//! `POST /v1/chat/completions`: scripted answers, streamed or not, with faults.

use crate::script::{
    prompt_tokens, upstream_error_body, Answer, Completion, Fault, Script, MALFORMED_JSON_BODY,
    MALFORMED_JSON_EVENT, MALFORMED_SSE_EVENT,
};
use crate::server::{hold, respond, respond_error, Flow, Shared};
use crate::wire::{self, Request};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Abortive close: the caller drops the stream right after, which sends a TCP RST.
fn reset(stream: &TcpStream) -> Flow {
    let _ = stream.set_zero_linger();
    Flow::Close
}

/// Writes `bytes` cut short by a reset/stall fault, or `None` if `fault` is not one.
async fn cut_short(
    stream: &mut TcpStream,
    bytes: &[u8],
    fault: &Option<Fault>,
) -> std::io::Result<Option<Flow>> {
    match fault {
        Some(Fault::ResetAfterChunks { .. }) => {
            stream.write_all(bytes).await?;
            Ok(Some(reset(stream)))
        }
        Some(Fault::StallAfterChunks { .. }) => {
            stream.write_all(bytes).await?;
            Ok(Some(hold(stream).await))
        }
        _ => Ok(None),
    }
}

/// Head + body, or head + the first half of the body under a reset/stall fault.
async fn write_full_or_half(
    stream: &mut TcpStream,
    status: u16,
    body: &[u8],
    extra: &[(&str, String)],
    close: bool,
    fault: &Option<Fault>,
) -> std::io::Result<Flow> {
    let mut resp = wire::head(status, "application/json", body.len(), extra, close);
    let head_len = resp.len();
    resp.extend_from_slice(body);
    if let Some(flow) = cut_short(stream, &resp[..head_len + body.len() / 2], fault).await? {
        return Ok(flow);
    }
    stream.write_all(&resp).await?;
    Ok(Flow::KeepAlive)
}

pub(crate) async fn handle(
    shared: &Shared,
    stream: &mut TcpStream,
    req: Request,
    close: bool,
) -> std::io::Result<Flow> {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    shared.record_chat(&req, &body);
    if !body.is_object() {
        let msg = match serde_json::from_slice::<Value>(&req.body) {
            Err(e) => format!("invalid JSON body: {e}"),
            Ok(_) => "request body must be a JSON object".to_string(),
        };
        return respond_error(stream, 400, &msg, close).await;
    }
    let script = shared.next_script();
    sleep_ms(script.headers_delay_ms).await;

    if matches!(script.fault, Some(Fault::ResetBeforeHeaders)) {
        return Ok(reset(stream));
    }
    if script.status != 200 {
        let extra: Vec<(&str, String)> = script
            .retry_after_s
            .map(|s| ("Retry-After", s.to_string()))
            .into_iter()
            .collect();
        let body = upstream_error_body(script.status);
        return write_full_or_half(stream, script.status, &body, &extra, close, &script.fault)
            .await;
    }

    let answer = Answer::resolve(&script, &body);
    let prompt = prompt_tokens(&script, &body);
    let id = format!("chatcmpl-fake-{}", shared.next_id());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model");
    let completion = Completion {
        id: &id,
        created,
        model,
    };
    let extra: Vec<(&str, String)> = script
        .retry_after_s
        .map(|s| ("Retry-After", s.to_string()))
        .into_iter()
        .collect();

    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        return stream_answer(
            stream,
            &script,
            &completion,
            &answer,
            prompt,
            include_usage,
            close,
        )
        .await;
    }

    let chunks = answer.stream_chunks() as u64;
    sleep_ms(
        script.ttft_ms.saturating_add(
            chunks
                .saturating_sub(1)
                .saturating_mul(script.inter_chunk_ms),
        ),
    )
    .await;
    if matches!(
        script.fault,
        Some(Fault::MalformedJson | Fault::MalformedSse)
    ) {
        return respond(stream, 200, "application/json", MALFORMED_JSON_BODY, close).await;
    }
    let out = completion.body(&answer, prompt, !script.omit_usage);
    write_full_or_half(stream, 200, &out, &extra, close, &script.fault).await
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Streams the answer as SSE over chunked encoding. Events with no delay between them are
/// coalesced into one write (still one HTTP chunk per event).
async fn stream_answer(
    stream: &mut TcpStream,
    script: &Script,
    completion: &Completion<'_>,
    answer: &Answer,
    prompt: u32,
    include_usage: bool,
    close: bool,
) -> std::io::Result<Flow> {
    let mut out = wire::stream_head(close);
    wire::push_event(&mut out, &completion.role_chunk());

    let chunks = completion.content_chunks(answer);
    let stop_after = match script.fault {
        Some(Fault::ResetAfterChunks { chunks }) | Some(Fault::StallAfterChunks { chunks }) => {
            Some(chunks)
        }
        _ => None,
    };
    let inject: Option<&[u8]> = match script.fault {
        Some(Fault::MalformedJson) => Some(MALFORMED_JSON_EVENT),
        Some(Fault::MalformedSse) => Some(MALFORMED_SSE_EVENT),
        _ => None,
    };
    if chunks.is_empty() {
        if let Some(raw) = inject {
            wire::push_raw_chunk(&mut out, raw);
        }
    }

    let limit = stop_after.unwrap_or(chunks.len());
    for (i, chunk) in chunks.iter().take(limit).enumerate() {
        let delay = if i == 0 {
            script.ttft_ms
        } else {
            script.inter_chunk_ms
        };
        if delay > 0 {
            flush(stream, &mut out).await?;
            sleep_ms(delay).await;
        }
        wire::push_event(&mut out, chunk);
        if i == 0 {
            if let Some(raw) = inject {
                wire::push_raw_chunk(&mut out, raw);
            }
        }
    }
    if stop_after.is_some() {
        if let Some(flow) = cut_short(stream, &out, &script.fault).await? {
            return Ok(flow);
        }
    }

    wire::push_event(&mut out, &completion.finish_chunk(answer));
    if include_usage && !script.omit_usage {
        wire::push_event(&mut out, &completion.usage_chunk(answer, prompt));
    }
    wire::push_event(&mut out, b"[DONE]");
    out.extend_from_slice(wire::LAST_CHUNK);
    flush(stream, &mut out).await?;
    Ok(Flow::KeepAlive)
}
