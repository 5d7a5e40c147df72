//! A tool-call format for local models, which have none of their own: the offered tools are
//! described in a system message, and an answer that is a JSON object naming a tool is a call.
//! Small models get the JSON wrong often; a broken call is still returned as a call, with its
//! raw arguments, so the tool loop tells the model what was wrong instead of showing the user
//! half a JSON object.

use crate::wire::{ChatMessage, ChatRequest, Role, ToolCall};
use serde_json::Value;

/// The system message that offers the tools, if any are offered.
pub fn instructions(request: &ChatRequest) -> Option<String> {
    let functions = request.offered_functions();
    if functions.is_empty() {
        return None;
    }
    let list: Vec<String> = functions
        .iter()
        .map(|(name, description, parameters)| {
            format!("- {name}: {description} Arguments (JSON Schema): {parameters}")
        })
        .collect();
    Some(format!(
        "You can use these tools:\n{}\nTo use one, reply with only a JSON object like {{\"tool\": \"<name>\", \"arguments\": {{...}}}} and nothing else. After the tool's result arrives, answer the user in their language.",
        list.join("\n")
    ))
}

/// A message of the conversation as the local model sees it: tool calls as the JSON it was
/// asked to write, tool results as text.
pub fn message_text(message: &ChatMessage, text: String) -> String {
    match message.role {
        Role::Assistant => {
            let calls = message.tool_calls();
            if calls.is_empty() {
                return text;
            }
            calls
                .iter()
                .map(|c| {
                    let args: Value = serde_json::from_str(&c.arguments)
                        .unwrap_or(Value::String(c.arguments.clone()));
                    serde_json::json!({"tool": c.name, "arguments": args}).to_string()
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Role::Tool => format!("Tool result: {text}"),
        _ => text,
    }
}

/// The call an answer makes, if it is one. `index` numbers the call ids of a turn.
pub fn parse_call(answer: &str, request: &ChatRequest, index: usize) -> Option<ToolCall> {
    let known: Vec<String> = request
        .offered_functions()
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    if known.is_empty() {
        return None;
    }
    let start = answer.find('{')?;
    // Only an answer that *is* a call counts (code fences and a few words around it are
    // tolerated), not an answer that merely contains braces.
    let before = answer[..start]
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```");
    if before.trim().chars().count() > 20 {
        return None;
    }
    let id = format!("call_local_{index}");
    let json = &answer[start..];
    let parsed = serde_json::Deserializer::from_str(json)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok);
    if let Some(v) = parsed {
        let name = v
            .get("tool")
            .or_else(|| v.get("name"))
            .and_then(Value::as_str)?;
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            Some(Value::String(raw)) => raw.clone(),
            Some(a) => a.to_string(),
            None => "{}".to_string(),
        };
        return Some(ToolCall {
            id,
            name: name.to_string(),
            arguments,
        });
    }
    // Broken JSON that still names a known tool: a malformed call, for the loop to report.
    let name = known.iter().find(|n| json.contains(&format!("\"{n}\"")))?;
    let arguments = json
        .find("\"arguments\"")
        .map(|i| {
            json[i + "\"arguments\"".len()..]
                .trim_start_matches([' ', ':'])
                .to_string()
        })
        .unwrap_or_else(|| json.to_string());
    Some(ToolCall {
        id,
        name: name.clone(),
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request() -> ChatRequest {
        serde_json::from_value(
            json!({"model": "local", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "contacts_lookup",
                "description": "Find a person", "parameters": {"type": "object"}}}]}),
        )
        .unwrap()
    }

    #[test]
    fn a_json_answer_naming_a_tool_is_a_call() {
        let r = request();
        let c = parse_call(
            "{\"tool\": \"contacts_lookup\", \"arguments\": {\"name\": \"张经理\"}}",
            &r,
            0,
        )
        .unwrap();
        assert_eq!(c.name, "contacts_lookup");
        assert_eq!(
            serde_json::from_str::<Value>(&c.arguments).unwrap()["name"],
            "张经理"
        );
        let fenced = parse_call(
            "```json\n{\"name\": \"contacts_lookup\", \"arguments\": {}}\n```",
            &r,
            1,
        )
        .unwrap();
        assert_eq!(fenced.id, "call_local_1");
        assert!(instructions(&r).unwrap().contains("contacts_lookup"));
    }

    #[test]
    fn broken_calls_are_still_calls_and_prose_is_not() {
        let r = request();
        let broken = parse_call(
            "{\"tool\": \"contacts_lookup\", \"arguments\": {\"name\": \"张",
            &r,
            0,
        )
        .unwrap();
        assert_eq!(broken.name, "contacts_lookup");
        assert!(serde_json::from_str::<Value>(&broken.arguments).is_err());
        assert!(parse_call("The answer is 42. Use {braces} in templates.", &r, 0).is_none());
        assert!(parse_call("{\"tool\": \"unknown\"", &r, 0).is_none());
        let no_tools: ChatRequest =
            serde_json::from_value(json!({"model": "m", "messages": []})).unwrap();
        assert!(parse_call("{\"tool\": \"contacts_lookup\"}", &no_tools, 0).is_none());
    }
}
