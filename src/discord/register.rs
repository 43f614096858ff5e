//! `chatq discord register [--guild ID]`: sends the slash commands to Discord, replacing the
//! application's (or the guild's) set: `PUT {api}/applications/{id}/commands` or
//! `…/guilds/{guild}/commands`, authorised with the bot token.

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bot::Personalities;
use crate::cli::RegisterArgs;

/// The commands chatq answers, as Discord's API takes them (type 1: a slash command; option
/// type 3: a string).
pub fn commands(personalities: &Personalities) -> Value {
    let choices: Vec<Value> = personalities
        .all()
        .map(|p| json!({"name": p.name, "value": p.name}))
        .collect();
    json!([
        {
            "name": "ask",
            "type": 1,
            "description": "Ask the bot",
            "options": [
                {"name": "prompt", "type": 3, "description": "What to ask", "required": true,
                 "max_length": crate::defaults::MAX_PROMPT_CHARS},
                {"name": "personality", "type": 3, "description": "How it answers",
                 "required": false, "choices": choices}
            ]
        },
        {"name": "reset", "type": 1, "description": "Forget this channel's conversation with the bot"},
        {"name": "quota", "type": 1, "description": "Your tokens left today"}
    ])
}

pub async fn run(args: RegisterArgs) -> anyhow::Result<()> {
    let api = args.discord_api_base.trim_end_matches('/');
    let app = &args.discord_application_id;
    let url = match &args.guild {
        Some(guild) => format!("{api}/applications/{app}/guilds/{guild}/commands"),
        None => format!("{api}/applications/{app}/commands"),
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let response = http
        .put(&url)
        .header(
            "authorization",
            format!("Bot {}", args.discord_bot_token.trim()),
        )
        .json(&commands(&Personalities::builtin()))
        .send()
        .await
        .with_context(|| format!("could not reach Discord at {api}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("Discord answered {status}: {body}");
    }
    let names: Vec<&str> = body
        .as_array()
        .map(|list| list.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    println!(
        "registered {} commands ({}) {}",
        names.len(),
        names.join(", "),
        args.guild
            .as_deref()
            .map_or_else(|| "globally".to_owned(), |g| format!("in guild {g}"))
    );
    Ok(())
}
