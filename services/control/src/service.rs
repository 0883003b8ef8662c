//! `ControlService`: `dlb.v1.Control` over the [`Supervisor`], and the one mapping of its errors
//! to gRPC status.

use std::pin::Pin;

use dlb::proto::v1::{
    AddInstanceRequest, Instance, InstanceList, InstanceRequest, ListInstancesRequest,
    RemoveInstanceResponse, StopInstanceRequest, WatchInstancesRequest, control_server::Control,
};
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::supervisor::{ControlError, Supervisor};

impl From<ControlError> for Status {
    fn from(error: ControlError) -> Self {
        match &error {
            ControlError::NotFound { .. } => Status::not_found(error.to_string()),
            ControlError::Busy { .. } => Status::failed_precondition(error.to_string()),
            ControlError::StartFailed { .. } => Status::unavailable(error.to_string()),
        }
    }
}

/// Implements `dlb.v1.Control`. `WatchInstances` streams end when `closing` fires.
#[derive(Debug, Clone)]
pub struct ControlService {
    /// The supervisor.
    pub supervisor: Supervisor,
    /// Fired when control shuts down.
    pub closing: tokio_util::sync::CancellationToken,
}

fn id(request: Request<InstanceRequest>) -> Result<String, Status> {
    let id = request.into_inner().id;
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "id must name an instance (ListInstances shows them)",
        ));
    }
    Ok(id)
}

type WatchInstancesStream = Pin<Box<dyn Stream<Item = Result<InstanceList, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn list_instances(
        &self,
        _request: Request<ListInstancesRequest>,
    ) -> Result<Response<InstanceList>, Status> {
        Ok(Response::new(self.supervisor.list().await))
    }

    type WatchInstancesStream = WatchInstancesStream;

    async fn watch_instances(
        &self,
        _request: Request<WatchInstancesRequest>,
    ) -> Result<Response<Self::WatchInstancesStream>, Status> {
        let stream =
            tokio_stream::StreamExt::map(WatchStream::new(self.supervisor.subscribe()), Ok);
        Ok(Response::new(Box::pin(dlb::server::until_cancelled(
            stream,
            self.closing.clone(),
        ))))
    }

    async fn start_instance(
        &self,
        request: Request<InstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        Ok(Response::new(self.supervisor.start(&id(request)?).await?))
    }

    async fn stop_instance(
        &self,
        request: Request<StopInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let StopInstanceRequest { id, force } = request.into_inner();
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "id must name an instance (ListInstances shows them)",
            ));
        }
        Ok(Response::new(self.supervisor.stop(&id, force).await?))
    }

    async fn add_instance(
        &self,
        _request: Request<AddInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        Ok(Response::new(self.supervisor.add().await?))
    }

    async fn remove_instance(
        &self,
        request: Request<InstanceRequest>,
    ) -> Result<Response<RemoveInstanceResponse>, Status> {
        self.supervisor.remove(&id(request)?).await?;
        Ok(Response::new(RemoveInstanceResponse {}))
    }
}
