use kotaemon_embed::Embedder;

use crate::common::{minilm, zh};

/// 32 texts of varied length and language, so the batch really pads.
fn texts() -> Vec<String> {
    let base = [
        "How do I reset my password?",
        "明天上午10点开会",
        "Turn off the living room lights, and then lock the front door please.",
        "药店几点关门？",
        "",
        "给张经理打电话，告诉他会议推迟到下午三点，地点改在二楼的小会议室。",
        "ok",
        "What was the inflation rate in 2008?",
    ];
    (0..32)
        .map(|i| {
            format!("{} {}", base[i % base.len()], "x".repeat(i % 5))
                .trim()
                .to_string()
        })
        .collect()
}

fn batch_equals_one_by_one(e: &Embedder) {
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = e.embed(&refs).expect("batch");
    assert_eq!(batch.len(), 32);
    for (i, t) in refs.iter().enumerate() {
        let single = e.embed(&[t]).expect("single");
        let diff = batch[i]
            .iter()
            .zip(&single[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "text {i} {t:?}: max abs diff {diff}");
    }
}

#[test]
fn minilm_batch_of_32_equals_one_by_one() {
    batch_equals_one_by_one(&minilm());
}

#[test]
fn zh_batch_of_32_equals_one_by_one() {
    batch_equals_one_by_one(&zh());
}
