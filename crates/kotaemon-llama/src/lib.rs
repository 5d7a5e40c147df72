//! Kotaemon's local small model: a GGUF file run by llama.cpp (through `llama-cpp-2`).
//!
//! This is a leaf crate: it knows nothing of Kotaemon's core. [`LocalEngine::load`] loads the
//! model once and starts one dedicated worker thread that owns the llama.cpp context; jobs are
//! queued FIFO ([`LocalEngine::generate`]) and decoded one at a time, each streaming
//! [`GenEvent`]s back over a tokio channel. Dropping the receiver cancels the job.
//!
//! - `engine` — the worker thread and its bounded queue.
//! - [`detok`] — incremental UTF-8 assembly and stop strings (pure, unit-tested).
//! - `chat` — chat template rendering (llama.cpp's built-in engine, or a plain fallback).
//! - `types` — the public data types (config, params, events, stats).
//! - `logs` — llama.cpp's logging routed into `tracing` (target `llama_cpp`).
//! - `raw_bench` — a minimal direct llama.cpp loop, the baseline of `kotaemon bench local`.

mod chat;
pub mod detok;
mod engine;
mod error;
mod logs;
mod raw_bench;
mod types;

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

pub use chat::ROLES;
pub use error::LlamaError;
pub use raw_bench::{raw_bench, raw_bench_with, tokens_per_second, RawBench, RawPrompt};
pub use types::{
    ChatTemplateSource, ChatTurn, EngineConfig, FinishReason, GenEvent, GenReceiver, GenStats,
    GenerateParams, ModelInfo, AUTO_N_CTX_CAP, DEFAULT_MAX_QUEUE, DEFAULT_N_BATCH,
};

/// A loaded local model with its worker thread. Cheap to clone; the worker stops when the last
/// clone is dropped (queued jobs then get `EngineStopped`).
#[derive(Clone)]
pub struct LocalEngine {
    inner: Arc<Inner>,
}

struct Inner {
    info: ModelInfo,
    model: Arc<LlamaModel>,
    template: Option<LlamaChatTemplate>,
    shared: Arc<engine::Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop();
        let handle = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            // The worker notices the stop flag within one token.
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine")
            .field("info", &self.inner.info)
            .field("queue_len", &self.queue_len())
            .finish()
    }
}

/// llama.cpp's backend is process-global and may be initialised only once.
fn backend() -> Result<&'static LlamaBackend, LlamaError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    logs::install();
    BACKEND
        .get_or_init(|| LlamaBackend::init().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| LlamaError::Load(format!("llama.cpp backend init failed: {e}")))
}

/// Checks the file exists and starts with the GGUF magic; returns its size.
fn check_gguf(path: &Path) -> Result<u64, LlamaError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Err(LlamaError::ModelNotFound(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LlamaError::ModelNotFound(path.to_path_buf()))
        }
        Err(e) => return Err(LlamaError::Load(format!("{}: {e}", path.display()))),
    };
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) if &magic == b"GGUF" => Ok(meta.len()),
        Ok(()) => Err(LlamaError::NotGguf(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(LlamaError::NotGguf(path.to_path_buf()))
        }
        Err(e) => Err(LlamaError::Load(format!("{}: {e}", path.display()))),
    }
}

impl LocalEngine {
    /// Loads the model (blocking) and starts the worker thread that owns the context.
    pub fn load(cfg: EngineConfig) -> Result<LocalEngine, LlamaError> {
        let started = Instant::now();
        let path = cfg.model_path.as_path();
        let size_bytes = check_gguf(path)?;
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| LlamaError::Load(format!("{}: {e}", path.display())))?;
        let model = Arc::new(model);

        let n_ctx_train = model.n_ctx_train();
        let n_ctx = match cfg.n_ctx {
            0 if n_ctx_train == 0 => AUTO_N_CTX_CAP,
            0 => n_ctx_train.min(AUTO_N_CTX_CAP),
            n => n,
        };
        let n_threads = match cfg.n_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let settings = engine::CtxSettings {
            n_ctx,
            n_threads: i32::try_from(n_threads).unwrap_or(i32::MAX),
            n_batch: if cfg.n_batch == 0 {
                DEFAULT_N_BATCH
            } else {
                cfg.n_batch
            },
        };
        let max_queue = if cfg.max_queue == 0 {
            DEFAULT_MAX_QUEUE
        } else {
            cfg.max_queue
        };
        let (template, chat_template) = chat::choose_template(&model);
        let shared = Arc::new(engine::Shared::new(max_queue));
        let (worker, n_ctx) = engine::spawn(model.clone(), backend, settings, shared.clone())?;

