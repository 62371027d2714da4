//! The client API (`hydra.client.v1`), for services that submit builds and
//! for the operator CLI. It is served on its own address (`client_listen`,
//! with TLS of its own), with gRPC health and reflection ([`crate::server`]).
//!
//! Each call is a thin adapter onto one of:
//! - [`builds`]: the writes (submit, supersede, cancel, restart, bump),
//!   which go through PostgreSQL and Hydra's notifications exactly as
//!   Hydra's own front end does, so the queue monitor applies them;
//! - [`query`]: build status, per-step counters and listings;
//! - [`follow`]: the streams (events, logs);
//! - [`cluster`]: queues, machines, drain, and why a step is not running.
//!
//! A database error here fails the call (`UNAVAILABLE`), not the runner:
//! the database watchdog is what stops a runner whose database is gone.

pub mod access;
pub mod builds;
pub mod cluster;
pub mod follow;
pub mod priority;
pub mod query;

use std::pin::Pin;
use std::sync::Arc;

use hydra_proto::client::client_service_server::{ClientService, ClientServiceServer};
use hydra_proto::client::*;
use thiserror::Error;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::store::StoreError;
use access::Principal;

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The request is wrong: the message says how.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Logs(#[from] crate::logs::LogError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(msg),
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::Store(s) if !s.is_infrastructure() => Status::invalid_argument(msg),
            // The database refused what the request carried (a NUL byte, a
            // value out of range, a constraint): the request is wrong.
            ApiError::Database(d) if hydra_db::is_data_error(&d) => Status::invalid_argument(
                crate::outside::display_text(&msg, crate::outside::DISPLAY_MAX),
            ),
            ApiError::Database(_) | ApiError::Store(_) => Status::unavailable(msg),
            ApiError::Logs(_) => Status::internal(msg),
        }
    }
}

/// A build id from the wire (uint64) as Hydra's (integer).
pub(crate) fn build_id(id: u64) -> Result<i32, ApiError> {
    i32::try_from(id)
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| ApiError::Invalid(format!("{id} is not a build id")))
}

pub(crate) fn build_ids(ids: &[u64]) -> Result<Vec<i32>, ApiError> {
    ids.iter().map(|i| build_id(*i)).collect()
}

pub struct ClientApi {
    shared: Arc<Shared>,
}

/// The client service, with its token check, for the runner's gRPC server.
pub fn service(
    shared: Arc<Shared>,
) -> tonic::service::interceptor::InterceptedService<
    ClientServiceServer<ClientApi>,
    impl tonic::service::Interceptor + Clone,
> {
    let tokens = shared.clone();
    let server = ClientServiceServer::new(ClientApi { shared }).max_decoding_message_size(64 << 20);
    tonic::service::interceptor::InterceptedService::new(server, move |mut request: Request<()>| {
        let token = crate::auth::bearer(&request);
        let principal = tokens
            .client_tokens
            .read()
            .identify(token)
            .inspect_err(|status| {
                let from = request.remote_addr();
                tracing::warn!(?from, "refused a client call: {}", status.message());
            })?;
        request.extensions_mut().insert(principal);
        Ok(request)
    })
}

/// The caller the interceptor identified.
fn caller<T>(r: &Request<T>) -> Result<Principal, Status> {
    r.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("the call was not identified"))
}

