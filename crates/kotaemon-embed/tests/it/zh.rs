use kotaemon_embed::cosine;

use crate::common::{assert_unit, embed1, zh};

#[test]
fn loads_with_dim_384() {
    let e = zh();
    assert_eq!(e.dim(), 384);
    assert!(
        e.model_id().starts_with("multilingual-e5-small-q4-"),
        "{}",
        e.model_id()
    );
    assert_ne!(e.model_id(), crate::common::minilm().model_id());
}

#[test]
fn embeddings_are_unit_length() {
    let e = zh();
    let v = e
        .embed(&["明天上午10点开会", "How do I reset my password?", ""])
        .expect("embed");
    assert_unit(&v, 384);
}

// multilingual-e5 packs cosines into a narrow band (unrelated sentences score
// ~0.75-0.9, paraphrases ~0.92-0.99), so margins are smaller than MiniLM's.
#[test]
fn chinese_paraphrase_scores_above_unrelated() {
    let e = zh();
    let q = embed1(&e, "明天上午10点开会");
    let para = cosine(&q, &embed1(&e, "明早十点有会议"));
    let other = cosine(&q, &embed1(&e, "今天下午去超市"));
    assert!(para > 0.92, "paraphrase {para}");
    assert!(
        para - other > 0.03,
        "paraphrase {para} vs unrelated {other}"
    );
}

#[test]
fn english_paraphrase_scores_above_unrelated() {
    let e = zh();
    let q = embed1(&e, "How do I reset my password?");
    let para = cosine(&q, &embed1(&e, "How can I change my password?"));
    let other = cosine(&q, &embed1(&e, "What is the capital of France?"));
    assert!(para - other > 0.1, "paraphrase {para} vs unrelated {other}");
}

#[test]
fn chinese_question_matches_its_english_translation() {
    let e = zh();
    let q = embed1(&e, "药店几点关门？");
    let en = cosine(&q, &embed1(&e, "What time does the pharmacy close?"));
    let other = cosine(&q, &embed1(&e, "What is the capital of France?"));
    assert!(en - other > 0.05, "translation {en} vs unrelated {other}");
}
