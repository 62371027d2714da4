//! The read-only status page (`GET /`): machines, running steps and the
//! queue per system, rendered on the server (no script), refreshed by the
//! browser every five seconds.

use std::fmt::Write;
use std::time::Instant;

use crate::Shared;

pub fn render(shared: &Shared, started: Instant) -> String {
    let counts = shared.state.queue_counts();
    let mut out = String::from(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>hydra-queue-runner</title><style>\
         body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}\
         td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#eee}\
         .drained{color:#a60}.resting{color:#c00}</style></head><body>",
    );
    let _ = write!(
        out,
        "<h1>hydra-queue-runner</h1><p id=\"summary\">Up {}s: {} queued builds, {} steps, \
         {} runnable, {} running.</p>",
        started.elapsed().as_secs(),
        counts.builds,
        counts.steps,
        counts.runnable,
        counts.running
    );
    machines(shared, &mut out);
    running(shared, &mut out);
    queues(shared, &mut out);
    out.push_str("</body></html>\n");
    out
}

fn machines(shared: &Shared, out: &mut String) {
    out.push_str(
        "<h2>Machines</h2><table id=\"machines\"><tr><th>Machine</th><th>Systems</th>\
         <th>Slots</th><th>Load</th><th>State</th></tr>",
    );
    for m in shared.state.machine_views(Instant::now()) {
        if !m.connected {
            continue;
        }
        let state = if m.drained {
            "<span class=\"drained\">drained</span>".to_owned()
        } else if let Some(d) = m.rested_for {
            format!("<span class=\"resting\">resting {}s</span>", d.as_secs())
        } else {
            "up".to_owned()
        };
        let _ = write!(
            out,
            "<tr><td class=\"machine\">{}</td><td>{}</td><td>{}/{}</td><td>{:.2}</td><td>{}</td></tr>",
            escape(&m.name),
            escape(&m.systems.join(", ")),
            m.running,
            m.max_jobs,
            m.load1,
            state
        );
    }
    out.push_str("</table>");
}

fn running(shared: &Shared, out: &mut String) {
    out.push_str(
        "<h2>Running steps</h2><table id=\"running\"><tr><th>Step</th><th>Machine</th>\
         <th>For</th></tr>",
    );
    let mut rows: Vec<(String, String, u64)> = shared
        .state
        .running_attempts()
        .into_iter()
        .map(|(drv, machine, took)| (drv.to_string(), machine, took.as_secs()))
        .collect();
    rows.sort();
    for (drv, machine, secs) in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{secs}s</td></tr>",
            escape(&drv),
            escape(&machine)
        );
    }
    out.push_str("</table>");
}

fn queues(shared: &Shared, out: &mut String) {
    out.push_str(
        "<h2>Queue per system</h2><table id=\"queues\"><tr><th>System</th><th>Runnable</th>\
         <th>Running</th><th>Waiting</th></tr>",
    );
    let per_system = shared.state.steps_per_system();
    for (system, s) in per_system {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&system),
            s.runnable,
            s.running,
            s.waiting
        );
    }
    out.push_str("</table>");
}

/// Text for HTML (machine names come from builders).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_builders_cannot_inject_markup() {
        assert_eq!(
            escape("<b>\"m\"&</b>"),
            "&lt;b&gt;&quot;m&quot;&amp;&lt;/b&gt;"
        );
    }
}
