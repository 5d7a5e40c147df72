//! How to write a plugin: a `Component` that receives every turn event and may ask the agent.
//!
//! This one warns about slow turns and, when the agent had to fall back to the local model,
//! asks the agent itself for a one-line status (a whole turn: rules, cache, router, model).
//!
//!   cargo run --release -p kotaemon-core --example slow_turn_alarm
//!
//! then talk to http://127.0.0.1:8080/v1/chat/completions as usual.

use async_trait::async_trait;
use kotaemon_core::events::TurnEvent;
use kotaemon_core::plugins::{AgentHandle, Component};
use kotaemon_core::{App, Config};
use std::sync::Arc;
use std::time::Duration;

struct SlowTurnAlarm {
    threshold: Duration,
}

#[async_trait]
impl Component for SlowTurnAlarm {
    type Input = Arc<TurnEvent>;
    type Output = ();

    fn name(&self) -> &'static str {
        "slow-turn-alarm"
    }

    async fn run(&self, event: Arc<TurnEvent>, agent: &AgentHandle) {
        match &*event {
            TurnEvent::TurnFinished { turn, elapsed, .. } if *elapsed > self.threshold => {
                eprintln!("slow turn {turn}: {} ms", elapsed.as_millis());
            }
            TurnEvent::Degraded { reason, .. } => {
                // Events carry codes, never user text; asking the agent is a turn of its own.
                match agent
                    .ask("local", "Say in five words that the cloud is unreachable.")
                    .await
                {
                    Ok(answer) => eprintln!("degraded ({reason}): {answer}"),
                    Err(e) => eprintln!(
                        "degraded ({reason}); the agent could not answer: {}",
                        e.message
                    ),
                }
            }
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(None)?;
    let listen = config.server.listen;
    let app = App::build(config)?;
    app.spawn_event_component(Arc::new(SlowTurnAlarm {
        threshold: Duration::from_secs(2),
    }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    app.serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