/// Logs a refusal by the roles and hands it on.
fn refused(p: &Principal, status: Status) -> Status {
    tracing::warn!(token = %p.name, "refused a client call: {}", status.message());
    status
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ClientService for ClientApi {
    async fn submit(&self, r: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        let p = caller(&r)?;
        p.may_submit(&r.get_ref().tenant)
            .map_err(|s| refused(&p, s))?;
        Ok(Response::new(
            builds::submit(&self.shared, r.into_inner()).await?,
        ))
    }

    async fn get_build(&self, r: Request<GetBuildRequest>) -> Result<Response<BuildInfo>, Status> {
        let p = caller(&r)?;
        let id = build_id(r.into_inner().build_id)?;
        access::check_builds(&self.shared, &p, &[id])
            .await
            .map_err(|s| refused(&p, s))?;
        Ok(Response::new(query::get_build(&self.shared, id).await?))
    }

    async fn cancel(&self, r: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let p = caller(&r)?;
        p.may_change("cancel").map_err(|s| refused(&p, s))?;
        let ids = build_ids(&r.get_ref().build_ids)?;
        access::check_builds(&self.shared, &p, &ids)
            .await
            .map_err(|s| refused(&p, s))?;
        Ok(Response::new(
            builds::cancel(&self.shared, r.into_inner()).await?,
        ))
    }

    async fn restart(
        &self,
        r: Request<RestartRequest>,
    ) -> Result<Response<RestartResponse>, Status> {
        let p = caller(&r)?;
        p.may_operate("restart").map_err(|s| refused(&p, s))?;
        Ok(Response::new(
            builds::restart(&self.shared, r.into_inner()).await?,
        ))
    }

    async fn bump(&self, r: Request<BumpRequest>) -> Result<Response<BumpResponse>, Status> {
        let p = caller(&r)?;
        p.may_operate("bump").map_err(|s| refused(&p, s))?;
        Ok(Response::new(
            builds::bump(&self.shared, r.into_inner()).await?,
        ))
    }

    async fn list_builds(
        &self,
        r: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        let p = caller(&r)?;
        let mut request = r.into_inner();
        if let Some(own) = p.scope() {
            if !request.tenant.is_empty() && request.tenant != own {
                let status = Status::permission_denied(format!(
                    "token {} lists tenant {own}'s builds only",
                    p.name
                ));
                return Err(refused(&p, status));
            }
            request.tenant = own.to_owned();
        }
        Ok(Response::new(
            query::list_builds(&self.shared, request).await?,
        ))
    }

    type GetLogStream = Streamed<LogLines>;

    async fn get_log(
        &self,
        r: Request<GetLogRequest>,
    ) -> Result<Response<Self::GetLogStream>, Status> {
        let p = caller(&r)?;
        let request = r.into_inner();
        if request.drv_path.is_empty() {
            let id = build_id(request.build_id)?;
            access::check_builds(&self.shared, &p, &[id]).await
        } else {
            access::check_drv(&self.shared, &p, &request.drv_path).await
        }
        .map_err(|s| refused(&p, s))?;
        let stream = follow::log(self.shared.clone(), request).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchStream = Streamed<Event>;

    async fn watch(&self, r: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let p = caller(&r)?;
        let request = r.into_inner();
        if request.build_id == 0 {
            p.may_see_all("watch").map_err(|s| refused(&p, s))?;
        } else {
            let id = build_id(request.build_id)?;
            access::check_builds(&self.shared, &p, &[id])
                .await
                .map_err(|s| refused(&p, s))?;
        }
        let stream = follow::events(self.shared.clone(), request)?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(cluster::status(&self.shared).await?))
    }

    async fn machines(
        &self,
        _: Request<MachinesRequest>,
    ) -> Result<Response<MachinesResponse>, Status> {
        Ok(Response::new(cluster::machines(&self.shared)))
    }

    async fn drain(&self, r: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        let p = caller(&r)?;
        p.may_operate("drain").map_err(|s| refused(&p, s))?;
        let name = r.into_inner().machine;
        Ok(Response::new(
            cluster::set_drained(&self.shared, &name, true).await?,
        ))
    }

    async fn undrain(&self, r: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        let p = caller(&r)?;
        p.may_operate("undrain").map_err(|s| refused(&p, s))?;
        let name = r.into_inner().machine;
        Ok(Response::new(
            cluster::set_drained(&self.shared, &name, false).await?,
        ))
    }

    async fn explain(
        &self,
        r: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let p = caller(&r)?;
        let id = build_id(r.get_ref().build_id)?;
        access::check_builds(&self.shared, &p, &[id])
            .await
            .map_err(|s| refused(&p, s))?;
        Ok(Response::new(
            cluster::explain(&self.shared, r.into_inner()).await?,
        ))
    }
}
