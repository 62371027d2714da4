//! A test hook for crash tests: with `HYDRA_QUEUE_RUNNER_STOP_AT=<point>`
//! in its environment, the runner prints `stopped at <point>` on stderr the
//! first time it passes that point and stops itself (SIGSTOP), so that a
//! test can SIGKILL it exactly there and check what a restart makes of the
//! database it left. Without the variable it costs one comparison.
//!
//! Points: `resolution-recorded` (a step's status-13 row is committed, the
//! graph not yet changed), `dispatch-recorded` (an attempt's busy row is
//! committed, the job not yet sent).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

const VARIABLE: &str = "HYDRA_QUEUE_RUNNER_STOP_AT";

pub fn stop_at(point: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    static PASSED: AtomicBool = AtomicBool::new(false);
    let wanted = WANTED.get_or_init(|| std::env::var(VARIABLE).ok());
    if wanted.as_deref() != Some(point) || PASSED.swap(true, Ordering::SeqCst) {
        return;
    }
    eprintln!("stopped at {point}");
    // SAFETY: raise has no preconditions; SIGSTOP cannot be caught.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}
