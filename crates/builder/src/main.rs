//! `hydra-builder`: the builder agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hydra_builder::BuilderConfig;

#[derive(Parser)]
#[command(
    name = "hydra-builder",
    version,
    about = "Builder agent for hydra-queue-runner"
)]
struct Cli {
    /// TOML configuration file (every key optional).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The runner's builder service URL, repeatable for a standby (overrides
    /// `runner_url` / `runner_urls`).
    #[arg(long = "runner-url")]
    runner_urls: Vec<String>,
    /// Check the configuration and exit: prints `ok` and the effective
    /// settings, or what is wrong, and exits non-zero.
    #[arg(long)]
    check_config: bool,
    /// This machine's name (overrides `machine_name`).
    #[arg(long)]
    machine_name: Option<String>,
    /// Systems to build for, repeatable (overrides `systems`).
    #[arg(long = "system")]
    systems: Vec<String>,
    /// Supported features, repeatable (overrides `supported_features`).
    #[arg(long = "feature")]
    features: Vec<String>,
    /// Builds at once (overrides `max_jobs`).
    #[arg(long)]
    max_jobs: Option<u32>,
    /// Relative speed (overrides `speed_factor`).
    #[arg(long)]
    speed_factor: Option<f32>,
    /// The nix-daemon socket to build with (overrides `nix_daemon_socket`).
    #[arg(long)]
    nix_daemon_socket: Option<PathBuf>,
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
    let cli = {
        use clap::{CommandFactory, FromArgMatches};
        let command = Cli::command().after_long_help(BuilderConfig::describe());
        Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
    };
    let check_only = cli.check_config;
    let config = match configure(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hydra-builder: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check_only {
        println!("ok");
        print!("{}", toml::to_string(&config).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    match hydra_builder::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hydra-builder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn configure(cli: Cli) -> Result<BuilderConfig, hydra_builder::config::ConfigError> {
    let mut c = match &cli.config {
        Some(p) => BuilderConfig::load(p)?,
        None => BuilderConfig::default(),
    };
    if !cli.runner_urls.is_empty() {
        c.runner_urls = cli.runner_urls;
    }
    if let Some(n) = cli.machine_name {
        c.machine_name = n;
    }
    if !cli.systems.is_empty() {
        c.systems = cli.systems;
    }
    if !cli.features.is_empty() {
        c.supported_features = cli.features;
    }
    if let Some(j) = cli.max_jobs {
        c.max_jobs = j.max(1);
    }
    if let Some(s) = cli.speed_factor {
        c.speed_factor = s;
    }
    if let Some(s) = cli.nix_daemon_socket {
        c.nix_daemon_socket = s;
    }
    Ok(c)
}
