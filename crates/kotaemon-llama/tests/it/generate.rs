//! Generation: determinism, limits, stop strings, UTF-8, context guard.

use kotaemon_llama::{EngineConfig, FinishReason, GenerateParams, LlamaError, LocalEngine};

use crate::{ask, config, engine, expect_err, greedy, serial, user};

const FRANCE: &str = "What is the capital of France? Answer in one word.";
const STORY: &str = "Write a long story about a dragon who learns to bake bread.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_is_deterministic() {
    let _serial = serial().await;
    let a = ask(engine(), user(FRANCE), greedy(16)).await;
    let b = ask(engine(), user(FRANCE), greedy(16)).await;
    let text = a.text();
    assert!(!text.trim().is_empty(), "{a:?}");
    assert!(a.stats.completion_tokens <= 16, "{a:?}");
    assert!(a.stats.prompt_tokens > 5, "{a:?}");
    assert_eq!(text, b.text());
    assert_eq!(a.stats.completion_tokens, b.stats.completion_tokens);
    eprintln!("greedy answer {text:?} {:?}", a.stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_ends_with_length() {
    let _serial = serial().await;
    let out = ask(engine(), user(STORY), greedy(5)).await;
    assert_eq!(out.stats.finish, FinishReason::Length, "{out:?}");
    assert_eq!(out.stats.completion_tokens, 5, "{out:?}");
    assert!(!out.text().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_with_seed_is_reproducible() {
    let _serial = serial().await;
    let params = GenerateParams {
        max_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
        seed: 42,
        stop: Vec::new(),
    };
    let a = ask(engine(), user(STORY), params.clone()).await;
    let b = ask(engine(), user(STORY), params).await;
    assert!(!a.text().is_empty());
    assert_eq!(a.text(), b.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_string_cuts_before_it() {
    let _serial = serial().await;
    // First learn the greedy answer, then stop on a stretch from its middle.
    let full = ask(engine(), user(STORY), greedy(24)).await.text();
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() >= 12,
        "answer too short to pick a stop string: {full:?}"
    );
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 5].iter().collect();
    let Some(cut) = full.find(&stop) else {
        panic!("stop {stop:?} not in {full:?}")
    };
    let params = GenerateParams {
        stop: vec!["never-appears-zzz".into(), stop.clone()],
        ..greedy(24)
    };
    let out = ask(engine(), user(STORY), params).await;
    assert_eq!(out.stats.finish, FinishReason::StopSequence, "{out:?}");
    assert_eq!(out.text(), full[..cut], "stop {stop:?}");
    assert!(!out.text().contains(&stop));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinese_pieces_are_valid_utf8() {
    let _serial = serial().await;
    let out = ask(engine(), user("用一句话介绍北京。"), greedy(24)).await;
    let text = out.text();
    assert!(
        text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
        "expected CJK characters: {text:?}"
    );
    assert!(!text.contains('\u{FFFD}'), "{text:?}");
    assert!(out.pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    eprintln!("zh answer {text:?} in {} pieces", out.pieces.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_longer_than_context_is_refused() {
    let _serial = serial().await;
    let small = LocalEngine::load(EngineConfig {
        n_ctx: 256,
        ..config()
    })
    .unwrap();
    assert_eq!(small.info().n_ctx, 256);
    let long = "word ".repeat(400);
    let e = expect_err(small.generate(user(&long), greedy(8)));
    match e {
        LlamaError::ContextTooLong {
            prompt_tokens,
            n_ctx,
        } => {
            assert!(prompt_tokens > 256, "{prompt_tokens}");
            assert_eq!(n_ctx, 256);
        }
        other => panic!("expected ContextTooLong, got {other}"),
    }
    // The engine still works, and a generation that would overflow the context ends as Length.
    let out = ask(&small, user(STORY), greedy(8)).await;
    assert!(out.stats.completion_tokens > 0);
    let near_full = "word ".repeat(230);
    let n = small
        .count_tokens(&small.render_chat(&user(&near_full), true).unwrap())
        .unwrap();
    assert!(n < 250, "{n}");
    let out = ask(&small, user(&near_full), greedy(500)).await;
    assert!(
        out.stats.prompt_tokens + out.stats.completion_tokens <= 257,
        "{:?}",
        out.stats
    );
    if out.stats.finish == FinishReason::Length {
        // max_tokens (500) was not the limit: the context was.
        assert!(
            out.stats.prompt_tokens + out.stats.completion_tokens >= 256,
            "{:?}",
            out.stats
        );
    }
    eprintln!("near-full context: {:?}", out.stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_params_are_refused() {
    let bad = GenerateParams {
        temperature: -1.0,
        ..greedy(4)
    };
    let e = expect_err(engine().generate(user(FRANCE), bad));
    assert!(matches!(e, LlamaError::InvalidParams(_)), "{e}");
}

/// Prints prompt and generation throughput (run by hand:
/// `cargo test --release -p kotaemon-llama --test it -- --ignored --nocapture throughput`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a behaviour test"]
async fn throughput_report() {
    let _serial = serial().await;
    // KOTAEMON_BENCH_THREADS overrides the thread count (default 2).
    let threads = std::env::var("KOTAEMON_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let e = &LocalEngine::load(EngineConfig {
        n_threads: threads,
        ..config()
    })
    .unwrap();
    eprintln!("n_threads {threads}");
    let long_prompt = format!(
        "Summarize the following text in one sentence.\n\n{}",
        "The quick brown fox jumps over the lazy dog while the cat watches from the fence. "
            .repeat(24)
    );
    let _warm = ask(e, user(FRANCE), greedy(4)).await;
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .map(str::to_owned)
        });
    eprintln!("load {:?}; {rss:?}", e.info().load_time);
    for prompt in [long_prompt.as_str(), STORY, long_prompt.as_str(), STORY] {
        let out = ask(e, user(prompt), greedy(128)).await;
        let s = &out.stats;
        eprintln!(
            "prompt {} tok in {:?} = {:.0} tok/s; generation {} tok in {:?} = {:.1} tok/s ({:?})",
            s.prompt_tokens,
            s.prompt_time,
            f64::from(s.prompt_tokens) / s.prompt_time.as_secs_f64(),
            s.completion_tokens,
            s.generation_time,
            f64::from(s.completion_tokens) / s.generation_time.as_secs_f64(),
            s.finish
        );
    }
}
