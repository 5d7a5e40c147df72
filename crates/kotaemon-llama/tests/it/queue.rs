//! The job queue: FIFO, bounded, cancellation by dropping the receiver.

use std::sync::{Arc, Mutex};

use kotaemon_llama::{EngineConfig, GenEvent, LlamaError, LocalEngine};

use crate::{collect, config, engine, greedy, serial, user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_complete_in_fifo_order() {
    let _serial = serial().await;
    let e = engine();
    let prompts = [
        "Name a fruit.",
        "Name a color.",
        "Name an animal.",
        "Name a country.",
    ];
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| e.generate(user(p), greedy(6)).unwrap())
        .collect();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        let finished = finished.clone();
        tasks.push(tokio::spawn(async move {
            let out = collect(rx).await;
            finished.lock().unwrap().push(i);
            out
        }));
    }
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap());
    }
    assert_eq!(*finished.lock().unwrap(), vec![0, 1, 2, 3]);
    // Each job waited at least as long as the one before it.
    for w in outputs.windows(2) {
        assert!(w[1].stats.queue_wait >= w[0].stats.queue_wait, "{w:?}");
    }
    assert!(outputs.iter().all(|o| o.stats.completion_tokens > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_beyond_max_queue_is_refused() {
    let _serial = serial().await;
    let e = LocalEngine::load(EngineConfig {
        n_ctx: 512,
        max_queue: 1,
        ..config()
    })
    .unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        match e.generate(user("Name a fruit."), greedy(4)) {
            Ok(rx) => accepted.push(rx),
            Err(LlamaError::QueueFull) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(e.queue_len() <= 1);
    }
    // One job may already be running, one may wait: the rest are refused.
    assert!(
        (1..=2).contains(&accepted.len()),
        "{} accepted",
        accepted.len()
    );
    assert_eq!(refused, 4 - accepted.len());
    let msg = LlamaError::QueueFull.to_string();
    assert!(msg.contains("queue is full"), "{msg}");
    for rx in accepted {
        collect(rx).await;
    }
    // With the queue drained, new jobs are accepted again.
    collect(e.generate(user("Name a fruit."), greedy(2)).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_receiver_cancels_the_job() {
    let _serial = serial().await;
    let e = engine();
    let mut long = e
        .generate(
            user("Write a very long story about a dragon who learns to bake bread."),
            greedy(400),
        )
        .unwrap();
    // Wait for the first piece, then walk away.
    match long.recv().await {
        Some(Ok(GenEvent::Piece(_))) => {}
        other => panic!("expected a first piece, got {other:?}"),
    }
    drop(long);
    let next = collect(e.generate(user("Name a color."), greedy(4)).unwrap()).await;
    assert!(next.stats.completion_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_engine_fails_queued_jobs() {
    let _serial = serial().await;
    let e = LocalEngine::load(EngineConfig {
        n_ctx: 512,
        max_queue: 4,
        ..config()
    })
    .unwrap();
    let receivers: Vec<_> = (0..3)
        .map(|_| e.generate(user("Name a fruit."), greedy(8)).unwrap())
        .collect();
    drop(e);
    // Every job ends: finished before the stop, or told the engine stopped. None hangs.
    for mut rx in receivers {
        let mut ended = false;
        while let Some(ev) = rx.recv().await {
            match ev {
                Ok(GenEvent::Piece(_)) => {}
                Ok(GenEvent::Done(_)) | Err(LlamaError::EngineStopped) => ended = true,
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert!(ended);
    }
}
