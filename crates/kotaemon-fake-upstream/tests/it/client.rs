//! A minimal raw HTTP/1.1 client for the tests (deliberately not hyper: we want to see bytes).

use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Response {
    pub status: u16,
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
    /// Body with any chunked framing removed.
    pub body: Vec<u8>,
    /// The HTTP chunks, when the body was chunked.
    pub chunks: Vec<Vec<u8>>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// SSE `data:` payloads, one per chunk.
    pub fn events(&self) -> Vec<String> {
        events_of(&self.chunks)
    }
}

pub fn events_of(chunks: &[Vec<u8>]) -> Vec<String> {
    chunks
        .iter()
        .map(|c| {
            let s = String::from_utf8_lossy(c).into_owned();
            let s = s
                .strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap();
            s.to_string()
        })
        .collect()
}

/// Content deltas of parsed stream events (ignores role, finish and usage chunks).
pub fn content_pieces(events: &[String]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            let delta = v.pointer("/choices/0/delta")?;
            if delta.get("role").is_some() {
                return None;
            }
            delta.get("content")?.as_str().map(str::to_string)
        })
        .collect()
}

/// Parses complete HTTP chunks from `data`; returns them and whether the last chunk was seen.
pub fn decode_chunks(mut data: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(i) = data.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size = usize::from_str_radix(std::str::from_utf8(&data[..i]).unwrap(), 16).unwrap();
        if size == 0 {
            return (out, true);
        }
        let start = i + 2;
        if data.len() < start + size + 2 {
            return (out, false);
        }
        out.push(data[start..start + size].to_vec());
        data = &data[start + size + 2..];
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, method: &str, path: &str, body: &str, extra: &[(&str, &str)]) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: fake\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.stream.write_all(req.as_bytes()).await.unwrap();
    }

    async fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 8192];
        let n = self.stream.read(&mut tmp).await.unwrap();
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    /// Reads the response head; returns (status, headers) and leaves body bytes buffered.
    pub async fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf).unwrap() {
                let status = resp.code.unwrap();
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                self.buf.drain(..n);
                return (status, headers);
            }
            assert!(self.fill().await > 0, "EOF inside response head");
        }
    }

    pub async fn read_response(&mut self) -> Response {
        let (status, headers) = self.read_head().await;
        self.read_body(status, headers).await
    }

    /// Reads the body of a response whose head `read_head` returned.
    pub async fn read_body(&mut self, status: u16, headers: Vec<(String, String)>) -> Response {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        if find("transfer-encoding").as_deref() == Some("chunked") {
            loop {
                let (chunks, done) = decode_chunks(&self.buf);
                if done {
                    // The whole body is consumed; keep-alive tests send the next request after.
                    let consumed = framed_len(&self.buf);
                    self.buf.drain(..consumed);
                    let body = chunks.concat();
                    return Response {
                        status,
                        headers,
                        body,
                        chunks,
                    };
                }
                assert!(self.fill().await > 0, "EOF inside chunked body");
            }
        }
        let len: usize = find("content-length").unwrap().parse().unwrap();
        while self.buf.len() < len {
            assert!(self.fill().await > 0, "EOF inside body");
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        Response {
            status,
            headers,
            body,
            chunks: Vec::new(),
        }
    }

    /// Reads whatever arrives until nothing came for `quiet`; returns (bytes, eof_or_error).
    pub async fn read_until_quiet(&mut self, quiet: Duration) -> (Vec<u8>, bool) {
        let mut tmp = [0u8; 8192];
        loop {
            match tokio::time::timeout(quiet, self.stream.read(&mut tmp)).await {
                Err(_) => return (std::mem::take(&mut self.buf), false),
                Ok(Ok(0)) | Ok(Err(_)) => return (std::mem::take(&mut self.buf), true),
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

/// Length in bytes of a complete chunked body at the start of `data` (including the last chunk).
fn framed_len(data: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        let i = data[pos..].windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[pos..pos + i]).unwrap(), 16).unwrap();
        pos += i + 2;
        if size == 0 {
            return pos + 2;
        }
        pos += size + 2;
    }
}

pub fn chat_body(content: &str, stream: bool, include_usage: bool) -> String {
    let mut v = serde_json::json!({
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": content},
        ],
    });
    if stream {
        v["stream"] = Value::Bool(true);
    }
    if include_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

/// One chat request on a fresh connection.
pub async fn chat(addr: SocketAddr, content: &str, stream: bool, include_usage: bool) -> Response {
    let mut c = Client::connect(addr).await;
    c.send(
        "POST",
        "/v1/chat/completions",
        &chat_body(content, stream, include_usage),
        &[],
    )
    .await;
    c.read_response().await
}
