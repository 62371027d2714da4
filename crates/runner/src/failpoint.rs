//! A test hook for crash tests: with `HYDRA_QUEUE_RUNNER_STOP_AT=<point>`
//! in its environment, the runner prints `stopped at <point>` on stderr the
//! first time it passes that point and stops itself (SIGSTOP), so that a
//! test can SIGKILL it exactly there and check what a restart makes of the
//! database it left. Without the variable it costs one comparison.
//!
//! Points: `resolution-recorded` (a step's status-13 row is committed, the
//! graph not yet changed), `dispatch-recorded` (an attempt's busy row is
//! committed, the job not yet sent). `<point>:<name>` stops there only for
//! the derivation named `<name>` (its name without the hash or `.drv`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use hydra_nix::StorePath;

const VARIABLE: &str = "HYDRA_QUEUE_RUNNER_STOP_AT";

pub fn stop_at(point: &str, drv: &StorePath) {
    static WANTED: OnceLock<Option<(String, Option<String>)>> = OnceLock::new();
    static PASSED: AtomicBool = AtomicBool::new(false);
    let wanted = WANTED.get_or_init(|| {
        let value = std::env::var(VARIABLE).ok()?;
        Some(match value.split_once(':') {
            Some((p, name)) => (p.to_owned(), Some(name.to_owned())),
            None => (value, None),
        })
    });
    let Some((wanted_point, wanted_name)) = wanted else {
        return;
    };
    let name = drv.name().strip_suffix(".drv").unwrap_or(drv.name());
    if wanted_point != point
        || wanted_name.as_deref().is_some_and(|n| n != name)
        || PASSED.swap(true, Ordering::SeqCst)
    {
        return;
    }
    eprintln!("stopped at {point} for {drv}");
    // SAFETY: raise has no preconditions; SIGSTOP cannot be caught.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}
