//! `cache` stage: answers a question asked before — exactly (normalized text) or in other
//! words (sentence embeddings, with a precision guard) — from a SQLite file on the device.
//! Only complete, successful text answers (`finish_reason: stop`, no tool calls) are stored;
//! hits replay through the same JSON/SSE encoders as live answers. The lookup has a hard time
//! budget: on timeout the cache is skipped, never waited for.

pub mod guard;
pub mod key;
pub mod store;

use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::turn::{Reply, Turn};
use crate::wire::{Chunk, LocalAnswer, Usage};
use async_trait::async_trait;
use futures::StreamExt;
use key::CacheKey;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::Store;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// The SQLite file (default: ~/.local/share/kotaemon/cache.db).
    pub path: Option<PathBuf>,
    /// Answers older than this are not served.
    pub ttl_s: u64,
    /// Least recently used entries beyond this are evicted.
    pub max_entries: usize,
    /// Match questions asked in other words (needs an embedding model).
    pub semantic: bool,
    /// Installed embedding model (`kotaemon models list`) or a directory.
    pub embedding_model: String,
    /// Cosine similarity a semantic hit needs, before the precision guard.
    pub threshold: f32,
    /// Check numbers, negation and roles on semantic hits.
    pub guard: bool,
    /// Time budget of a lookup, embedding included; past it the cache is skipped.
    pub lookup_budget_ms: u64,
    /// Also cache requests that ask for randomness (temperature > 0, n > 1).
    pub include_sampled: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            path: None,
            ttl_s: 7 * 24 * 3600,
            max_entries: 10_000,
            semantic: true,
            embedding_model: "all-minilm-l6-v2".into(),
            threshold: 0.9,
            guard: true,
            lookup_budget_ms: 150,
            include_sampled: false,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.threshold) {
            p.push(format!("{path}.threshold: must be between 0 and 1"));
        }
        if self.max_entries == 0 {
            p.push(format!("{path}.max_entries: must be at least 1"));
        }
        if self.lookup_budget_ms == 0 {
            p.push(format!("{path}.lookup_budget_ms: must be greater than 0"));
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| crate::models::default_data_dir().join("cache.db"))
    }
}

/// Sentence embeddings, unit length. Implemented over `kotaemon-embed`; a trait so the stage
/// does not care which model or engine.
pub trait Embed: Send + Sync {
    fn model_id(&self) -> &str;
    fn dim(&self) -> usize;
    fn embed(&self, text: &str) -> Result<Vec<f32>, String>;
}

/// What the client asked of the cache (`x-kotaemon-cache` request header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Neither read nor write.
    Bypass,
    /// Do not read; store the fresh answer.
    Refresh,
}

pub struct Cache {
    store: Arc<Store>,
    embed: Option<Arc<dyn Embed>>,
    config: CacheConfig,
}

enum Lookup {
    Hit {
        entry: store::Entry,
        layer: &'static str,
        similarity: Option<f32>,
    },
    Miss {
        embedding: Option<Vec<f32>>,
        refused: Option<&'static str>,
    },
}

impl Cache {
    /// Opens the database. `embed` is the embedding model when semantic matching is on.
    pub fn new(config: &CacheConfig, embed: Option<Arc<dyn Embed>>) -> Result<Self, String> {
        let (model, dim) = embed.as_ref().map_or(("none".to_string(), 0), |e| {
            (e.model_id().to_string(), e.dim())
        });
        let store = Store::open(&config.db_path(), &model, dim, config.max_entries)
            .map_err(|e| e.to_string())?;
        Ok(Cache {
            store: Arc::new(store),
            embed,
            config: config.clone(),
        })
    }

    /// Exact, then semantic; blocking (SQLite, embedding), so run off the async threads.
    fn lookup(
        store: &Store,
        embed: Option<&dyn Embed>,
        config: &CacheConfig,
        key: &CacheKey,
    ) -> Result<Lookup, String> {
        if let Some(entry) = store.exact(key, config.ttl_s).map_err(|e| e.to_string())? {
            return Ok(Lookup::Hit {
                entry,
                layer: "hit-exact",
                similarity: None,
            });
        }
        let Some(embed) = embed else {
            return Ok(Lookup::Miss {
                embedding: None,
                refused: None,
            });
        };
        let embedding = embed.embed(&key.prompt)?;
        let mut refused = None;
        if let Some((id, similarity)) = store.nearest(&key.namespace, &embedding) {
            if similarity >= config.threshold {
                if let Some(entry) = store
                    .get_fresh(id, config.ttl_s)
                    .map_err(|e| e.to_string())?
                {
                    match config
                        .guard
                        .then(|| guard::disagreement(&key.prompt, &entry.prompt))
                        .flatten()
                    {
                        None => {
                            return Ok(Lookup::Hit {
                                entry,
                                layer: "hit-semantic",
                                similarity: Some(similarity),
                            })
                        }
                        Some(why) => refused = Some(why),
                    }
                }
            }
        }
        Ok(Lookup::Miss {
            embedding: Some(embedding),
            refused,
        })
    }

    fn store_later(
        &self,
        key: CacheKey,
        embedding: Option<Vec<f32>>,
        answer: String,
        usage: Usage,
    ) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.insert(&key, embedding.as_deref(), &answer, usage) {
                tracing::warn!("cache write failed: {e}");
            }
        });
    }
}

/// A stored answer must be plain text that finished normally.
fn cacheable_completion(c: &crate::wire::Completion) -> Option<String> {
    let has_tools = c
        .body
        .pointer("/choices/0/message/tool_calls")
        .is_some_and(|t| !t.is_null());
    (c.finish_reason() == Some("stop") && !has_tools)
        .then(|| c.content().map(str::to_string))
        .flatten()
}

