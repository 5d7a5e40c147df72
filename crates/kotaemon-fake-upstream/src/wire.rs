//! HTTP/1.1 on the wire: reading requests (httparse, partial reads, Content-Length and chunked
//! bodies) and formatting responses and chunked-encoding frames.

use bytes::{Buf, BytesMut};
use std::io::Write as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest accepted request head.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024 * 1024;
const MAX_HEADERS: usize = 128;

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
}

impl Request {
    /// Path without the query string.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

/// Why a request could not be read. `status` is what to answer before closing, if anything.
#[derive(Debug)]
pub struct ReadError {
    pub status: Option<u16>,
    pub message: String,
}

impl ReadError {
    fn io(e: std::io::Error) -> Self {
        ReadError {
            status: None,
            message: e.to_string(),
        }
    }
    fn bad(status: u16, message: impl Into<String>) -> Self {
        ReadError {
            status: Some(status),
            message: message.into(),
        }
    }
}

/// Reads more bytes into `buf`; an EOF is an error (the caller needed more).
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<(), ReadError> {
    buf.reserve(8 * 1024);
    match stream.read_buf(buf).await {
        Ok(0) => Err(ReadError {
            status: None,
            message: "unexpected EOF".into(),
        }),
        Ok(_) => Ok(()),
        Err(e) => Err(ReadError::io(e)),
    }
}

/// Reads the next request from a keep-alive connection. `Ok(None)` on a clean EOF between
/// requests. Bytes after the request (pipelining) stay in `buf`.
pub async fn read_request<S>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<Request>, ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Head.
    let (head_len, method, path, headers, version) = loop {
        if !buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect();
                    break (
                        n,
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                        headers,
                        req.version.unwrap_or(1),
                    );
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() >= MAX_HEAD {
                        return Err(ReadError::bad(431, "request head too large"));
                    }
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(ReadError::bad(431, "too many headers"))
                }
                Err(e) => return Err(ReadError::bad(400, format!("bad request head: {e}"))),
            }
        }
        buf.reserve(8 * 1024);
        match stream.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(ReadError {
                    status: None,
                    message: "EOF inside request head".into(),
                })
            }
            Ok(_) => {}
            Err(e) => return Err(ReadError::io(e)),
        }
    };
    buf.advance(head_len);

    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let connection = find("connection").unwrap_or("").to_ascii_lowercase();
    let close = if version == 0 {
        !connection.contains("keep-alive")
    } else {
        connection.split(',').any(|t| t.trim() == "close")
    };
    let chunked = find("transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false);
    let content_length = match find("content-length") {
        Some(v) if !chunked => Some(
            v.parse::<usize>()
                .map_err(|_| ReadError::bad(400, "invalid Content-Length"))?,
        ),
        _ => None,
    };
    if content_length.is_some_and(|n| n > MAX_BODY) {
        return Err(ReadError::bad(413, "request body too large"));
    }
    let expects_body = chunked || content_length.is_some_and(|n| n > 0);
    if expects_body
        && find("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        && buf.is_empty()
    {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(ReadError::io)?;
    }

    let body = if chunked {
        read_chunked(stream, buf).await?
    } else {
        let n = content_length.unwrap_or(0);
        while buf.len() < n {
            fill(stream, buf).await?;
        }
        buf.split_to(n).to_vec()
    };
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
        close,
    }))
}

/// Index of the first CRLF in `buf`.
fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

async fn read_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Vec<u8>, ReadError> {
    loop {
        if let Some(i) = find_crlf(buf) {
            let line = buf.split_to(i).to_vec();
            buf.advance(2);
            return Ok(line);
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::bad(400, "chunk line too long"));
        }
        fill(stream, buf).await?;
    }
}

async fn read_chunked<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(stream, buf).await?;
        let line = String::from_utf8_lossy(&line);
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| ReadError::bad(400, "invalid chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(stream, buf).await?.is_empty() {}
            return Ok(body);
        }
        if body.len().saturating_add(size) > MAX_BODY {
            return Err(ReadError::bad(413, "request body too large"));
        }
        while buf.len() < size + 2 {
            fill(stream, buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(ReadError::bad(400, "missing CRLF after chunk"));
        }
        buf.advance(size + 2);
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Response head with a Content-Length (`extra` headers are `Name: value` pairs).
pub fn head(
    status: u16,
    content_type: &str,
    len: usize,
    extra: &[(&str, String)],
    close: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + len);
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n",
        reason(status)
    );
    for (name, value) in extra {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Full response (head + body) in one buffer.
pub fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, String)],
    close: bool,
) -> Vec<u8> {
    let mut out = head(status, content_type, body.len(), extra, close);
    out.extend_from_slice(body);
    out
}

/// Head of a streamed (chunked) event-stream response.
pub fn stream_head(close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
    );
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Appends one HTTP chunk holding `data: <payload>\n\n`.
pub fn push_event(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len() + "data: \n\n".len();
    let _ = write!(out, "{len:x}\r\ndata: ");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\n\n\r\n");
}

/// Appends one HTTP chunk holding exactly `raw`.
pub fn push_raw_chunk(out: &mut Vec<u8>, raw: &[u8]) {
    let _ = write!(out, "{:x}\r\n", raw.len());
    out.extend_from_slice(raw);
    out.extend_from_slice(b"\r\n");
}

/// The terminating zero-length chunk.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse_all(input: &[u8]) -> Vec<Result<Option<Request>, ReadError>> {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        loop {
            let r = read_request(&mut server, &mut buf).await;
            let stop = !matches!(r, Ok(Some(_)));
            out.push(r);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn pipelined_and_chunked() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /b?x=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhe\r\n3;ext=1\r\nllo\r\n0\r\n\r\n";
        let out = parse_all(input).await;
        assert_eq!(out.len(), 3);
        let a = out[0].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(
            (a.path.as_str(), a.body.as_slice(), a.close),
            ("/a", &b"abc"[..], false)
        );
        let b = out[1].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(
            (b.route(), b.body.as_slice(), b.close),
            ("/b", &b"hello"[..], true)
        );
        assert!(matches!(out[2], Ok(None)));
    }

    #[tokio::test]
    async fn malformed_heads_do_not_panic() {
        for input in [
            &b"GARBAGE\x00\x01 \r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/1.1\r\nHost",
        ] {
            let out = parse_all(input).await;
            assert!(out.last().unwrap().is_err(), "{input:?}");
        }
    }

    #[test]
    fn event_framing() {
        let mut out = Vec::new();
        push_event(&mut out, b"{}");
        assert_eq!(out, b"a\r\ndata: {}\n\n\r\n");
    }
}
