//! The join handshake over real gRPC on loopback: a builder of another
//! protocol version is refused with a message that says what to do.

use std::pin::Pin;

use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::runner_service_server::{RunnerService, RunnerServiceServer};
use hydra_proto::v1::*;
use hydra_proto::{HandshakeError, PROTOCOL_VERSION, accept_join, check_welcome};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A runner that only performs the handshake.
struct HandshakeOnly;

#[tonic::async_trait]
impl RunnerService for HandshakeOnly {
    type OpenStream = BoxStream<RunnerMessage>;
    type FetchInputsStream = BoxStream<NarChunk>;

    async fn open(
        &self,
        request: Request<Streaming<BuilderMessage>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let mut inbound = request.into_inner();
        accept_join(&mut inbound).await?;
        let welcome = RunnerMessage {
            msg: Some(runner_message::Msg::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                machine_id: "m1".into(),
                ping_interval_secs: 10,
            })),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(welcome)]))))
    }
    async fn stream_log(
        &self,
        _: Request<Streaming<LogChunk>>,
    ) -> Result<Response<LogAck>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn fetch_inputs(
        &self,
        _: Request<FetchInputsRequest>,
    ) -> Result<Response<Self::FetchInputsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn upload_output(
        &self,
        _: Request<Streaming<NarChunk>>,
    ) -> Result<Response<UploadReceipt>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn complete(
        &self,
        _: Request<CompletionReport>,
    ) -> Result<Response<CompletionAck>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunnerServiceServer::new(HandshakeOnly))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn join(version: u32) -> BuilderMessage {
    BuilderMessage {
        msg: Some(builder_message::Msg::Join(Join {
            protocol_version: version,
            machine_name: "builder-1".into(),
            systems: vec!["x86_64-linux".into()],
            max_jobs: 2,
            store_dir: "/nix/store".into(),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn a_matching_builder_is_welcomed() {
    let mut client = RunnerServiceClient::connect(serve().await).await.unwrap();
    let mut replies = client
        .open(tokio_stream::iter([join(PROTOCOL_VERSION)]))
        .await
        .unwrap()
        .into_inner();
    let welcome = check_welcome(replies.next().await.unwrap().unwrap()).unwrap();
    assert_eq!(welcome.machine_id, "m1");
}

#[tokio::test]
async fn a_builder_of_another_version_is_refused_with_a_clear_status() {
    let mut client = RunnerServiceClient::connect(serve().await).await.unwrap();
    let status = client
        .open(tokio_stream::iter([join(PROTOCOL_VERSION + 1)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("builder speaks 2"),
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("same hydra-queue-runner/hydra-builder release"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_stream_that_does_not_start_with_join_is_refused() {
    let mut client = RunnerServiceClient::connect(serve().await).await.unwrap();
    let ping = BuilderMessage {
        msg: Some(builder_message::Msg::Ping(Ping::default())),
    };
    let status = client.open(tokio_stream::iter([ping])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("must be a Join"),
        "{}",
        status.message()
    );
}

#[test]
fn a_builder_rejects_a_runner_of_another_version() {
    let welcome = RunnerMessage {
        msg: Some(runner_message::Msg::Welcome(Welcome {
            protocol_version: 7,
            ..Default::default()
        })),
    };
    assert!(matches!(
        check_welcome(welcome),
        Err(HandshakeError::Version(_))
    ));
    let refused = RunnerMessage {
        msg: Some(runner_message::Msg::Refused(Refused {
            reason: "no token".into(),
            retryable: false,
        })),
    };
    let err = check_welcome(refused).unwrap_err();
    assert_eq!(err.to_string(), "the runner refused this builder: no token");
    let busy = RunnerMessage {
        msg: Some(runner_message::Msg::Refused(Refused {
            reason: "name in use".into(),
            retryable: true,
        })),
    };
    assert!(matches!(
        check_welcome(busy),
        Err(HandshakeError::RefusedForNow(r)) if r == "name in use"
    ));
}
