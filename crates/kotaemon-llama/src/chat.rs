//! Rendering a chat into a prompt string.
//!
//! The template is chosen once at load ([`ChatTemplateSource`]):
//! 1. the GGUF's `tokenizer.chat_template`, applied by llama.cpp's template engine
//!    (`llama_chat_apply_template`, which recognises the common families: Gemma, ChatML,
//!    Llama 3, …);
//! 2. else, when the vocabulary has a family's turn markers as special tokens
//!    (`<start_of_turn>`/`<end_of_turn>`, `<|im_start|>`/`<|im_end|>`,
//!    `<|start_header_id|>`/`<|eot_id|>`), llama.cpp's built-in template of that family;
//! 3. else the plain fallback format:
//!
//! ```text
//! System: {content}
//!
//! User: {content}
//!
//! Assistant: {content}
//!
//! Assistant:
//! ```
//!
//! i.e. each turn as `{Role}: {content}` followed by a blank line, and, when a generation prompt
//! is asked for, a final `Assistant:` with nothing after it.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};

use crate::{ChatTemplateSource, ChatTurn, LlamaError};

/// Chats larger than this are refused before they reach llama.cpp (whose buffers are `i32`-sized).
pub(crate) const MAX_CHAT_BYTES: usize = 64 * 1024 * 1024;

/// The roles accepted in a [`ChatTurn`].
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

pub(crate) fn validate(turns: &[ChatTurn]) -> Result<(), LlamaError> {
    let mut total = 0usize;
    for (i, t) in turns.iter().enumerate() {
        if !ROLES.contains(&t.role.as_str()) {
            return Err(LlamaError::Template(format!(
                "turn {i} has role {:?}; expected one of system, user, assistant",
                t.role
            )));
        }
        if t.content.contains('\0') {
            return Err(LlamaError::Template(format!(
                "turn {i} contains a NUL byte"
            )));
        }
        total = total.saturating_add(t.content.len());
    }
    if total > MAX_CHAT_BYTES {
        return Err(LlamaError::Template(format!(
            "chat is {total} bytes; the limit is {MAX_CHAT_BYTES}"
        )));
    }
    Ok(())
}

/// Renders with the model's template, or with the fallback format when `template` is `None`.
pub(crate) fn render(
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
    turns: &[ChatTurn],
    add_generation_prompt: bool,
) -> Result<String, LlamaError> {
    validate(turns)?;
    let Some(template) = template else {
        return Ok(render_fallback(turns, add_generation_prompt));
    };
    let messages = turns
        .iter()
        .map(|t| LlamaChatMessage::new(t.role.clone(), t.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LlamaError::Template(e.to_string()))?;
    model
        .apply_chat_template(template, &messages, add_generation_prompt)
        .map_err(|e| {
            LlamaError::Template(format!(
                "llama.cpp could not apply the model's chat template: {e}"
            ))
        })
}

/// The documented fallback format (see the module docs).
pub(crate) fn render_fallback(turns: &[ChatTurn], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for t in turns {
        let role = match t.role.as_str() {
            "system" => "System",
            "assistant" => "Assistant",
            _ => "User",
        };
        out.push_str(role);
        out.push_str(": ");
        out.push_str(t.content.trim());
        out.push_str("\n\n");
    }
    if add_generation_prompt {
        out.push_str("Assistant:");
    }
    out
}

/// Built-in llama.cpp templates recognised from a vocabulary's special tokens, for GGUF files
/// that ship without `tokenizer.chat_template` (e.g. some Gemma 3 conversions).
const INFERABLE: [(&str, [&str; 2]); 3] = [
    ("gemma", ["<start_of_turn>", "<end_of_turn>"]),
    ("chatml", ["<|im_start|>", "<|im_end|>"]),
    ("llama3", ["<|start_header_id|>", "<|eot_id|>"]),
];

/// Picks how `render` formats chats for this model, logging the choice.
pub(crate) fn choose_template(
    model: &LlamaModel,
) -> (Option<LlamaChatTemplate>, ChatTemplateSource) {
    let probe = [ChatTurn::new("system", "s"), ChatTurn::new("user", "u")];
    let works = |t: &LlamaChatTemplate| render(model, Some(t), &probe, true).is_ok();
    match model.chat_template(None) {
        Ok(t) if works(&t) => return (Some(t), ChatTemplateSource::Gguf),
        Ok(_) => tracing::warn!(
            "the model's chat template is not one llama.cpp's template engine supports"
        ),
        Err(e) => tracing::debug!(error = %e, "the model has no chat template in its metadata"),
    }
    let vocab = model.vocab();
    let is_special = |marker: &str| vocab.tokenize(marker.as_bytes(), false, true).len() == 1;
    for (name, markers) in INFERABLE {
        if !markers.iter().all(|m| is_special(m)) {
            continue;
        }
        if let Ok(t) = LlamaChatTemplate::new(name) {
            if works(&t) {
                tracing::info!(template = name, "no usable chat template in the model; using llama.cpp's built-in one matching its special tokens");
                return (Some(t), ChatTemplateSource::Builtin(name));
            }
        }
    }
    tracing::warn!("no chat template for this model; using the plain fallback format");
    (None, ChatTemplateSource::Fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_format() {
        let turns = [
            ChatTurn::new("system", "Be brief."),
            ChatTurn::new("user", " Hi "),
            ChatTurn::new("assistant", "Hello."),
            ChatTurn::new("user", "Bye"),
        ];
        assert_eq!(
            render_fallback(&turns, true),
            "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
        );
        assert!(!render_fallback(&turns, false).ends_with("Assistant:"));
    }

    #[test]
    fn validation_rejects_bad_roles_and_nul() {
        assert!(validate(&[ChatTurn::new("user", "ok")]).is_ok());
        let e = validate(&[ChatTurn::new("tool", "x")]).unwrap_err();
        assert!(e.to_string().contains("\"tool\""), "{e}");
        let e = validate(&[ChatTurn::new("user", "a\0b")]).unwrap_err();
        assert!(matches!(e, LlamaError::Template(_)));
    }
}
