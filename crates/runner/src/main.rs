//! `hydra-queue-runner`: the queue runner daemon and its operator commands.

/// mimalloc rather than glibc's malloc: loading a queue allocates and
/// frees millions of small values (store paths, steps), and glibc's
/// free and consolidation were 5% of all CPU in the ingestion benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hydra_queue_runner::{Runner, RunnerConfig, systemd};

/// The operator commands, over the client API (not part of the server).
mod cli;

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

    #[command(flatten)]
    connection: cli::Connection,

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
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the build log of a derivation from the data directory, without
    /// a running runner (`logs` asks the runner).
    LocalLog {
        /// The `.drv` path (or its base name).
        drv: String,
        /// Hydra's data directory (its build-logs hold the logs).
        #[arg(
            long,
            visible_alias = "data-dir",
            env = "HYDRA_DATA",
            default_value = "/var/lib/hydra"
        )]
        hydra_data: PathBuf,
    },
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) of hydra-queue-runner.
    Man,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a configuration file without starting anything: prints `ok`
    /// and the effective settings, or what is wrong (key and file), and
    /// exits non-zero.
    Check {
        #[arg(long, short)]
        config: PathBuf,
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
    /// Hydra's data directory, where build logs go (overrides `hydra_data`).
    #[arg(long, visible_alias = "data-dir")]
    hydra_data: Option<PathBuf>,
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
    let cli = parse_cli();
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

/// The command line, with every configuration key and its default in
/// `serve --help`.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let command =
        Cli::command().mut_subcommand("serve", |c| c.after_long_help(RunnerConfig::describe()));
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

/// The serve configuration: the file, then the flags over it.
fn serve_config(args: &ServeArgs) -> anyhow::Result<RunnerConfig> {
    let mut config = match &args.config {
        Some(path) => RunnerConfig::load(path)?,
        None => RunnerConfig::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(s) = &args.store_socket {
        config.store_socket = s.clone();
    }
    if let Some(d) = &args.hydra_data {
        config.hydra_data = d.clone();
    }
    config
        .check()
        .map_err(|e| anyhow::anyhow!("the configuration: {e}"))?;
    Ok(config)
}

/// Runs until a fault (returned) or a stop signal; SIGHUP reloads the file.
async fn serve(runner: &mut Runner, args: &ServeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            res = runner.wait() => return res.context("the queue runner stopped"),
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => reload(runner, args).await?,
        }
    }
}

async fn reload(runner: &Runner, args: &ServeArgs) -> anyhow::Result<()> {
    let new = match serve_config(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e:#}");
            return Ok(());
        }
    };
    let report = match runner.reload(&new).await {
        Ok(report) => report,
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            return Ok(());
        }
    };
    tracing::info!(
        changed = ?report.changed,
        need_restart = ?report.need_restart,
        "reloaded the configuration"
    );
    Ok(())
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
            let config = serve_config(&args)?;
            let url = database_url(&cli.database_url, Some(&config))?;
            let pool = hydra_db::connect(&url, config.database_connections).await?;
            let report = hydra_db::migrate(&pool)
                .await
                .context("checking the schema")?;
            if !report.applied.is_empty() {
                tracing::info!("applied migrations {:?}", report.applied);
            }
            let standby = || {
                systemd::ready("standby: another runner is active; waiting for its lock");
            };
            let mut runner = Runner::start_with(config, pool, standby).await?;
            tracing::info!("serving clients on {}", runner.client_addr);
            tracing::info!("serving builders on {}", runner.addr);
            if let Some(http) = runner.http_addr {
                tracing::info!("serving /status and /metrics on http://{http}");
            }
            systemd::ready("active");
            let heartbeat = tokio::spawn(systemd::heartbeat(runner.shared.clone()));
            let result = serve(&mut runner, &args).await;
            heartbeat.abort();
            if result.is_ok() {
                tracing::info!("asked to stop; builders keep their jobs for the next runner");
                systemd::stopping();
                runner.shutdown().await.context("stopping")?;
            }
            result
        }
        Command::Config(ConfigCommand::Check { config }) => {
            let config = RunnerConfig::load(&config)?;
            println!("ok");
            print!("{}", toml::to_string(&config)?);
            Ok(())
        }
        Command::Client(command) => cli::run(&cli.connection, command).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(
                shell,
                &mut command,
                "hydra-queue-runner",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::LocalLog { drv, hydra_data } => {
            let base = drv.rsplit('/').next().unwrap_or(&drv);
            let path = hydra_nix::StorePath::from_base_name(base)?;
            let logs = hydra_queue_runner::logs::LogStore::new(&hydra_data, Default::default());
            match logs.open_at(&path, 0)? {
                Some(mut log) => {
                    log.copy_to(&mut std::io::stdout().lock())?;
                    Ok(())
                }
                None => anyhow::bail!("no log for {drv} under {}", hydra_data.display()),
            }
        }
    }
}
