//! The way to the runner: one endpoint per runner URL (TLS for https),
//! and the bearer token on every call.

use std::time::Duration;

use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::BuilderError;
use crate::config::BuilderConfig;

/// The client of the runner's service, every call carrying the token.
pub type Client = RunnerServiceClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Auth {
    /// The token from `HYDRA_BUILDER_TOKEN`, else from `token_file`.
    pub fn from_config(config: &BuilderConfig) -> Result<Auth, BuilderError> {
        let token = match std::env::var("HYDRA_BUILDER_TOKEN") {
            Ok(t) => Some(t),
            Err(_) => match &config.token_file {
                Some(path) => Some(read(path).map(|b| String::from_utf8_lossy(&b).into_owned())?),
                None => None,
            },
        };
        let value = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| BuilderError::BadToken("not ASCII".into()))
            })
            .transpose()?;
        Ok(Auth(value))
    }
}

pub(crate) fn read(path: &std::path::Path) -> Result<Vec<u8>, BuilderError> {
    std::fs::read(path).map_err(|source| BuilderError::File {
        path: path.to_owned(),
        source,
    })
}

/// One endpoint per runner URL, with TLS when the URL is https. Bad URLs
/// and unreadable TLS files end the builder at once.
pub fn endpoints(config: &BuilderConfig) -> Result<Vec<Endpoint>, BuilderError> {
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &config.tls_ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    config
        .urls()
        .into_iter()
        .map(|url| {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|source| BuilderError::BadUrl {
                    url: url.clone(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20));
            if url.starts_with("https://") {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|source| BuilderError::Tls { url, source })?;
            }
            Ok(endpoint)
        })
        .collect()
}

/// An error with its causes, for a log line that says what went wrong
/// (a TLS handshake failure sits several sources deep).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
