//! Hydra's status codes, shared by `Builds.buildStatus` and `BuildSteps.status`,
//! and the progress codes of `BuildSteps.busy`.

/// A build or step outcome, with Hydra's numeric codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum BuildStatus {
    Success = 0,
    Failed = 1,
    /// Builds only: a dependency failed.
    DepFailed = 2,
    /// Infrastructure failure; retryable, never a build failure.
    Aborted = 3,
    Cancelled = 4,
    /// `$out/nix-support/failed` exists.
    FailedWithOutput = 6,
    TimedOut = 7,
    /// Steps only.
    CachedFailure = 8,
    Unsupported = 9,
    LogLimitExceeded = 10,
    NarSizeLimitExceeded = 11,
    NotDeterministic = 12,
    /// CA: the step was resolved to another derivation (`resolvedDrvPath`).
    Resolved = 13,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 13] = [
        BuildStatus::Success,
        BuildStatus::Failed,
        BuildStatus::DepFailed,
        BuildStatus::Aborted,
        BuildStatus::Cancelled,
        BuildStatus::FailedWithOutput,
        BuildStatus::TimedOut,
        BuildStatus::CachedFailure,
        BuildStatus::Unsupported,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NarSizeLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::Resolved,
    ];

    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i32) -> Option<BuildStatus> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// `BuildSteps.busy`: what a running step is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum StepProgress {
    Idle = 0,
    Preparing = 1,
    Connecting = 10,
    SendingInputs = 20,
    Building = 30,
    WaitingForLocalSlot = 35,
    ReceivingOutputs = 40,
    PostProcessing = 50,
}

impl StepProgress {
    pub fn code(self) -> i32 {
        self as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_hydras() {
        let codes: Vec<i32> = BuildStatus::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(BuildStatus::from_code(5), None);
        assert_eq!(BuildStatus::from_code(13), Some(BuildStatus::Resolved));
        assert_eq!(StepProgress::ReceivingOutputs.code(), 40);
    }
}
