use kotaemon_embed::cosine;

use crate::common::{assert_unit, embed1, minilm};

#[test]
fn loads_with_dim_384_and_an_id_naming_dir_and_weights() {
    let e = minilm();
    assert_eq!(e.dim(), 384);
    // Directory name + the first 12 hex digits of the weights' sha256.
    assert_eq!(e.model_id(), "all-minilm-l6-v2-53aa51172d14");
    assert_eq!(e.threads(), 2);
    assert_eq!(e.max_tokens(), 128);
}

#[test]
fn embeddings_are_unit_length() {
    let e = minilm();
    let v = e
        .embed(&["How do I reset my password?", "x", "", "明天上午10点开会"])
        .expect("embed");
    assert_unit(&v, 384);
}

#[test]
fn paraphrase_scores_clearly_above_unrelated() {
    let e = minilm();
    let q = embed1(&e, "How do I reset my password?");
    let para = cosine(&q, &embed1(&e, "How can I change my password?"));
    let other = cosine(&q, &embed1(&e, "What is the capital of France?"));
    assert!(para > 0.6, "paraphrase {para}");
    assert!(other < 0.3, "unrelated {other}");
    assert!(para - other > 0.4, "paraphrase {para} vs unrelated {other}");
}

#[test]
fn long_input_is_truncated_not_rejected() {
    let e = minilm();
    let long = "password reset ".repeat(500);
    let v = e.embed(&[long.as_str()]).expect("embed long");
    assert_unit(&v, 384);
}

#[test]
fn empty_batch_gives_empty_output() {
    assert!(minilm().embed(&[]).expect("embed").is_empty());
}

#[test]
fn shared_across_threads_gives_identical_results() {
    let e = minilm();
    let want = embed1(&e, "Turn off the living room lights.");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let e = e.clone();
            std::thread::spawn(move || embed1(&e, "Turn off the living room lights."))
        })
        .collect();
    for h in handles {
        let got = h.join().expect("thread");
        assert!(cosine(&got, &want) > 0.99999);
    }
}
