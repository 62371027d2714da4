//! The operator commands of `hydra-queue-runner` that talk to a running
//! runner over its client API: human tables by default, `--json` for
//! scripts (one JSON document, or one per line for streams).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use hydra_proto::client::client_service_client::ClientServiceClient;
use hydra_proto::client::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// How to reach the runner, shared by every client command.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The runner's gRPC address (its `listen`).
    #[arg(
        long,
        env = "HYDRA_QUEUE_RUNNER_URL",
        default_value = "http://127.0.0.1:7070",
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
        #[arg(long, default_value_t = 0)]
        from_line: u64,
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
        } => logs(&mut client, &out, &target, follow, from_line).await,
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

async fn status(client: &mut Client, out: &Output) -> Result<()> {
    let s = client
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    if out.json {
        let systems: Vec<Value> = s
            .systems
            .iter()
            .map(|q| json!({"system": q.system, "runnable": q.runnable, "running": q.running, "waiting": q.waiting}))
            .collect();
        return out.print_json(&json!({
            "queued_builds": s.queued_builds, "steps": s.steps, "runnable": s.runnable,
            "running": s.running, "machines": s.machines, "systems": systems,
            "last_event_seq": s.last_event_seq,
        }));
    }
    println!(
        "{} queued builds, {} steps ({} runnable, {} running), {} machines",
        s.queued_builds, s.steps, s.runnable, s.running, s.machines
    );
    let rows = s
        .systems
        .iter()
        .map(|q| {
            vec![
                q.system.clone(),
                q.runnable.to_string(),
                q.running.to_string(),
                q.waiting.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["SYSTEM", "RUNNABLE", "RUNNING", "WAITING"], rows)
    );
    Ok(())
}

async fn machines(client: &mut Client, out: &Output) -> Result<()> {
    let ms = client
        .machines(MachinesRequest {})
        .await?
        .into_inner()
        .machines;
    if out.json {
        let list: Vec<Value> = ms.iter().map(machine_json).collect();
        return out.print_json(&Value::Array(list));
    }
    let rows = ms
        .iter()
        .map(|m| {
            let state = match (m.connected, m.drained, m.rested_for_secs) {
                (false, _, _) => "disconnected, drained".to_owned(),
                (true, true, _) => "drained".to_owned(),
                (true, false, 0) => "up".to_owned(),
                (true, false, s) => format!("resting {s}s"),
            };
            vec![
                m.name.clone(),
                m.systems.join(","),
                format!("{}/{}", m.running, m.max_jobs),
                format!("{:.2}", m.load1),
                state,
                m.current_steps
                    .iter()
                    .map(|s| s.rsplit('/').next().unwrap_or(s).to_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["MACHINE", "SYSTEMS", "SLOTS", "LOAD", "STATE", "STEPS"],
            rows
        )
    );
    Ok(())
}

fn machine_json(m: &MachineInfo) -> Value {
    json!({
        "name": m.name, "systems": m.systems, "supported_features": m.supported_features,
        "mandatory_features": m.mandatory_features, "max_jobs": m.max_jobs, "running": m.running,
        "load1": m.load1, "speed_factor": m.speed_factor, "current_steps": m.current_steps,
        "drained": m.drained, "rested_for_secs": m.rested_for_secs,
        "consecutive_failures": m.consecutive_failures, "connected": m.connected,
    })
}

async fn submit(client: &mut Client, out: &Output, a: SubmitArgs) -> Result<()> {
    let priority = match a.priority {
        Class::Interactive => PriorityClass::Interactive,
        Class::Normal => PriorityClass::Normal,
        Class::Background => PriorityClass::Background,
    };
    let mode = if a.soft {
        SupersedeMode::Soft
    } else {
        SupersedeMode::Hard
    };
    let r = client
        .submit(SubmitRequest {
            drv_paths: a.drvs,
            drv_nars: Vec::new(),
            tenant: a.tenant,
            queue: a.queue,
            priority: priority as i32,
            max_silent_secs: a.max_silent_secs.unwrap_or(0),
            timeout_secs: a.timeout_secs.unwrap_or(0),
            supersede_key: a.supersede_key.unwrap_or_default(),
            supersede_mode: mode as i32,
            job: a.job.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if out.json {
        return out.print_json(&json!({ "builds": r.build_ids, "superseded": r.superseded }));
    }
    for id in &r.build_ids {
        println!("queued build {id}");
    }
    for id in &r.superseded {
        println!("superseded build {id}");
    }
    Ok(())
}

fn build_json(b: &BuildInfo) -> Value {
    let steps = b.steps.as_ref().map(|s| {
        json!({"total": s.total, "cached": s.cached, "queued": s.queued, "running": s.running,
               "succeeded": s.succeeded, "failed": s.failed})
    });
    let outputs: serde_json::Map<String, Value> = b
        .outputs
        .iter()
        .map(|o| (o.name.clone(), json!(o.path)))
        .collect();
    json!({
        "id": b.id, "tenant": b.tenant, "queue": b.queue, "job": b.job, "drv_path": b.drv_path,
        "system": b.system, "finished": b.finished, "build_status": b.build_status,
        "status": b.status, "queued_at": b.queued_at, "start_time": b.start_time,
        "stop_time": b.stop_time, "global_priority": b.global_priority,
        "local_priority": b.local_priority, "steps": steps, "outputs": outputs,
        "cancel_reason": b.cancel_reason, "supersede_key": b.supersede_key,
    })
}

async fn show(client: &mut Client, out: &Output, build: u64) -> Result<()> {
    let b = client
        .get_build(GetBuildRequest { build_id: build })
        .await?
        .into_inner();
    if out.json {
        return out.print_json(&build_json(&b));
    }
    println!(
        "build {} ({}/{}:{}): {}",
        b.id, b.tenant, b.queue, b.job, b.status
    );
    println!("  {}", b.drv_path);
    if let Some(s) = &b.steps {
        println!("  steps: {}", counters_line(s));
    }
    for o in &b.outputs {
        println!("  {} -> {}", o.name, o.path);
    }
    if !b.cancel_reason.is_empty() {
        println!("  cancelled: {}", b.cancel_reason);
    }
    Ok(())
}

fn counters_line(s: &StepCounters) -> String {
    format!(
        "{} in all: {} cached, {} queued, {} running, {} succeeded, {} failed",
        s.total, s.cached, s.queued, s.running, s.succeeded, s.failed
    )
}

async fn list(client: &mut Client, out: &Output, a: ListArgs) -> Result<()> {
    let r = client
        .list_builds(ListBuildsRequest {
            tenant: a.tenant,
            queue: a.queue,
            status: a.status,
            queued_after: 0,
            queued_before: 0,
            after_id: a.before,
            limit: a.limit,
        })
        .await?
        .into_inner();
    if out.json {
        let builds: Vec<Value> = r.builds.iter().map(build_json).collect();
        return out.print_json(&json!({ "builds": builds, "next_before": r.next_after_id }));
    }
    let rows = r
        .builds
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                format!("{}/{}", b.tenant, b.queue),
                b.job.clone(),
                b.status.clone(),
            ]
        })
        .collect();
    print!("{}", table(&["ID", "JOBSET", "JOB", "STATUS"], rows));
    if r.next_after_id != 0 {
        println!("more: --before {}", r.next_after_id);
    }
    Ok(())
}

fn kind_name(k: i32) -> &'static str {
    match EventKind::try_from(k).unwrap_or(EventKind::Unspecified) {
        EventKind::Queued => "queued",
        EventKind::StepStarted => "step-started",
        EventKind::StepProgress => "step-progress",
        EventKind::StepFinished => "step-finished",
        EventKind::Resolved => "resolved",
        EventKind::Completed => "completed",
        EventKind::Failed => "failed",
        EventKind::Cancelled => "cancelled",
        EventKind::Log => "log",
        EventKind::Unspecified => "unknown",
    }
}

fn event_json(e: &Event) -> Value {
    json!({
        "seq": e.seq, "kind": kind_name(e.kind), "builds": e.build_ids, "time_ms": e.time_ms,
        "drv_path": e.drv_path, "machine": e.machine, "status": e.status, "detail": e.detail,
    })
}

fn event_line(e: &Event) -> String {
    let builds: Vec<String> = e.build_ids.iter().map(u64::to_string).collect();
    let drv = e.drv_path.rsplit('/').next().unwrap_or("");
    let mut line = format!("#{} {} [{}]", e.seq, kind_name(e.kind), builds.join(","));
    for part in [drv, e.machine.as_str(), e.detail.as_str()] {
        if !part.is_empty() {
            line.push(' ');
            line.push_str(part);
        }
    }
    if let Some(s) = e.status {
        line.push_str(&format!(" (status {s})"));
    }
    line
}

async fn watch(
    client: &mut Client,
    out: &Output,
    build: Option<u64>,
    after: u64,
    logs: bool,
) -> Result<()> {
    let mut stream = client
        .watch(WatchRequest {
            build_id: build.unwrap_or(0),
            after_seq: after,
            until_finished: build.is_some(),
            include_logs: logs,
        })
        .await?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("a valid template"),
    );
    if out.json || build.is_none() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    while let Some(event) = stream.message().await? {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        if out.json {
            out.print_json(&event_json(&event))?;
        } else if kind == EventKind::Log {
            let step = event.drv_path.rsplit('/').next().unwrap_or("");
            bar.println(format!("  {step}> {}", event.detail));
        } else {
            bar.println(event_line(&event));
        }
        // Only what moves the counters is worth asking the runner about.
        let moves = matches!(
            kind,
            EventKind::Queued
                | EventKind::StepStarted
                | EventKind::StepFinished
                | EventKind::Resolved
        );
        if let Some(id) = build.filter(|_| moves && !bar.is_hidden()) {
            let b = client
                .get_build(GetBuildRequest { build_id: id })
                .await?
                .into_inner();
            if let Some(s) = &b.steps {
                bar.set_length(s.total as u64);
                bar.set_position((s.cached + s.succeeded + s.failed) as u64);
                bar.set_message(format!("{} running", s.running));
            }
        }
    }
    bar.finish_and_clear();
    let Some(id) = build else { return Ok(()) };
    let b = client
        .get_build(GetBuildRequest { build_id: id })
        .await?
        .into_inner();
    if out.json {
        out.print_json(&json!({ "summary": build_json(&b) }))?;
    } else {
        let took = (b.stop_time - b.start_time).max(0);
        println!("build {id} {} after {took}s", b.status);
        if let Some(s) = &b.steps {
            println!("  steps: {}", counters_line(s));
        }
        for o in &b.outputs {
            println!("  {} -> {}", o.name, o.path);
        }
    }
    if b.build_status != Some(0) {
        bail!("build {id} {}", b.status);
    }
    Ok(())
}

