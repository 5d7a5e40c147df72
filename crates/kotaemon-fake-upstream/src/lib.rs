//! A small, honest, scripted OpenAI-compatible HTTP/1.1 server for Kotaemon's integration tests
//! (fault injection) and benchmarks (no added latency by default).
//!
//! It is written on raw tokio TCP + `httparse` so that it can misbehave at the byte level:
//! reset connections, stall, write malformed bytes. Each chat-completions request pops the next
//! queued [`Script`] (or uses the default one) and answers accordingly.
//!
//! Endpoints: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, and control endpoints
//! for out-of-process use: `POST /_fake/script`, `POST /_fake/default`, `GET /_fake/requests`,
//! `POST /_fake/reset`, `POST /_fake/models` (`{"ids": [..], "status": N}`, both optional).

mod chat;
mod script;
mod server;
pub mod services;
mod wire;

pub use script::{Fault, Script, ScriptToolCall, DEFAULT_TEXT};
pub use server::{FakeUpstream, RecordedRequest, MAX_RECORDED};
