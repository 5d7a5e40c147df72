//! Reading a sentence-transformers style model directory.
//!
//! Required: `config.json` (BERT family), `tokenizer.json`, and the weights as
//! `model.safetensors` (preferred) or `pytorch_model.bin`.
//! Optional, as sentence-transformers writes them:
//! - `1_Pooling/config.json`: mean (default) or CLS pooling;
//! - `config_sentence_transformers.json`: `prompts` + `default_prompt_name`,
//!   a text prefix applied to every input (E5 models want `"query: "`).

use std::path::{Path, PathBuf};

use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;

use crate::EmbedError;

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the tokens the attention mask keeps.
    Mean,
    /// The first token (`[CLS]` / `<s>`).
    Cls,
}

/// The weights file and its format.
#[derive(Debug, Clone)]
pub enum WeightsFile {
    Safetensors(PathBuf),
    Pickle(PathBuf),
}

/// Everything found in a model directory, validated, before any weight is read.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub bert: BertConfig,
    pub tokenizer_path: PathBuf,
    pub weights: WeightsFile,
    pub pooling: Pooling,
    pub prefix: String,
}

#[derive(Deserialize)]
struct ModelTypeProbe {
    model_type: Option<String>,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct StConfig {
    #[serde(default)]
    prompts: std::collections::HashMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

fn require(path: PathBuf) -> Result<PathBuf, EmbedError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(EmbedError::MissingFile(path))
    }
}

fn read_text(path: &Path) -> Result<String, EmbedError> {
    std::fs::read_to_string(path)
        .map_err(|e| EmbedError::BadModel(format!("cannot read {}: {e}", path.display())))
}

fn parse_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EmbedError> {
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| EmbedError::BadModel(format!("cannot parse {}: {e}", path.display())))
}

impl ModelDir {
    /// Finds and checks every file; reads only the small JSON ones.
    pub fn open(dir: &Path) -> Result<ModelDir, EmbedError> {
        if !dir.is_dir() {
            return Err(EmbedError::MissingFile(dir.to_path_buf()));
        }
        let config_path = require(dir.join("config.json"))?;
        let tokenizer_path = require(dir.join("tokenizer.json"))?;
        let st = dir.join("model.safetensors");
        let pickle = dir.join("pytorch_model.bin");
        let weights = if st.is_file() {
            WeightsFile::Safetensors(st)
        } else if pickle.is_file() {
            WeightsFile::Pickle(pickle)
        } else {
            return Err(EmbedError::MissingFile(st));
        };

        let probe: ModelTypeProbe = parse_json(&config_path)?;
        match probe.model_type.as_deref() {
            None | Some("bert") => {}
            Some(other) => {
                return Err(EmbedError::BadModel(format!(
                    "{}: model_type {other:?} is not supported (supported: \"bert\")",
                    config_path.display()
                )))
            }
        }
        let bert: BertConfig = parse_json(&config_path)?;
        // checked_rem: None for zero heads (`is_multiple_of` needs Rust 1.87; MSRV is 1.85).
        if bert.hidden_size == 0
            || bert.hidden_size.checked_rem(bert.num_attention_heads) != Some(0)
        {
            return Err(EmbedError::BadModel(format!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                config_path.display(),
                bert.hidden_size,
                bert.num_attention_heads
            )));
        }

        let pooling = read_pooling(dir)?;
        let prefix = read_prefix(dir)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            bert,
            tokenizer_path,
            weights,
            pooling,
            prefix,
        })
    }

    /// The directory's last component, for `model_id`.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string())
    }
}

fn read_pooling(dir: &Path) -> Result<Pooling, EmbedError> {
    let path = dir.join("1_Pooling").join("config.json");
    if !path.is_file() {
        return Ok(Pooling::Mean);
    }
    let p: PoolingConfig = parse_json(&path)?;
    let unsupported = p.pooling_mode_max_tokens
        || p.pooling_mode_mean_sqrt_len_tokens
        || p.pooling_mode_weightedmean_tokens
        || p.pooling_mode_lasttoken;
    match (
        p.pooling_mode_mean_tokens,
        p.pooling_mode_cls_token,
        unsupported,
    ) {
        (true, false, false) => Ok(Pooling::Mean),
        (false, true, false) => Ok(Pooling::Cls),
        _ => Err(EmbedError::BadModel(format!(
            "{}: only one of pooling_mode_mean_tokens / pooling_mode_cls_token is supported",
            path.display()
        ))),
    }
}

fn read_prefix(dir: &Path) -> Result<String, EmbedError> {
    let path = dir.join("config_sentence_transformers.json");
    if !path.is_file() {
        return Ok(String::new());
    }
    let c: StConfig = parse_json(&path)?;
    match c.default_prompt_name {
        None => Ok(String::new()),
        Some(name) => c.prompts.get(&name).cloned().ok_or_else(|| {
            EmbedError::BadModel(format!(
                "{}: default_prompt_name {name:?} is not in prompts",
                path.display()
            ))
        }),
    }
}
