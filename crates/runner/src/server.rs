//! The runner's two gRPC ports. `listen`: the builder tunnel (with
//! builder authentication and TLS, done here so that a refused builder is
//! logged with the reason) and health. `client_listen`: the client API,
//! health, and reflection (behind a client token when tokens are set), with
//! TLS of its own. What reaches builders does not reach the API.

use std::sync::Arc;
use std::time::Duration;

use hydra_proto::v1::runner_service_server::RunnerServiceServer;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Request;

use crate::auth::bearer;
use crate::tunnel::BuilderTunnel;
use crate::{Fatal, Shared};

/// TLS of the builder service, from the files read once at start (a bad
/// file stops the runner at once, with its path). The handshake is done
/// here rather than inside tonic, so that a refused builder (no client
/// certificate, one of another CA) is logged with the reason.
pub struct TlsFiles {
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl TlsFiles {
    /// The builder service's (`tls_cert`, `tls_key`, `tls_client_ca`).
    pub fn read(config: &crate::RunnerConfig) -> Result<TlsFiles, Fatal> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(TlsFiles { acceptor: None });
        };
        Self::from_files(cert, key, config.tls_client_ca.as_deref())
    }

    /// The client API's (`client_tls_cert`, `client_tls_key`).
    pub fn read_client(config: &crate::RunnerConfig) -> Result<TlsFiles, Fatal> {
        let (Some(cert), Some(key)) = (&config.client_tls_cert, &config.client_tls_key) else {
            return Ok(TlsFiles { acceptor: None });
        };
        Self::from_files(cert, key, None)
    }

    fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<TlsFiles, Fatal> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let bad = |path: &std::path::Path, e: &dyn std::fmt::Display| Fatal::TlsFile {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect())
            .map_err(|e| bad(cert, &e))?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(cert, &e))?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, &e))? {
                    roots
                        .add(c.map_err(|e| bad(ca, &e))?)
                        .map_err(|e| bad(ca, &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .map_err(|e| bad(ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder
            .with_single_cert(certs, key_der)
            .map_err(|e| bad(key, &e))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsFiles {
            acceptor: Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
        })
    }
}

pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
) -> Result<(), Fatal> {
    let config = shared.config();
    let interval = Duration::from_secs(config.ping_interval_secs.into());
    let timeout = Duration::from_secs(config.ping_timeout_secs.into());
    let tokens = shared.clone();
    let service = RunnerServiceServer::new(BuilderTunnel::new(shared.clone()))
        .max_decoding_message_size(64 << 20);
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        move |request: Request<()>| {
            if let Err(status) = tokens.tokens.read().check(bearer(&request)) {
                let from = request.remote_addr();
                tracing::warn!(?from, "refused a builder call: {}", status.message());
                return Err(status);
            }
            Ok(request)
        },
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RunnerServiceServer<BuilderTunnel>>()
        .await;
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(interval))
        .http2_keepalive_timeout(Some(timeout))
        .add_service(service)
        .add_service(health_service);
    serve_on(server, listener, tls).await
}

/// The client API on its own port: the API (its interceptor identifies
/// every caller), health (open, for load balancers) and reflection (any
/// valid client token when tokens are asked).
pub async fn serve_clients(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
) -> Result<(), Fatal> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<hydra_proto::client::client_service_server::ClientServiceServer<crate::api::ClientApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hydra_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptors are valid");
    let tokens = shared.clone();
    let reflection = tonic::service::interceptor::InterceptedService::new(
        reflection,
        move |request: Request<()>| {
            tokens
                .client_tokens
                .read()
                .identify(bearer(&request))
                .map(|_| request)
        },
    );
    let server = tonic::transport::Server::builder()
        .add_service(crate::api::service(shared.clone()))
        .add_service(health_service)
        .add_service(reflection);
    serve_on(server, listener, tls).await
}

/// Serves `router` on `listener`, through TLS when `tls` has an acceptor.
async fn serve_on(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
) -> Result<(), Fatal> {
    match tls.acceptor {
        None => {
            router
                .serve_with_incoming(no_delay(TcpListenerStream::new(listener)))
                .await?
        }
        Some(acceptor) => {
            router
                .serve_with_incoming(tls_handshakes(listener, acceptor))
                .await?
        }
    }
    Ok(())
}

/// Connections with Nagle's algorithm off: the control stream's small
/// messages (a job, an abort) must leave at once, not wait for the
/// builder's delayed ACK (which cost about 40 ms per step).
fn no_delay(
    incoming: TcpListenerStream,
) -> impl Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    use tokio_stream::StreamExt;
    incoming.map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

type TlsConnection = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepted connections after their TLS handshake; a failed handshake is
/// logged with its reason and the connection dropped.
fn tls_handshakes(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> ReceiverStream<Result<TlsConnection, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(%from, "cannot set TCP_NODELAY: {e}");
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%from, "refused a builder connection: TLS handshake failed: {e}");
                    }
                    Err(_) => {
                        tracing::warn!(%from, "refused a builder connection: TLS handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
