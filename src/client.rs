//! Client subcommands: talk to a running chatq over HTTP and print JSON.
//!
//! `submit`, `job`, `stats` and `validate` print one JSON document; `interactions` prints
//! JSON lines (one entry per line), following the cursor to the end, for export.
//! A non-2xx answer prints the server's error message and exits non-zero.

use std::io::Write;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cli::{
    BackupArgs, ClientArgs, InteractionsArgs, JobArgs, RestoreArgs, SubmitArgs, ValidateArgs,
};
use crate::store::embedded::backup;

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(args: &ClientArgs, admin: bool) -> anyhow::Result<Self> {
        let token = if admin {
            args.admin_token.clone().or_else(|| args.token.clone())
        } else {
            args.token.clone().or_else(|| args.admin_token.clone())
        };
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()?,
            base: args.server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let request = match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("could not reach chatq at {}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no error message");
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

fn print(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client, false)?;
    let mut body = json!({ "user_id": args.user, "prompt": args.prompt });
    let fields = [
        ("guild_id", args.guild.map(Value::from)),
        ("personality", args.personality.map(Value::from)),
        ("priority", args.priority.map(Value::from)),
        ("delay_ms", args.delay_ms.map(Value::from)),
        ("idempotency_key", args.idempotency_key.map(Value::from)),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            body[name] = v;
        }
    }
    let accepted = client.post("/v1/chat/jobs", &body).await?;
    let id = accepted["id"].as_str().unwrap_or_default().to_owned();
    match args.wait {
        Some(wait) => print(
            &client
                .get(&format!("/v1/chat/jobs/{id}?wait={wait}"))
                .await?,
        ),
        None => print(&accepted),
    }
}

pub async fn job(args: JobArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client, false)?;
    let wait = args.wait.unwrap_or(0);
    print(
        &client
            .get(&format!("/v1/chat/jobs/{}?wait={wait}", args.id))
            .await?,
    )
}

pub async fn stats(args: ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(&args, true)?;
    print(&client.get("/v1/queue/stats").await?)
}

pub async fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client, false)?;
    let body = json!({ "role": args.role, "content": args.text });
    print(&client.post("/v1/messages/validate", &body).await?)
}

pub async fn interactions(args: InteractionsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client, true)?;
    let mut params = vec![("limit".to_owned(), "500".to_owned())];
    for (name, value) in [
        ("user_id", &args.user),
        ("guild_id", &args.guild),
        ("since", &args.since),
        ("until", &args.until),
    ] {
        if let Some(v) = value {
            params.push((name.to_owned(), v.clone()));
        }
    }
    let mut cursor: Option<String> = None;
    let mut written = 0usize;
    let stdout = std::io::stdout();
    loop {
        let mut query = params.clone();
        if let Some(c) = &cursor {
            query.push(("cursor".to_owned(), c.clone()));
        }
        let url =
            reqwest::Url::parse_with_params(&format!("{}/v1/interactions", client.base), &query)?;
        let page = client.send(client.http.get(url)).await?;
        let mut out = stdout.lock();
        for entry in page["data"].as_array().into_iter().flatten() {
            if args.max.is_some_and(|max| written >= max) {
                return Ok(());
            }
            writeln!(out, "{}", serde_json::to_string(entry)?)?;
            written += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(()),
        }
    }
}

/// `chatq backup --to FILE`: streams the server's snapshot into `FILE.partial`, checks it
/// whole (format and checksum), syncs it and only then renames it to `FILE`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let client = Client::new(&args.client, true)?;
    // No overall timeout: a large log takes as long as it takes.
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()?;
    let mut request = http.get(format!("{}/v1/backup", client.base));
    if let Some(token) = &client.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("could not reach chatq at {}", client.base))?;
    let status = response.status();
    if !status.is_success() {
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no error message");
        bail!("{status}: {message}");
    }
    let partial = args.to.with_extension("partial");
    let mut file = std::fs::File::create(&partial)
        .with_context(|| format!("could not create {}", partial.display()))?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the backup was cut short")?;
        file.write_all(&chunk)
            .with_context(|| format!("could not write {}", partial.display()))?;
    }
    file.sync_all()?;
    drop(file);
    let summary = match backup::verify(&partial) {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            bail!("the backup is not usable: {e}");
        }
    };
    std::fs::rename(&partial, &args.to)
        .with_context(|| format!("could not move the backup to {}", args.to.display()))?;
    print(
        &json!({"file": args.to, "trees": summary.trees, "entries": summary.entries, "bytes": summary.bytes}),
    )
}

/// `chatq restore --from FILE --data-dir DIR`.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let summary = backup::restore(&args.from, &args.data_dir)
        .map_err(|e| anyhow::anyhow!("{}", crate::store::error_chain(&e)))?;
    print(&json!({
        "data_dir": args.data_dir,
        "trees": summary.trees,
        "entries": summary.entries,
        "bytes": summary.bytes,
        "next": format!("chatq serve --data-dir {}", args.data_dir.display()),
    }))
}
