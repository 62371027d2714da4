//! The runner's HTTP endpoint for operators and monitoring (`http_listen`):
//! `GET /` (a read-only status page for a browser), `GET /status` (the
//! status document of [`crate::status_document`]) and `GET /metrics`
//! (Prometheus text format). What they show of the database comes from
//! [`crate::status_document::Aggregates`], refreshed on the status timer:
//! no request reads the database.

mod page;

use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::state::QueueCounts;
use crate::{Fatal, Shared};

struct App {
    shared: Arc<Shared>,
    started: Instant,
}

pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) -> Result<(), Fatal> {
    let app = Arc::new(App {
        shared,
        started: Instant::now(),
    });
    let router = Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/status/machines", get(machines))
        .route("/metrics", get(metrics))
        .with_state(app);
    axum::serve(listener, router)
        .await
        .map_err(|source| Fatal::Http { source })
}

async fn status(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut doc = crate::status_document::snapshot(&app.shared, app.started);
    if let Some(uploads) = app.shared.aggregates.read().uploads.clone() {
        doc["uploads"] = uploads;
    }
    Json(doc)
}

/// For hydra-web (`queue_runner_endpoint` in hydra.conf).
async fn machines(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(crate::status_document::machines_for_hydra_web(&app.shared))
}

async fn page(State(app): State<Arc<App>>) -> impl IntoResponse {
    let html = page::render(&app.shared, app.started);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let text = render(&app.shared);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// One metric family: its help, type and samples (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn label(key: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{{{key}=\"{escaped}\"}}")
}

fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let QueueCounts {
        builds,
        steps,
        runnable,
        running,
        ..
    } = shared.state.queue_counts();
    let one = |v: usize| vec![(String::new(), v as f64)];
    family(
        &mut out,
        "hqr_queued_builds",
        "gauge",
        "Unfinished builds in the queue.",
        &one(builds),
    );
    family(
        &mut out,
        "hqr_unfinished_steps",
        "gauge",
        "Steps in the graph.",
        &one(steps),
    );
    family(
        &mut out,
        "hqr_runnable_steps",
        "gauge",
        "Steps waiting for a machine.",
        &one(runnable),
    );
    family(
        &mut out,
        "hqr_running_steps",
        "gauge",
        "Attempts running on machines.",
        &one(running),
    );
    let per_system = shared.state.steps_per_system();
    let by_system = |pick: fn(&crate::graph::SystemSteps) -> u32| -> Vec<(String, f64)> {
        per_system
            .iter()
            .map(|(system, s)| (label("system", system), pick(s) as f64))
            .collect()
    };
    family(
        &mut out,
        "hqr_system_runnable_steps",
        "gauge",
        "Steps of a system waiting for a machine.",
        &by_system(|s| s.runnable),
    );
    family(
        &mut out,
        "hqr_system_running_steps",
        "gauge",
        "Steps of a system running.",
        &by_system(|s| s.running),
    );
    family(
        &mut out,
        "hqr_system_waiting_steps",
        "gauge",
        "Steps of a system waiting for their inputs.",
        &by_system(|s| s.waiting),
    );
    let mut slots = Vec::new();
    let mut busy = Vec::new();
    let mut failures = Vec::new();
    let mut timeouts = Vec::new();
    for m in shared.state.machine_views(Instant::now()) {
        if !m.connected {
            continue;
        }
        let l = label("machine", &m.name);
        slots.push((l.clone(), m.max_jobs as f64));
        busy.push((l.clone(), m.running as f64));
        failures.push((l.clone(), m.consecutive_failures as f64));
        timeouts.push((l, m.substituter_timeouts as f64));
    }
    family(
        &mut out,
        "hqr_machine_slots",
        "gauge",
        "Job slots of a connected machine.",
        &slots,
    );
    family(
        &mut out,
        "hqr_machine_running",
        "gauge",
        "Slots in use.",
        &busy,
    );
    family(
        &mut out,
        "hqr_machine_consecutive_failures",
        "gauge",
        "Aborted attempts in a row (a machine rests after machine_rest_after_failures).",
        &failures,
    );
    family(
        &mut out,
        "hqr_machine_substituter_timeouts_total",
        "counter",
        "Binary-cache substitutions that timed out on the machine.",
        &timeouts,
    );
    let uploads = shared.aggregates.read().uploads.clone();
    if let Some(serde_json::Value::Object(queue)) = uploads {
        let pick = |field: &str| -> Vec<(String, f64)> {
            queue
                .iter()
                .map(|(dest, v)| (label("destination", dest), v[field].as_f64().unwrap_or(0.0)))
                .collect()
        };
        family(
            &mut out,
            "hqr_uploads_pending",
            "gauge",
            "Uploads waiting for a destination.",
            &pick("pending"),
        );
        family(
            &mut out,
            "hqr_uploads_failing",
            "gauge",
            "Pending uploads whose last try failed.",
            &pick("failing"),
        );
        family(
            &mut out,
            "hqr_uploads_done_total",
            "counter",
            "Uploads done.",
            &pick("done"),
        );
    }
    shared.metrics.step_seconds.lock().render(
        &mut out,
        "hqr_step_duration_seconds",
        "Attempts from dispatch to their end, whatever the outcome.",
    );
    shared.metrics.dispatch_seconds.lock().render(
        &mut out,
        "hqr_dispatch_latency_seconds",
        "From a step becoming runnable to its job being sent to a machine.",
    );
    shared.metrics.round_seconds.lock().render(
        &mut out,
        "hqr_dispatch_round_seconds",
        "One dispatcher round's decisions (sorting runnable steps, choosing machines).",
    );
    family(
        &mut out,
        "hqr_db_pool_connections",
        "gauge",
        "PostgreSQL connections of the pool.",
        &one(shared.pool.size() as usize),
    );
    family(
        &mut out,
        "hqr_db_pool_idle_connections",
        "gauge",
        "Idle PostgreSQL connections of the pool.",
        &one(shared.pool.num_idle()),
    );
    shared.metrics.pool_wait_seconds.lock().render(
        &mut out,
        "hqr_db_pool_wait_seconds",
        "How long the runner's transactions waited for a connection of its own pool.",
    );
    family(
        &mut out,
        "hqr_db_api_pool_connections",
        "gauge",
        "PostgreSQL connections of the client API's and HTTP endpoint's pool.",
        &one(shared.api_pool.size() as usize),
    );
    out
}
