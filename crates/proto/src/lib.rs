//! The gRPC protocol between the queue runner and its builders, generated
//! from `proto/builder.proto` (and the client API from `proto/client.proto`),
//! and the version handshake both sides apply.

use thiserror::Error;

pub mod nar;

/// Generated messages and service stubs (`hydra.builder.v1`).
pub mod v1 {
    tonic::include_proto!("hydra.builder.v1");
}

/// The client API (`hydra.client.v1`): submit, watch, cancel, explain.
pub mod client {
    tonic::include_proto!("hydra.client.v1");
}

/// Encoded descriptors of both services, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// The protocol version of this build. Runner and builder must agree exactly:
/// a mismatch is refused at join, with a message saying which side to upgrade.
pub const PROTOCOL_VERSION: u32 = 1;

/// A peer that speaks another protocol version.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "protocol version mismatch: this {local_role} speaks builder protocol {local}, the {peer_role} speaks {peer}; \
     run the same hydra-queue-runner/hydra-builder release on both sides"
)]
pub struct VersionMismatch {
    pub local_role: &'static str,
    pub peer_role: &'static str,
    pub local: u32,
    pub peer: u32,
}

/// Checks a peer's protocol version. `local_role` is "runner" or "builder".
pub fn check_peer_version(local_role: &'static str, peer: u32) -> Result<(), VersionMismatch> {
    if peer == PROTOCOL_VERSION {
        return Ok(());
    }
    let peer_role = if local_role == "runner" {
        "builder"
    } else {
        "runner"
    };
    Err(VersionMismatch {
        local_role,
        peer_role,
        local: PROTOCOL_VERSION,
        peer,
    })
}

/// What can end a join before it starts, on the builder's side.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("the runner refused this builder: {0}")]
    Refused(String),
    /// A refusal that may end by itself (see `Refused.retryable`).
    #[error("the runner refused this builder for now: {0}")]
    RefusedForNow(String),
    #[error(transparent)]
    Version(#[from] VersionMismatch),
    #[error("the runner answered the join with something other than Welcome or Refused")]
    Unexpected,
}

/// Runner side: reads the first message of an `Open` stream, which must be
/// a `Join` of this protocol version. The error is the gRPC status to end
/// the stream with, carrying a message the builder's operator can act on.
pub async fn accept_join(
    inbound: &mut tonic::Streaming<v1::BuilderMessage>,
) -> Result<v1::Join, tonic::Status> {
    let first = inbound.message().await?.ok_or_else(|| {
        tonic::Status::invalid_argument("the control stream ended before the builder joined")
    })?;
    match first.msg {
        Some(v1::builder_message::Msg::Join(join)) => {
            check_peer_version("runner", join.protocol_version)
                .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
            Ok(join)
        }
        _ => Err(tonic::Status::invalid_argument(
            "the first message on the control stream must be a Join",
        )),
    }
}

/// Builder side: checks the runner's answer to a join.
pub fn check_welcome(msg: v1::RunnerMessage) -> Result<v1::Welcome, HandshakeError> {
    match msg.msg {
        Some(v1::runner_message::Msg::Welcome(w)) => {
            check_peer_version("builder", w.protocol_version)?;
            Ok(w)
        }
        Some(v1::runner_message::Msg::Refused(r)) if r.retryable => {
            Err(HandshakeError::RefusedForNow(r.reason))
        }
        Some(v1::runner_message::Msg::Refused(r)) => Err(HandshakeError::Refused(r.reason)),
        _ => Err(HandshakeError::Unexpected),
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;
    use super::*;
    use prost::Message;

    #[test]
    fn a_mismatch_names_both_versions_and_the_fix() {
        assert!(check_peer_version("runner", PROTOCOL_VERSION).is_ok());
        let err = check_peer_version("runner", PROTOCOL_VERSION + 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("runner speaks builder protocol 1"), "{msg}");
        assert!(msg.contains("builder speaks 2"), "{msg}");
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let join = BuilderMessage {
            msg: Some(builder_message::Msg::Join(Join {
                protocol_version: PROTOCOL_VERSION,
                machine_name: "b1".into(),
                systems: vec!["x86_64-linux".into()],
                max_jobs: 4,
                store_dir: "/nix/store".into(),
                ..Default::default()
            })),
        };
        let bytes = join.encode_to_vec();
        assert_eq!(BuilderMessage::decode(bytes.as_slice()).unwrap(), join);
        assert!(BuilderMessage::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
