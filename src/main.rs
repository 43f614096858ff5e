//! The `chatq` binary: parse the command line, start logging, run a subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use chatq::cli::{Cli, Command};
use chatq::config::Config;
use chatq::{app, client, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        chatq::cli::LogFormat::Text => telemetry::LogFormat::Text,
        chatq::cli::LogFormat::Json => telemetry::LogFormat::Json,
    };
    if let Err(e) = telemetry::init(format, &cli.log_level) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(args) => match Config::from_args(*args) {
            Ok(config) => serve(config).await,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        Command::Migrate(args) => migrate(args).await,
        Command::Discord(chatq::cli::DiscordCommand::Register(args)) => {
            chatq::discord::register::run(args).await
        }
        Command::Submit(args) => client::submit(args).await,
        Command::Job(args) => client::job(args).await,
        Command::Stats(args) => client::stats(args).await,
        Command::Validate(args) => client::validate(args).await,
        Command::Interactions(args) => client::interactions(args).await,
        Command::Backup(args) => client::backup(args).await,
        Command::Restore(args) => client::restore(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(args: chatq::cli::MigrateArgs) -> anyhow::Result<()> {
    let url = chatq::config::database_url(args.database_url)?;
    let (before, now) = chatq::store::postgres::migrate(&url, args.database_ca_file).await?;
    if before == now {
        println!("the database schema is at version {now}; nothing to do");
    } else {
        println!("the database schema went from version {before} to version {now}");
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {} (--listen)", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app::run(listener, config, shutdown).await
}

/// Fires `token` on SIGINT or SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received; shutting down"),
        _ = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
    token.cancel();
}
