//! `hydra-queue-runner`: the queue runner daemon and its operator commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hydra_queue_runner::{Runner, RunnerConfig};

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
    /// Run the queue runner: load queued builds, dispatch steps to builders,
    /// record results.
    Serve(ServeArgs),
    /// Print the build log of a derivation (running or finished).
    Log {
        /// The `.drv` path (or its base name).
        drv: String,
        /// The runner's data directory.
        #[arg(long, default_value = "/var/lib/hydra/queue-runner")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (every key is optional; see docs/configuration.md).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address builders connect to (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Socket of the runner's nix-daemon (overrides `store_socket`).
    #[arg(long)]
    store_socket: Option<PathBuf>,
    /// Data directory for logs (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: not in the journal, files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

fn database_url(cli: &Option<String>, config: Option<&RunnerConfig>) -> anyhow::Result<String> {
    cli.clone()
        .or_else(|| config.and_then(|c| c.database_url.clone()))
        .ok_or_else(|| {
            anyhow::anyhow!("no database: pass --database-url or set HYDRA_DATABASE_URL")
        })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => {
            let url = database_url(&cli.database_url, None)?;
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
        Command::Serve(args) => {
            let mut config = match &args.config {
                Some(path) => RunnerConfig::load(path)?,
                None => RunnerConfig::default(),
            };
            if let Some(l) = args.listen {
                config.listen = l;
            }
            if let Some(s) = args.store_socket {
                config.store_socket = s;
            }
            if let Some(d) = args.data_dir {
                config.data_dir = d;
            }
            let url = database_url(&cli.database_url, Some(&config))?;
            let pool = hydra_db::connect(&url, config.database_connections).await?;
            let report = hydra_db::migrate(&pool)
                .await
                .context("checking the schema")?;
            if !report.applied.is_empty() {
                tracing::info!("applied migrations {:?}", report.applied);
            }
            let mut runner = Runner::start(config, pool).await?;
            tracing::info!("serving builders on {}", runner.addr);
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let fault = tokio::select! {
                res = runner.wait() => Some(res),
                _ = tokio::signal::ctrl_c() => None,
                _ = terminate.recv() => None,
            };
            match fault {
                Some(res) => res.context("the queue runner stopped")?,
                None => {
                    tracing::info!("asked to stop; closing running steps as aborted");
                    runner.shutdown().await.context("stopping")?;
                }
            }
            Ok(())
        }
        Command::Log { drv, data_dir } => {
            let base = drv.rsplit('/').next().unwrap_or(&drv);
            let path = hydra_nix::StorePath::from_base_name(base)?;
            let logs = hydra_queue_runner::logs::LogStore::new(&data_dir);
            match logs.read(&path)? {
                Some(bytes) => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?;
                    Ok(())
                }
                None => anyhow::bail!("no log for {drv} under {}", data_dir.display()),
            }
        }
    }
}
