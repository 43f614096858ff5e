//! Building the message list sent upstream: chatq's system prompt (guild-aware, plus the
//! personality and the guild's own instructions), the last 10 messages of history, then the
//! user's prompt.

use serde::Serialize;

use crate::bot::personality::Personality;
use crate::domain::{ChatRequest, Message, Role};

/// At most this many messages of a client's own history go upstream; older ones are
/// dropped (a server-side conversation is bounded by its guild's `history_turns` instead).
pub const MAX_HISTORY: usize = 10;

/// A message as the OpenAI protocol writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WireMessage {
    pub role: &'static str,
    pub content: String,
}

/// The system prompt for a job in `guild_id` (or outside any guild).
pub fn system_prompt(guild_id: Option<&str>, personality: &Personality) -> String {
    let base = match guild_id {
        Some(guild) => format!(
            "You are the community assistant for the guild {guild}. Keep replies short and \
             friendly, suited to a busy chat channel, and never ask for or reveal sensitive \
             personal data such as passwords, addresses, phone numbers or payment details."
        ),
        None => "You are a concise, helpful assistant. Keep replies short and clear.".to_owned(),
    };
    format!("{base}\n\n{}", personality.instructions)
}

/// The full message list for one request: chatq's system prompt first, then the client's
/// own system messages (OpenAI-compatible clients send them; they are instructions, not
/// history, so the cut does not drop them), then a server-side conversation's turns (bounded
/// when they were loaded, by the guild's `history_turns`), then the last 10 other messages of
/// the client's history, then the prompt.
pub fn build_messages(
    guild_id: Option<&str>,
    personality: &Personality,
    request: &ChatRequest,
) -> Vec<WireMessage> {
    let wire = |m: &Message| WireMessage {
        role: m.role.as_str(),
        content: m.content.clone(),
    };
    let (system, history): (Vec<&Message>, Vec<&Message>) =
        request.history.iter().partition(|m| m.role == Role::System);
    let history = &history[history.len().saturating_sub(MAX_HISTORY)..];
    let mut messages =
        Vec::with_capacity(system.len() + request.conversation.len() + history.len() + 2);
    let mut system_text = system_prompt(guild_id, personality);
    if let Some(instructions) = request
        .instructions
        .as_deref()
        .filter(|i| !i.trim().is_empty())
    {
        // The guild's own instructions come last: the admin's word on top of ours.
        system_text.push_str("\n\n");
        system_text.push_str(instructions.trim());
    }
    messages.push(WireMessage {
        role: Role::System.as_str(),
        content: system_text,
    });
    messages.extend(system.into_iter().map(wire));
    messages.extend(request.conversation.iter().map(wire));
    messages.extend(history.iter().copied().map(wire));
    messages.push(WireMessage {
        role: Role::User.as_str(),
        content: request.prompt.trim().to_owned(),
    });
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::personality::Personalities;

    fn request(history: usize) -> ChatRequest {
        ChatRequest {
            prompt: "now".into(),
            history: (0..history)
                .map(|i| Message {
                    role: if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    content: format!("h{i}"),
                })
                .collect(),
            personality: None,
            temperature: None,
            max_tokens: None,
            model: None,
            instructions: None,
            conversation: Vec::new(),
        }
    }

    #[test]
    fn guild_prompt_names_the_guild_and_asks_for_care() {
        let p = Personalities::builtin();
        let s = system_prompt(Some("g-42"), p.resolve(None));
        assert!(s.contains("g-42"));
        assert!(s.contains("short") && s.contains("sensitive"));
        assert!(s.ends_with(&p.resolve(None).instructions));
        let generic = system_prompt(None, p.resolve(Some("technical")));
        assert!(generic.starts_with("You are a concise, helpful assistant."));
        assert!(generic.ends_with(&p.resolve(Some("technical")).instructions));
    }

    #[test]
    fn history_is_cut_to_the_last_ten() {
        let p = Personalities::builtin();
        let msgs = build_messages(None, p.resolve(None), &request(14));
        assert_eq!(msgs.len(), 1 + MAX_HISTORY + 1);
        assert_eq!(msgs[0].role, "system");
        assert_eq!(msgs[1].content, "h4");
        assert_eq!(msgs[10].content, "h13");
        assert_eq!(msgs[11].role, "user");
        assert_eq!(msgs[11].content, "now");
        assert_eq!(build_messages(None, p.resolve(None), &request(3)).len(), 5);
    }

    #[test]
    fn client_system_messages_follow_ours_and_survive_the_cut() {
        let p = Personalities::builtin();
        let mut r = request(12);
        r.history.insert(
            0,
            Message {
                role: Role::System,
                content: "answer in French".into(),
            },
        );
        let msgs = build_messages(Some("g"), p.resolve(None), &r);
        assert_eq!(msgs.len(), 1 + 1 + MAX_HISTORY + 1);
        assert!(msgs[0].content.contains("guild g"));
        assert_eq!(
            (msgs[1].role, msgs[1].content.as_str()),
            ("system", "answer in French")
        );
        assert_eq!(msgs[2].content, "h2");
    }
}
