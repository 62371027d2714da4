//! The operator commands of `hydra-queue-runner` that talk to a running
//! runner over its client API: human tables by default, `--json` for
//! scripts (one JSON document, or one per line for streams).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use hydra_proto::client::client_service_client::ClientServiceClient;
use hydra_proto::client::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

mod follow;
mod show;

use follow::{explain, logs, watch};
use show::{list, machines, show, status, submit};

/// How to reach the runner, shared by every client command.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The runner's gRPC address (its `listen`).
    #[arg(
        long,
        env = "HYDRA_QUEUE_RUNNER_URL",
        default_value = "http://127.0.0.1:7072",
        global = true
    )]
    pub url: String,
    /// A file holding the client token (see `client_tokens_dir`).
    #[arg(long, env = "HYDRA_QUEUE_RUNNER_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) for an https:// runner.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Queue depth per system, steps and machines.
    Status,
    /// Connected (and drained) machines with their slots and current steps.
    Machines,
    /// Queue derivations already in the runner's store.
    Submit(SubmitArgs),
    /// One build's status, step counters and outputs.
    Show { build: u64 },
    /// Builds, newest first.
    List(ListArgs),
    /// Follow a build's events (or everyone's) with progress; a summary at
    /// the end. Exits non-zero when the build did not succeed.
    Watch {
        /// Omit to watch every build.
        build: Option<u64>,
        /// Resume after this event number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print the running steps' log lines too.
        #[arg(long)]
        logs: bool,
    },
    /// A step's log (a build's top-level step, or a `.drv` path).
    Logs {
        /// Build id or `.drv` path.
        target: String,
        /// Keep printing new lines until the step finishes (like tail -f).
        #[arg(long, short)]
        follow: bool,
        /// First line to print (0-based).
        #[arg(long, default_value_t = 0, conflicts_with = "from_byte")]
        from_line: u64,
        /// Print the log's exact bytes from this byte on (without --json;
        /// what the log holds, invalid UTF-8 and all).
        #[arg(long)]
        from_byte: Option<u64>,
    },
    /// Cancel queued builds (status 4); steps other builds need keep running.
    Cancel {
        builds: Vec<u64>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Put finished builds back in the queue (Hydra's restart).
    Restart(RestartArgs),
    /// Set the global priority of queued builds.
    Bump {
        builds: Vec<u64>,
        #[arg(long, default_value_t = 100)]
        priority: i32,
    },
    /// Why a build's steps are not running.
    Explain {
        build: u64,
        /// Only this step.
        #[arg(long)]
        drv: Option<String>,
    },
    /// Let a machine finish what it runs and give it nothing new.
    Drain { machine: String },
    /// Give a drained machine work again.
    Undrain { machine: String },
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// `.drv` paths in the runner's store.
    #[arg(required = true)]
    pub drvs: Vec<String>,
    #[arg(long)]
    pub tenant: String,
    #[arg(long, default_value = "default")]
    pub queue: String,
    #[arg(long, value_enum, default_value_t = Class::Normal)]
    pub priority: Class,
    /// A later submission with the same key cancels this one.
    #[arg(long)]
    pub supersede_key: Option<String>,
    /// Let a superseded build's running steps finish.
    #[arg(long)]
    pub soft: bool,
    #[arg(long)]
    pub job: Option<String>,
    #[arg(long)]
    pub max_silent_secs: Option<u32>,
    #[arg(long)]
    pub timeout_secs: Option<u32>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long, default_value = "")]
    pub tenant: String,
    #[arg(long, default_value = "")]
    pub queue: String,
    /// queued, finished, succeeded, failed or cancelled.
    #[arg(long, default_value = "")]
    pub status: String,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Builds older than this id (the next page).
    #[arg(long, default_value_t = 0)]
    pub before: u64,
}

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// Build ids; or use --tenant and --queue.
    pub builds: Vec<u64>,
    #[arg(long, default_value = "")]
    pub tenant: String,
    #[arg(long, default_value = "")]
    pub queue: String,
    /// Only the failed builds of the jobset.
    #[arg(long)]
    pub failed: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Class {
    Interactive,
    Normal,
    Background,
}