#[async_trait]
impl Stage for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    async fn handle(&self, turn: Turn, next: Next<'_>) -> Result<Reply, TurnError> {
        let ctx = turn.ctx.clone();
        let outcome = |code: &'static str, similarity: Option<f32>| {
            ctx.annotate(|m| {
                m.cache = Some(code);
                m.cache_similarity = similarity;
            });
            ctx.emit(TurnEvent::CacheLookup {
                turn: ctx.id.clone(),
                outcome: code,
                similarity,
            });
        };
        let key = match key::key_for(
            &turn,
            turn.hints.client.as_deref(),
            self.config.include_sampled,
        ) {
            Ok(k) => k,
            Err(skip) => {
                outcome(skip.code(), None);
                return next.run(turn).await;
            }
        };
        let directive = turn.hints.cache;
        if directive == Some(Directive::Bypass) {
            outcome("bypass", None);
            return next.run(turn).await;
        }
        let mut embedding = None;
        if directive != Some(Directive::Refresh) {
            let (store, embed, config, k) = (
                self.store.clone(),
                self.embed.clone(),
                self.config.clone(),
                key.clone(),
            );
            let started = tokio::time::Instant::now();
            let budget = Duration::from_millis(self.config.lookup_budget_ms);
            let job = tokio::task::spawn_blocking(move || {
                Self::lookup(&store, embed.as_deref(), &config, &k)
            });
            match tokio::time::timeout(budget, job).await {
                Ok(Ok(Ok(Lookup::Hit {
                    entry,
                    layer,
                    similarity,
                }))) => {
                    outcome(layer, similarity);
                    crate::events::metrics::cache_lookup_time(layer, started.elapsed());
                    ctx.answered_on_device("cache", &entry.answer);
                    // A hit costs no tokens: usage says so.
                    let answer = LocalAnswer::new(
                        "cache",
                        &turn.request.model,
                        entry.answer,
                        Usage::default(),
                    );
                    return Ok(super::rules::local_reply(
                        &answer,
                        turn.request.wants_stream(),
                    ));
                }
                Ok(Ok(Ok(Lookup::Miss {
                    embedding: e,
                    refused,
                }))) => {
                    embedding = e;
                    crate::events::metrics::cache_lookup_time("miss", started.elapsed());
                    outcome(
                        if refused.is_some() {
                            "miss-guarded"
                        } else {
                            "miss"
                        },
                        None,
                    );
                    if let Some(why) = refused {
                        crate::events::metrics::cache_guard_refusal(why);
                    }
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!("cache lookup failed, skipping the cache: {e}");
                    outcome("error", None);
                }
                Ok(Err(_)) | Err(_) => {
                    // The blocking job finishes on its own; its result is simply not awaited.
                    outcome("timeout", None);
                }
            }
        } else {
            outcome("refresh", None);
        }
        let ctx = turn.ctx.clone();
        let reply = next.run(turn).await?;
        Ok(match reply {
            Reply::Complete(c) => {
                if ctx.meta().acted {
                    // Answers made with tools depend on the world, not only the question.
                } else if let Some(text) = cacheable_completion(&c) {
                    self.store_later(key, embedding, text, c.usage().unwrap_or_default());
                }
                Reply::Complete(c)
            }
            Reply::Stream(stream) => {
                Reply::Stream(self.store_stream_on_success(stream, key, embedding, ctx))
            }
        })
    }
}

impl Cache {
    /// Passes the stream through untouched, collecting its text; stores it only if the stream
    /// reaches its end with `finish_reason: stop`, no tool calls and no error. A client that
    /// hangs up early drops the stream before its end: nothing is stored.
    fn store_stream_on_success(
        &self,
        stream: crate::turn::ChunkStream,
        key: CacheKey,
        embedding: Option<Vec<f32>>,
        ctx: crate::turn::TurnCtx,
    ) -> crate::turn::ChunkStream {
        struct State {
            ctx: crate::turn::TurnCtx,
            inner: crate::turn::ChunkStream,
            text: String,
            finished: bool,
            spoiled: bool,
            usage: Usage,
            store: Arc<Store>,
            key: CacheKey,
            embedding: Option<Vec<f32>>,
        }
        let state = State {
            ctx,
            inner: stream,
            text: String::new(),
            finished: false,
            spoiled: false,
            usage: Usage::default(),
            store: self.store.clone(),
            key,
            embedding,
        };
        futures::stream::unfold(state, |mut s| async move {
            match s.inner.next().await {
                Some(Ok(chunk)) => {
                    if let Some(d) = chunk.content_delta() {
                        s.text.push_str(d);
                    }
                    s.finished |= chunk.finish_reason() == Some("stop");
                    s.spoiled |= chunk
                        .body
                        .pointer("/choices/0/delta/tool_calls")
                        .is_some_and(|t| !t.is_null());
                    if let Some(u) = chunk.usage() {
                        s.usage = u;
                    }
                    Some((Ok::<Chunk, _>(chunk), s))
                }
                Some(Err(e)) => {
                    s.spoiled = true;
                    Some((Err(e), s))
                }
                None => {
                    if s.finished && !s.spoiled && !s.ctx.meta().acted {
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) =
                                s.store
                                    .insert(&s.key, s.embedding.as_deref(), &s.text, s.usage)
                            {
                                tracing::warn!("cache write failed: {e}");
                            }
                        });
                    }
                    None
                }
            }
        })
        .boxed()
    }
}
