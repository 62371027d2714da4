//! systemd integration (`Type=notify`): READY when the runner serves (or
//! stands by), STATUS with what it does, WATCHDOG pings at half of
//! `WatchdogSec`, STOPPING on a clean stop. Outside systemd (no
//! `NOTIFY_SOCKET`) every call does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::Shared;
use crate::state::QueueCounts;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Half the watchdog interval systemd asked for, if it asked: as
/// libsystemd's `sd_watchdog_enabled`, `WATCHDOG_USEC` set and
/// `WATCHDOG_PID`, when set, this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// A watchdog ping, when systemd asked for them.
pub fn watchdog() {
    if watchdog_interval().is_some() {
        send(&[NotifyState::Watchdog]);
    }
}

/// While the runner runs: the watchdog ping and a status line with the
/// queue, every half watchdog interval (every 5 s without a watchdog).
/// Not critical: a lost datagram is systemd's business.
pub async fn heartbeat(shared: Arc<Shared>) {
    let every = watchdog_interval().unwrap_or(Duration::from_secs(5));
    loop {
        watchdog();
        status(&describe(&shared));
        tokio::time::sleep(every).await;
    }
}

fn describe(shared: &Shared) -> String {
    let QueueCounts {
        builds,
        steps,
        runnable,
        running,
        machines,
    } = shared.state.queue_counts();
    format!(
        "active: {builds} builds queued, {steps} steps ({runnable} runnable, {running} running), {machines} machines"
    )
}
