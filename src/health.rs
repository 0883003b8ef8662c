//! `grpc.health.v1.Health` for every dlb server, with one difference from tonic-health's:
//! [`HealthState::close`] ends every open `Watch` stream. A draining server calls it so that
//! HTTP/2's graceful close is not held open by watchers, and watchers (the gateway) see the
//! stream end and reconnect to whatever serves that address next.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The serving status of a server and the services it names. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthState {
    status: Arc<watch::Sender<ServingStatus>>,
    /// Each service's own status: what it says unless the server is NOT_SERVING as a whole.
    services: Arc<std::collections::BTreeMap<String, watch::Sender<ServingStatus>>>,
    closing: CancellationToken,
}

impl HealthState {
    /// A state answering for the server ("") and for each of `services`, starting SERVING.
    pub fn new(services: &[&str]) -> Self {
        let (status, _) = watch::channel(ServingStatus::Serving);
        Self {
            status: Arc::new(status),
            services: Arc::new(
                services
                    .iter()
                    .map(|s| ((*s).to_owned(), watch::channel(ServingStatus::Serving).0))
                    .collect(),
            ),
            closing: CancellationToken::new(),
        }
    }

    /// Sets the status; watchers see the change.
    pub fn set(&self, status: ServingStatus) {
        self.status.send_replace(status);
    }

    /// The status now.
    pub fn get(&self) -> ServingStatus {
        *self.status.borrow()
    }

    /// Sets one service's own status (the gateway's, by whether its pool has an instance
    /// serving); a service not named at [`HealthState::new`] is ignored.
    pub fn set_service(&self, service: &str, status: ServingStatus) {
        if let Some(own) = self.services.get(service) {
            own.send_if_modified(|now| std::mem::replace(now, status) != status);
        }
    }

    /// What a check of `service` answers: NOT_SERVING while the server is, else its own.
    fn status_of(&self, service: &str) -> ServingStatus {
        let server = self.get();
        match self.services.get(service) {
            Some(own) if server == ServingStatus::Serving => *own.borrow(),
            _ => server,
        }
    }

    /// Ends every `Watch` stream, now and from now on.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// The gRPC service.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService(self.clone()))
    }

    fn knows(&self, service: &str) -> bool {
        service.is_empty() || self.services.contains_key(service)
    }
}

/// Implements `grpc.health.v1.Health` over a [`HealthState`].
#[derive(Debug, Clone)]
pub struct HealthService(HealthState);

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !self.0.knows(&service) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        Ok(Response::new(HealthCheckResponse {
            status: self.0.status_of(&service).into(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        if !self.0.knows(&service) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        // Either status changing may change the answer.
        let server = tokio_stream::wrappers::WatchStream::new(self.0.status.subscribe());
        let own = match self.0.services.get(&service) {
            Some(own) => tokio_stream::wrappers::WatchStream::new(own.subscribe()),
            None => tokio_stream::wrappers::WatchStream::new(self.0.status.subscribe()),
        };
        let state = self.0.clone();
        let mut last = None;
        let changes = server.merge(own.skip(1)).filter_map(move |_| {
            let status = state.status_of(&service);
            (last.replace(status) != Some(status)).then_some(Ok(HealthCheckResponse {
                status: status.into(),
            }))
        });
        Ok(Response::new(Box::pin(crate::server::until_cancelled(
            changes,
            self.0.closing.clone(),
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watch_sees_changes_and_ends_on_close() {
        let state = HealthState::new(&["dlb.v1.Operations"]);
        let service = HealthService(state.clone());
        let mut stream = service
            .watch(Request::new(HealthCheckRequest {
                service: "dlb.v1.Operations".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        state.set(ServingStatus::NotServing);
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.status(), ServingStatus::NotServing);
        state.set(ServingStatus::Serving);
        assert_eq!(
            stream.next().await.unwrap().unwrap().status(),
            ServingStatus::Serving
        );
        // A service's own status shows, unless the whole server is not serving.
        state.set_service("dlb.v1.Operations", ServingStatus::NotServing);
        assert_eq!(
            stream.next().await.unwrap().unwrap().status(),
            ServingStatus::NotServing
        );
        let whole = service
            .check(Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(whole.status(), ServingStatus::Serving);
        state.close();
        assert!(stream.next().await.is_none());
        let unknown = service
            .check(Request::new(HealthCheckRequest {
                service: "nope".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }
}