async fn logs(
    client: &mut Client,
    out: &Output,
    target: &str,
    follow: bool,
    from_line: u64,
) -> Result<()> {
    let (build_id, drv_path) = match target.parse::<u64>() {
        Ok(id) => (id, String::new()),
        Err(_) => (0, target.to_owned()),
    };
    let mut stream = client
        .get_log(GetLogRequest {
            drv_path,
            build_id,
            from_line,
            follow,
        })
        .await?
        .into_inner();
    let stdout = std::io::stdout();
    while let Some(batch) = stream.message().await? {
        let mut lock = stdout.lock();
        for (i, line) in batch.lines.iter().enumerate() {
            if out.json {
                let n = batch.first_line + i as u64;
                writeln!(lock, "{}", json!({ "line": n, "text": line }))?;
            } else {
                writeln!(lock, "{line}")?;
            }
        }
        lock.flush()?;
    }
    Ok(())
}

async fn explain(client: &mut Client, out: &Output, build: u64, drv: Option<String>) -> Result<()> {
    let r = client
        .explain(ExplainRequest {
            build_id: build,
            drv_path: drv.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if out.json {
        let steps: Vec<Value> = r
            .steps
            .iter()
            .map(|s| {
                json!({"drv_path": s.drv_path, "system": s.system, "reason": s.reason,
                            "detail": s.detail, "waiting_for": s.waiting_for, "until": s.until})
            })
            .collect();
        return out.print_json(&json!({ "summary": r.summary, "steps": steps }));
    }
    println!("{}", r.summary);
    let rows = r
        .steps
        .iter()
        .map(|s| {
            vec![
                s.drv_path.rsplit('/').next().unwrap_or("").to_owned(),
                s.reason.clone(),
                s.detail.clone(),
            ]
        })
        .collect();
    print!("{}", table(&["STEP", "REASON", "DETAIL"], rows));
    Ok(())
}

#[cfg(test)]
mod tests {
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
