//! Loading, model info, chat rendering, and bad model files.

use kotaemon_llama::{ChatTemplateSource, ChatTurn, EngineConfig, LlamaError, LocalEngine};

use crate::{engine, expect_err, model_path};

#[test]
fn loads_with_sane_info() {
    let info = engine().info();
    assert!(info.n_ctx_train >= 2048, "{info:?}");
    assert!(info.n_ctx > 0 && info.n_ctx <= 8192, "{info:?}");
    assert!(info.n_ctx <= info.n_ctx_train, "{info:?}");
    assert!(info.has_chat_template, "Gemma has a chat format: {info:?}");
    // This GGUF ships without tokenizer.chat_template; its turn tokens identify the family.
    assert!(
        matches!(
            info.chat_template,
            ChatTemplateSource::Gguf | ChatTemplateSource::Builtin("gemma")
        ),
        "{info:?}"
    );
    assert!(info.n_params > 100_000_000, "{info:?}");
    let file_len = std::fs::metadata(model_path())
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(info.size_bytes, file_len);
    assert!(!info.name.is_empty());
    eprintln!(
        "model {:?}: n_ctx_train {} n_ctx {} params {} loaded in {:?}",
        info.name, info.n_ctx_train, info.n_ctx, info.n_params, info.load_time
    );
}

#[test]
fn renders_gemma_turns() {
    let turns = [
        ChatTurn::new("system", "Be brief."),
        ChatTurn::new("user", "Hi"),
        ChatTurn::new("assistant", "Hello!"),
        ChatTurn::new("user", "Bye"),
    ];
    let prompt = engine().render_chat(&turns, true).unwrap();
    assert!(prompt.contains("<start_of_turn>user\n"), "{prompt}");
    assert!(prompt.contains("<end_of_turn>"), "{prompt}");
    assert!(prompt.contains("<start_of_turn>model\nHello!"), "{prompt}");
    assert!(prompt.contains("Be brief."), "{prompt}");
    assert!(prompt.ends_with("<start_of_turn>model\n"), "{prompt}");
    let no_gen = engine().render_chat(&turns, false).unwrap();
    assert!(!no_gen.ends_with("<start_of_turn>model\n"), "{no_gen}");

    let bad = expect_err(engine().render_chat(&[ChatTurn::new("robot", "x")], true));
    assert!(matches!(bad, LlamaError::Template(_)), "{bad}");
}

#[test]
fn counts_tokens() {
    let e = engine();
    let n = e.count_tokens("Hello world, this is a test.").unwrap();
    assert!((3..=12).contains(&n), "{n}");
    // Special-token markup counts as one token each.
    assert_eq!(e.count_tokens("<start_of_turn>").unwrap(), 1);
    assert_eq!(e.count_tokens("").unwrap(), 0);
}

#[test]
fn missing_file_is_model_not_found() {
    let path = std::env::temp_dir().join("kotaemon-llama-it-does-not-exist.gguf");
    let e = expect_err(LocalEngine::load(EngineConfig::new(&path)));
    assert!(matches!(e, LlamaError::ModelNotFound(_)), "{e}");
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
}

#[test]
fn random_bytes_are_not_gguf() {
    let path = std::env::temp_dir().join(format!(
        "kotaemon-llama-it-random-{}.bin",
        std::process::id()
    ));
    // xorshift noise; the first byte is never 'G'.
    let mut x: u32 = 0x9E37_79B9;
    let mut bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    bytes[0] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    let e = expect_err(LocalEngine::load(EngineConfig::new(&path)));
    let _ = std::fs::remove_file(&path);
    assert!(matches!(e, LlamaError::NotGguf(_)), "{e}");
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
}
