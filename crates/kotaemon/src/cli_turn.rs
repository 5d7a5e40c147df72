//! `ask` and `chat`: turns run in-process, answers streamed to the terminal.

use futures::StreamExt;
use kotaemon_core::api::error::ApiError;
use kotaemon_core::stages::act::Decision;
use kotaemon_core::turn::{Origin, Reply};
use kotaemon_core::wire::{ChatMessage, ChatRequest, MessageContent, Role};
use kotaemon_core::{App, Config};
use std::io::{BufRead, Write};

/// The first model a config names, else "default" (pass-through upstreams accept any name).
pub fn default_model(config: &Config) -> String {
    config
        .upstreams
        .iter()
        .find_map(|u| u.models.keys().next().cloned())
        .unwrap_or_else(|| "default".to_string())
}

/// Sends `prompt` after `history`, prints the answer, and appends both to `history`.
/// Returns the id of an action that waits for the user's confirmation, if any.
pub async fn ask(
    app: &App,
    model: &str,
    history: &mut Vec<ChatMessage>,
    prompt: &str,
    stream: bool,
) -> anyhow::Result<Option<String>> {
    history.push(ChatMessage::text(Role::User, prompt));
    let request = ChatRequest {
        model: model.to_string(),
        messages: history.clone(),
        stream: Some(stream),
        stream_options: None,
        tools: None,
        extra: Default::default(),
    };
    let (reply, ctx) = app.run_turn(Origin::Cli, request).await.map_err(|e| {
        history.pop();
        let api = ApiError::from(e);
        anyhow::anyhow!("{} ({})", api.message, api.code)
    })?;
    let mut answer = String::new();
    let mut out = std::io::stdout().lock();
    match reply {
        Reply::Complete(c) => {
            answer = c.content().unwrap_or_default().to_string();
            writeln!(out, "{answer}")?;
        }
        Reply::Stream(mut chunks) => {
            while let Some(item) = chunks.next().await {
                match item {
                    Ok(chunk) => {
                        if let Some(delta) = chunk.content_delta() {
                            answer.push_str(delta);
                            write!(out, "{delta}")?;
                            out.flush()?;
                        }
                    }
                    Err(e) => {
                        writeln!(out)?;
                        anyhow::bail!("the answer broke off: {} ({})", e, e.code());
                    }
                }
            }
            writeln!(out)?;
        }
    }
    history.push(ChatMessage {
        role: Role::Assistant,
        content: Some(MessageContent::Text(answer)),
        extra: Default::default(),
    });
    Ok(ctx.meta().pending_action)
}

/// Asks the user about a pending action and runs their decision.
async fn confirm(app: &App, id: &str) -> anyhow::Result<()> {
    eprint!("confirm this action? [y/N] ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let decision = if matches!(line.trim(), "y" | "Y" | "yes" | "是" | "确认") {
        Decision::Confirm
    } else {
        Decision::Reject
    };
    match app.decide_action(id, decision).await {
        Ok(Reply::Complete(c)) => println!("{}", c.content().unwrap_or_default()),
        Ok(Reply::Stream(_)) => {}
        Err(e) => anyhow::bail!("{e}"),
    }
    Ok(())
}

pub async fn repl(app: &App, model: &str) -> anyhow::Result<()> {
    let mut history = Vec::new();
    eprintln!("kotaemon chat with `{model}` — /reset forgets, /exit leaves");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.clear();
                eprintln!("(forgotten)");
            }
            prompt => match ask(app, model, &mut history, prompt, true).await {
                Ok(Some(id)) => {
                    if let Err(e) = confirm(app, &id).await {
                        eprintln!("error: {e:#}");
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("error: {e:#}"),
            },
        }
    }
}
