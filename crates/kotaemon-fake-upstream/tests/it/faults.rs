//! Byte-level faults.

use crate::client::{chat_body, content_pieces, decode_chunks, events_of, Client};
use crate::{server, wait_for};
use kotaemon_fake_upstream::{Fault, Script};
use serde_json::Value;
use std::time::Duration;

fn fault(f: Fault) -> Script {
    Script {
        fault: Some(f),
        ..Script::default()
    }
}

/// Splits a raw response into (head text, rest).
fn split_head(bytes: &[u8]) -> (String, Vec<u8>) {
    let i = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8(bytes[..i].to_vec()).unwrap(),
        bytes[i + 4..].to_vec(),
    )
}

async fn send_chat(up: &kotaemon_fake_upstream::FakeUpstream, stream: bool) -> Client {
    let mut c = Client::connect(up.addr()).await;
    c.send(
        "POST",
        "/v1/chat/completions",
        &chat_body("x", stream, false),
        &[],
    )
    .await;
    c
}

#[tokio::test]
async fn reset_before_headers_gives_zero_bytes() {
    let up = server().await;
    up.push(fault(Fault::ResetBeforeHeaders));
    let mut c = send_chat(&up, true).await;
    let (bytes, eof) = c.read_until_quiet(Duration::from_secs(5)).await;
    assert!(eof, "connection must end");
    assert!(bytes.is_empty(), "got {} bytes", bytes.len());
    // Recorded before the fault.
    assert_eq!(up.chat_request_count(), 1);
    assert_eq!(up.requests()[0].body["model"], "test-model");
}

#[tokio::test]
async fn stall_after_chunks_stream() {
    let up = server().await;
    up.push(fault(Fault::StallAfterChunks { chunks: 2 }));
    let mut c = send_chat(&up, true).await;
    let (bytes, eof) = c.read_until_quiet(Duration::from_millis(300)).await;
    assert!(!eof, "a stall keeps the socket open");
    let (head, rest) = split_head(&bytes);
    assert!(head.starts_with("HTTP/1.1 200"));
    let (chunks, done) = decode_chunks(&rest);
    assert!(!done);
    let events = events_of(&chunks);
    assert_eq!(
        events.len(),
        3,
        "role + exactly 2 content chunks: {events:?}"
    );
    assert_eq!(content_pieces(&events), vec!["Hello", " from"]);
    // Server shutdown releases the stalled connection.
    up.shutdown();
    let (more, eof) = c.read_until_quiet(Duration::from_secs(5)).await;
    assert!(more.is_empty() && eof);
    wait_for(|| up.open_connections() == 0).await;
}

#[tokio::test]
async fn stall_released_when_client_closes() {
    let up = server().await;
    up.push(fault(Fault::StallAfterChunks { chunks: 0 }));
    let mut c = send_chat(&up, false).await;
    let (bytes, eof) = c.read_until_quiet(Duration::from_millis(200)).await;
    assert!(!eof);
    let (head, rest) = split_head(&bytes);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rest.len(), len / 2, "non-stream stall: half the body");
    assert_eq!(up.open_connections(), 1);
    drop(c);
    wait_for(|| up.open_connections() == 0).await;
}

#[tokio::test]
async fn reset_after_chunks_stream_and_non_stream() {
    let up = server().await;
    up.push(fault(Fault::ResetAfterChunks { chunks: 1 }));
    let mut c = send_chat(&up, true).await;
    let (bytes, eof) = c.read_until_quiet(Duration::from_secs(5)).await;
    assert!(eof);
    let (_, rest) = split_head(&bytes);
    let (chunks, done) = decode_chunks(&rest);
    assert!(!done);
    assert_eq!(content_pieces(&events_of(&chunks)), vec!["Hello"]);

    up.push(fault(Fault::ResetAfterChunks { chunks: 1 }));
    let mut c = send_chat(&up, false).await;
    let (bytes, eof) = c.read_until_quiet(Duration::from_secs(5)).await;
    assert!(eof);
    let (head, rest) = split_head(&bytes);
    assert!(head.contains("Content-Length: "));
    assert!(!rest.is_empty());
    assert!(serde_json::from_slice::<Value>(&rest).is_err());
    wait_for(|| up.open_connections() == 0).await;
}

#[tokio::test]
async fn malformed_json() {
    let up = server().await;
    up.push(fault(Fault::MalformedJson));
    up.push(fault(Fault::MalformedJson));
    let mut c = send_chat(&up, false).await;
    let r = c.read_response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, br#"{"id":"chatcmpl-broken","choices":[{"message":"#);
    // The connection stays usable; the stream variant injects a broken event and goes on.
    c.send(
        "POST",
        "/v1/chat/completions",
        &chat_body("x", true, false),
        &[],
    )
    .await;
    let r = c.read_response().await;
    let ev = r.events();
    assert_eq!(ev[2], r#"{"id":"chatcmpl-broken","choices":[{"#);
    assert!(serde_json::from_str::<Value>(&ev[1]).is_ok());
    assert_eq!(ev.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn malformed_sse() {
    let up = server().await;
    up.push(fault(Fault::MalformedSse));
    let mut c = send_chat(&up, true).await;
    let r = c.read_response().await;
    assert_eq!(r.chunks[2], b"data: \xff\xfe\xfd\n\n");
    assert_eq!(
        String::from_utf8_lossy(r.chunks.last().unwrap()),
        "data: [DONE]\n\n"
    );
    assert_eq!(r.chunks.len(), 1 + 1 + 5 + 1 + 1);
}

#[tokio::test]
async fn garbage_requests_do_not_kill_the_server() {
    use tokio::io::AsyncWriteExt;
    let up = server().await;
    for junk in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: zz\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
    ] {
        let mut c = Client::connect(up.addr()).await;
        c.stream.write_all(junk).await.unwrap();
        c.stream.shutdown().await.unwrap();
        let _ = c.read_until_quiet(Duration::from_secs(5)).await;
    }
    let mut c = Client::connect(up.addr()).await;
    c.send("POST", "/v1/chat/completions", "{not json", &[])
        .await;
    let r = c.read_response().await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid JSON"));
    assert_eq!(up.requests().last().unwrap().body, Value::Null);
    c.send("GET", "/health", "", &[]).await;
    assert_eq!(c.read_response().await.status, 200);
    wait_for(|| up.open_connections() == 1).await;
}
