use thiserror::Error;

/// What can go wrong talking to a nix-daemon.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The connection failed or closed: the daemon or its machine is gone.
    #[error("connection to the nix-daemon failed: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something that is not the protocol.
    #[error("nix-daemon protocol error: {0}")]
    Protocol(String),
    #[error("nix-daemon speaks protocol {major}.{minor}; at least 1.32 (Nix 2.4) is required")]
    UnsupportedVersion { major: u64, minor: u64 },
    /// The daemon carried out the request and reported an error, with Nix's message.
    #[error("nix-daemon: {message}")]
    Nix {
        message: String,
        traces: Vec<String>,
    },
    /// Refused before sending: a malformed path would make the daemon drop
    /// the connection.
    #[error("invalid store path: {0}")]
    InvalidPath(#[from] crate::store_path::StorePathError),
    #[error("the nix-daemon does not know the size of the NAR of {0}; cannot export it")]
    UnknownNarSize(String),
}

impl DaemonError {
    /// The message Nix gave, when the daemon reported the error itself.
    pub fn nix_message(&self) -> Option<&str> {
        match self {
            DaemonError::Nix { message, .. } => Some(message),
            _ => None,
        }
    }
}
