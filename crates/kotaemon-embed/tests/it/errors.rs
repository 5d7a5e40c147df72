//! Bad model directories fail `load` with the right variant and the path; nothing panics.

use std::fs;
use std::path::Path;

use kotaemon_embed::{EmbedConfig, EmbedError, Embedder};

use crate::common::minilm_dir;

fn load(dir: &Path) -> Result<Embedder, EmbedError> {
    Embedder::load(EmbedConfig::new(dir))
}

/// A copy of the MiniLM directory (weights as given) in a fresh temp dir.
fn copy_minilm(weights: Option<&[u8]>) -> tempfile::TempDir {
    let src = minilm_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "tokenizer.json"] {
        fs::copy(src.join(f), tmp.path().join(f)).expect("copy");
    }
    match weights {
        Some(bytes) => fs::write(tmp.path().join("model.safetensors"), bytes).expect("write"),
        None => fs::copy(
            src.join("model.safetensors"),
            tmp.path().join("model.safetensors"),
        )
        .map(|_| ())
        .expect("copy"),
    }
    tmp
}

#[test]
fn missing_dir_names_the_dir() {
    let dir = Path::new("/nonexistent/kotaemon/model");
    match load(dir) {
        Err(EmbedError::MissingFile(p)) => assert_eq!(p, dir),
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn missing_files_name_the_file() {
    for missing in ["config.json", "tokenizer.json", "model.safetensors"] {
        let tmp = copy_minilm(None);
        fs::remove_file(tmp.path().join(missing)).expect("remove");
        match load(tmp.path()) {
            Err(EmbedError::MissingFile(p)) => assert_eq!(p, tmp.path().join(missing)),
            other => panic!("{missing}: expected MissingFile, got {other:?}"),
        }
    }
}

#[test]
fn missing_file_message_says_what_to_provide() {
    let e = load(Path::new("/nonexistent/m")).expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("/nonexistent/m") && msg.contains("tokenizer.json"),
        "{msg}"
    );
    assert_eq!(e.code(), "embed_missing_file");
}

#[test]
fn truncated_safetensors_is_bad_model() {
    let full = fs::read(minilm_dir().join("model.safetensors")).expect("read");
    // Cut inside the header, then inside the tensor data.
    for cut in [10, 1000, full.len() / 2, full.len() - 1] {
        let tmp = copy_minilm(Some(&full[..cut]));
        match load(tmp.path()) {
            Err(EmbedError::BadModel(msg)) => {
                assert!(msg.contains("model.safetensors"), "cut {cut}: {msg}")
            }
            other => panic!("cut {cut}: expected BadModel, got {other:?}"),
        }
    }
}

#[test]
fn garbage_and_empty_weights_are_bad_model() {
    for bytes in [
        &b""[..],
        &b"not a safetensors file at all"[..],
        &[0xff; 64][..],
    ] {
        let tmp = copy_minilm(Some(bytes));
        assert!(matches!(load(tmp.path()), Err(EmbedError::BadModel(_))));
    }
}

#[test]
fn broken_json_files_are_bad_model() {
    for file in ["config.json", "tokenizer.json"] {
        let tmp = copy_minilm(None);
        fs::write(tmp.path().join(file), "{ not json").expect("write");
        match load(tmp.path()) {
            Err(EmbedError::BadModel(msg)) => assert!(msg.contains(file), "{msg}"),
            other => panic!("{file}: expected BadModel, got {other:?}"),
        }
    }
}

#[test]
fn unsupported_architecture_is_bad_model() {
    let tmp = copy_minilm(None);
    let cfg = fs::read_to_string(tmp.path().join("config.json")).expect("read");
    let cfg = cfg.replace("\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
    assert!(cfg.contains("gpt2"), "config.json layout changed");
    fs::write(tmp.path().join("config.json"), cfg).expect("write");
    match load(tmp.path()) {
        Err(EmbedError::BadModel(msg)) => assert!(msg.contains("gpt2"), "{msg}"),
        other => panic!("expected BadModel, got {other:?}"),
    }
}

#[test]
fn weights_of_the_wrong_shape_are_bad_model() {
    let tmp = copy_minilm(None);
    let cfg = fs::read_to_string(tmp.path().join("config.json")).expect("read");
    let cfg = cfg.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7");
    assert!(
        cfg.contains("\"num_hidden_layers\": 7"),
        "config.json layout changed"
    );
    fs::write(tmp.path().join("config.json"), cfg).expect("write");
    assert!(matches!(load(tmp.path()), Err(EmbedError::BadModel(_))));
}

#[test]
fn max_tokens_below_two_is_rejected() {
    let cfg = EmbedConfig {
        max_tokens: 1,
        ..EmbedConfig::new(minilm_dir())
    };
    assert!(matches!(Embedder::load(cfg), Err(EmbedError::BadModel(_))));
}

#[test]
fn zero_threads_means_all_cores() {
    let cfg = EmbedConfig {
        threads: 0,
        ..EmbedConfig::new(minilm_dir())
    };
    let e = Embedder::load(cfg).expect("load");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(e.threads(), cores);
}