pub async fn run(conn: &Connection, command: ClientCommand) -> Result<()> {
    let mut client = connect(conn).await?;
    let out = Output { json: conn.json };
    match command {
        ClientCommand::Status => status(&mut client, &out).await,
        ClientCommand::Machines => machines(&mut client, &out).await,
        ClientCommand::Submit(args) => submit(&mut client, &out, args).await,
        ClientCommand::Show { build } => show(&mut client, &out, build).await,
        ClientCommand::List(args) => list(&mut client, &out, args).await,
        ClientCommand::Watch { build, after, logs } => {
            watch(&mut client, &out, build, after, logs).await
        }
        ClientCommand::Logs {
            target,
            follow,
            from_line,
            from_byte,
        } => logs(&mut client, &out, &target, follow, from_line, from_byte).await,
        ClientCommand::Cancel { builds, reason } => {
            let r = client
                .cancel(CancelRequest {
                    build_ids: builds,
                    reason,
                })
                .await?
                .into_inner();
            out.ids("cancelled", &r.cancelled)
        }
        ClientCommand::Restart(a) => {
            let r = client
                .restart(RestartRequest {
                    build_ids: a.builds,
                    tenant: a.tenant,
                    queue: a.queue,
                    only_failed: a.failed,
                })
                .await?
                .into_inner();
            out.ids("restarted", &r.restarted)
        }
        ClientCommand::Bump { builds, priority } => {
            let r = client
                .bump(BumpRequest {
                    build_ids: builds,
                    global_priority: priority,
                })
                .await?
                .into_inner();
            out.ids("bumped", &r.bumped)
        }
        ClientCommand::Explain { build, drv } => explain(&mut client, &out, build, drv).await,
        ClientCommand::Drain { machine } => {
            client
                .drain(DrainRequest {
                    machine: machine.clone(),
                })
                .await?;
            out.done(&format!("drained {machine}"), json!({ "drained": machine }))
        }
        ClientCommand::Undrain { machine } => {
            client
                .undrain(DrainRequest {
                    machine: machine.clone(),
                })
                .await?;
            out.done(
                &format!("undrained {machine}"),
                json!({ "undrained": machine }),
            )
        }
    }
}

type Client =
    ClientServiceClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>;

#[derive(Clone)]
pub struct TokenInterceptor(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

async fn connect(conn: &Connection) -> Result<Client> {
    let token = match (
        &conn.token_file,
        std::env::var("HYDRA_QUEUE_RUNNER_TOKEN").ok(),
    ) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?,
        ),
        (None, t) => t,
    };
    let header = token
        .map(|t| format!("Bearer {}", t.trim()).parse())
        .transpose()
        .context("the token is not a valid header value")?;
    let mut endpoint = Channel::from_shared(conn.url.clone())
        .with_context(|| format!("{} is not a URL", conn.url))?
        .connect_timeout(Duration::from_secs(10));
    if let Some(ca) = &conn.tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the runner at {}", conn.url))?;
    Ok(ClientServiceClient::with_interceptor(
        channel,
        TokenInterceptor(header),
    ))
}

/// Where results go: a table for people or JSON for scripts.
struct Output {
    json: bool,
}

impl Output {
    fn print_json(&self, v: &Value) -> Result<()> {
        println!("{}", serde_json::to_string(v)?);
        Ok(())
    }

    fn done(&self, text: &str, v: Value) -> Result<()> {
        if self.json {
            self.print_json(&v)
        } else {
            println!("{text}");
            Ok(())
        }
    }

    fn ids(&self, what: &str, ids: &[u64]) -> Result<()> {
        let list: Vec<String> = ids.iter().map(u64::to_string).collect();
        let text = if ids.is_empty() {
            format!("{what}: none")
        } else {
            format!("{what}: {}", list.join(" "))
        };
        self.done(&text, json!({ what: ids }))
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::show::{event_json, event_line};
    use super::*;

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let t = table(
            &["ID", "STATUS"],
            vec![
                vec!["7".into(), "queued".into()],
                vec!["1234".into(), "ok".into()],
            ],
        );
        assert_eq!(t, "ID    STATUS\n7     queued\n1234  ok\n");
    }

    #[test]
    fn an_event_reads_as_one_line() {
        let e = Event {
            seq: 12,
            kind: EventKind::StepFinished as i32,
            build_ids: vec![3, 4],
            drv_path: "/nix/store/abc-hello.drv".into(),
            machine: "m1".into(),
            status: Some(0),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "#12 step-finished [3,4] abc-hello.drv m1 (status 0)"
        );
        assert_eq!(event_json(&e)["kind"], "step-finished");
    }
}
