//! `hydra-queue-runner`: the queue runner daemon and its operator commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hydra-queue-runner",
    version,
    about = "Hydra-style queue runner for Nix build farms"
)]
struct Cli {
    /// PostgreSQL URL of the Hydra database.
    #[arg(
        long,
        env = "HYDRA_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update the database schema (Hydra's tables and the runner's
    /// own). Safe to run repeatedly; refuses a schema newer than this runner.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hydra-queue-runner: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => {
            let url = cli.database_url.ok_or_else(|| {
                anyhow::anyhow!("no database: pass --database-url or set HYDRA_DATABASE_URL")
            })?;
            let pool = hydra_db::connect(&url, 2).await?;
            let report = hydra_db::migrate(&pool).await?;
            if report.applied.is_empty() {
                println!("schema is current (migration {})", report.current);
            } else {
                println!(
                    "applied migrations {:?}; schema now at migration {}",
                    report.applied, report.current
                );
            }
            Ok(())
        }
    }
}
