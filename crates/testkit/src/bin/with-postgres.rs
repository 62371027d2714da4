//! `with-postgres -- COMMAND...`: starts a throwaway PostgreSQL cluster,
//! runs COMMAND with `HYDRA_TEST_PG_URL` pointing at it, and removes the
//! cluster afterwards, whether COMMAND passed, failed or was interrupted.

use std::process::ExitCode;

use hydra_testkit::pg::{CLUSTER_URL_ENV, PgCluster};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).skip_while(|a| a == "--").collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!("usage: with-postgres -- COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let started = std::time::Instant::now();
    let cluster = match PgCluster::start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("with-postgres: cannot start PostgreSQL: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "with-postgres: PostgreSQL ready on 127.0.0.1:{} in {:.1}s ({})",
        cluster.port(),
        started.elapsed().as_secs_f64(),
        cluster.root().display()
    );
    let mut child = match tokio::process::Command::new(program)
        .args(rest)
        .env(CLUSTER_URL_ENV, cluster.url("postgres"))
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("with-postgres: cannot run {program}: {e}");
            return ExitCode::from(127);
        }
    };
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let status = tokio::select! {
        status = child.wait() => status,
        _ = term.recv() => { let _ = child.kill().await; child.wait().await }
        _ = int.recv() => { let _ = child.kill().await; child.wait().await }
    };
    drop(cluster);
    match status {
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("with-postgres: waiting for {program}: {e}");
            ExitCode::from(1)
        }
    }
}