        let name = model
            .meta_val_str("general.name")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let info = ModelInfo {
            name,
            n_ctx_train,
            n_ctx,
            n_params: model.n_params(),
            size_bytes,
            has_chat_template: template.is_some(),
            chat_template,
            load_time: started.elapsed(),
        };
        tracing::info!(
            model = %info.name,
            n_ctx = info.n_ctx,
            n_threads,
            max_queue,
            chat_template = ?chat_template,
            load_ms = info.load_time.as_millis() as u64,
            "local model loaded"
        );
        Ok(LocalEngine {
            inner: Arc::new(Inner {
                info,
                model,
                template,
                shared,
                worker: Mutex::new(Some(worker)),
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// Renders a chat into the prompt text the model expects: the GGUF's chat template through
    /// llama.cpp's template engine, else llama.cpp's built-in template matching the
    /// vocabulary's turn tokens ([`ModelInfo::chat_template`]), else the fallback
    /// `"{Role}: {content}\n\n"` per turn (`System`/`User`/`Assistant`), ending with
    /// `"Assistant:"` when `add_generation_prompt` is set.
    pub fn render_chat(
        &self,
        turns: &[ChatTurn],
        add_generation_prompt: bool,
    ) -> Result<String, LlamaError> {
        chat::render(
            &self.inner.model,
            self.inner.template.as_ref(),
            turns,
            add_generation_prompt,
        )
    }

    /// Tokens in `text` as plain text (no BOS added; special-token markup is recognised).
    pub fn count_tokens(&self, text: &str) -> Result<u32, LlamaError> {
        let n = self.tokenize(text, false)?.len();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<LlamaToken>, LlamaError> {
        if text.len() > chat::MAX_CHAT_BYTES {
            return Err(LlamaError::Template(format!(
                "text is {} bytes; the limit is {}",
                text.len(),
                chat::MAX_CHAT_BYTES
            )));
        }
        let vocab = self.inner.model.vocab();
        let mut tokens = vocab.tokenize(text.as_bytes(), add_bos, true);
        // A template that writes BOS itself plus add_bos would give two.
        if add_bos && tokens.len() >= 2 && tokens[0] == vocab.bos() && tokens[1] == vocab.bos() {
            tokens.remove(0);
        }
        Ok(tokens)
    }

    /// Queues a job (FIFO; one job decodes at a time) and returns its event stream at once.
    ///
    /// The prompt is `render_chat(&turns, true)`. Errors before queueing: `Template`,
    /// `InvalidParams`, `ContextTooLong` (prompt + 1 token does not fit in `n_ctx`),
    /// `QueueFull` (`max_queue` jobs already waiting), `EngineStopped`. The stream then carries
    /// pieces and `Done`, or one `Err` (`Decode`, `EngineStopped`). Generation ends at an
    /// end-of-generation token (`Stop`), at `max_tokens` or a full context (`Length`), or at a
    /// stop string (`StopSequence`). Dropping the receiver cancels the job before its next token.
    pub fn generate(
        &self,
        turns: Vec<ChatTurn>,
        params: GenerateParams,
    ) -> Result<GenReceiver, LlamaError> {
        let enqueued = Instant::now();
        params.validate()?;
        let prompt = self.render_chat(&turns, true)?;
        let tokens = self.tokenize(&prompt, true)?;
        let n_ctx = self.inner.info.n_ctx;
        if tokens.len() + 1 > n_ctx as usize {
            return Err(LlamaError::ContextTooLong {
                prompt_tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
                n_ctx,
            });
        }
        if tokens.is_empty() {
            return Err(LlamaError::Template("the rendered prompt is empty".into()));
        }
        // Room for every possible piece plus the final event, so the worker never blocks on a
        // slow reader (pieces <= generated tokens <= min(max_tokens, n_ctx) + 1).
        let capacity = (params.max_tokens.min(n_ctx) as usize).saturating_add(4);
        let (tx, rx) = mpsc::channel(capacity);
        self.inner.shared.submit(engine::Job {
            tokens,
            params,
            tx,
            enqueued,
        })?;
        Ok(rx)
    }

    /// Jobs waiting (not counting the one being decoded).
    pub fn queue_len(&self) -> usize {
        self.inner.shared.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_check_reports_path() {
        let dir = std::env::temp_dir().join(format!("kotaemon-llama-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short.gguf");
        std::fs::write(&short, b"GG").unwrap();
        let e = check_gguf(&short).unwrap_err();
        assert!(matches!(e, LlamaError::NotGguf(_)));
        assert!(e.to_string().contains("short.gguf"));
        let ok = dir.join("ok.gguf");
        std::fs::write(&ok, b"GGUF\x03\x00\x00\x00").unwrap();
        assert_eq!(check_gguf(&ok).unwrap(), 8);
        assert!(matches!(
            check_gguf(&dir),
            Err(LlamaError::ModelNotFound(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
