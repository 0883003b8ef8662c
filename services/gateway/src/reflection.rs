//! `grpc.reflection` at the gateway: what the gateway serves itself and what its instances
//! serve, as one server. `ListServices` is the union of the gateway's own services and those of
//! one serving instance of each pool; any other request (a file by name, the file of a symbol
//! or of an extension) is answered by the gateway when it knows it, else by a serving instance
//! of the pool its symbol routes to, then of the other pools, the first that knows it. Each
//! reflection stream keeps one stream open to each instance it asked. Served as v1 and as
//! v1alpha (the same messages on the wire, so v1alpha is converted through their bytes).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::server_reflection_server::ServerReflection;
use tonic_reflection::pb::v1::{
    ListServiceResponse, ServerReflectionRequest, ServerReflectionResponse, ServiceResponse,
};
use tonic_reflection::pb::v1alpha;
use tower::util::BoxCloneSyncService;

use crate::endpoint::State;
use crate::relay::GatewayService;

/// The gateway's own reflection, called in-process.
pub type Local = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    std::convert::Infallible,
>;

/// Reflection over the gateway and its instances. Cheap to clone.
#[derive(Clone)]
pub struct GatewayReflection {
    local: Local,
    service: GatewayService,
    tls: Option<dlb::tls::ClientTls>,
}

impl std::fmt::Debug for GatewayReflection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayReflection").finish_non_exhaustive()
    }
}

/// Who answers a request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// The gateway itself.
    Local,
    /// An instance, by address.
    Instance(String),
}

/// A reflection stream open to one target.
struct Open {
    send: mpsc::Sender<ServerReflectionRequest>,
    answers: Answers,
}

type Answers = Pin<Box<dyn Stream<Item = Result<ServerReflectionResponse, Status>> + Send>>;

impl GatewayReflection {
    /// Reflection answering from `local` first, then from `service`'s pools.
    pub fn new(local: Local, service: GatewayService, tls: Option<dlb::tls::ClientTls>) -> Self {
        Self {
            local,
            service,
            tls,
        }
    }

    /// A serving instance of each pool, the pool `symbol` routes to first (when given).
    fn instances(&self, symbol: Option<&str>) -> Vec<Target> {
        let pools = self.service.pools();
        let mut order: Vec<usize> = Vec::new();
        if let Some(symbol) = symbol {
            // `package.Service`, or `package.Service.Method`, or a message: try the symbol
            // and its parent as a service.
            let parent = symbol.rsplit_once('.').map(|(p, _)| p);
            for name in std::iter::once(symbol).chain(parent) {
                order.push(self.service.pool_index(&format!("/{name}/")));
            }
        }
        order.extend(0..pools.len());
        let mut seen = BTreeSet::new();
        order
            .into_iter()
            .filter(|i| seen.insert(*i))
            .filter_map(|i| {
                pools[i]
                    .table
                    .all()
                    .iter()
                    .find(|e| e.state() == State::Serving)
                    .map(|e| Target::Instance(e.addr.clone()))
            })
            .collect()
    }

    /// Sends `request` to `target` on the stream open to it (opened on first use); its answer,
    /// or `None` when the target cannot answer (unreachable, no reflection).
    async fn ask(
        &self,
        open: &mut BTreeMap<Target, Option<Open>>,
        target: &Target,
        request: &ServerReflectionRequest,
    ) -> Option<ServerReflectionResponse> {
        // A new stream carries the request from its start: some servers (C-core's) answer
        // nothing, not even UNIMPLEMENTED, before a request message arrives.
        let fresh = !open.contains_key(target);
        if fresh {
            let opened = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                self.open(target, request),
            )
            .await
            .ok()
            .flatten();
            open.insert(target.clone(), opened);
        }
        let slot = open.get_mut(target)?;
        let stream = slot.as_mut()?;
        let answered = async {
            use tokio_stream::StreamExt;
            if !fresh {
                stream.send.send(request.clone()).await.ok()?;
            }
            stream.answers.next().await?.ok()
        };
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), answered)
            .await
            .ok()
            .flatten();
        if answer.is_none() {
            // Broken: not asked again on this stream.
            *slot = None;
        }
        answer
    }

    /// Opens a stream to `target` whose first message is `first`.
    async fn open(&self, target: &Target, first: &ServerReflectionRequest) -> Option<Open> {
        use tokio_stream::StreamExt;
        let (send, requests) = mpsc::channel(4);
        send.try_send(first.clone()).ok()?;
        let requests = ReceiverStream::new(requests);
        let channel = match target {
            Target::Local => {
                let answers = ServerReflectionClient::new(self.local.clone())
                    .server_reflection_info(requests)
                    .await
                    .ok()?
                    .into_inner();
                return Some(Open {
                    send,
                    answers: Box::pin(answers),
                });
            }
            Target::Instance(addr) => dlb::dial::endpoint_tls(addr, self.tls.as_ref())
                .ok()?
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect()
                .await
                .ok()?,
        };
        match ServerReflectionClient::new(channel.clone())
            .server_reflection_info(requests)
            .await
        {
            Ok(answers) => Some(Open {
                send,
                answers: Box::pin(answers.into_inner()),
            }),
            // Servers of some stacks (grpcio-reflection) have v1alpha only.
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                let (send, requests) = mpsc::channel::<ServerReflectionRequest>(4);
                send.try_send(first.clone()).ok()?;
                let requests = ReceiverStream::new(requests)
                    .filter_map(|r| convert::<_, v1alpha::ServerReflectionRequest>(&r).ok());
                let answers =
                    v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
                        .server_reflection_info(requests)
                        .await
                        .ok()?
                        .into_inner()
                        .map(|a| a.and_then(|a| convert::<_, ServerReflectionResponse>(&a)));
                Some(Open {
                    send,
                    answers: Box::pin(answers),
                })
            }
            Err(_) => None,
        }
    }

    /// The answer to one request.
    async fn answer(
        &self,
        open: &mut BTreeMap<Target, Option<Open>>,
        request: ServerReflectionRequest,
    ) -> ServerReflectionResponse {
        let symbol = match &request.message_request {
            Some(MessageRequest::ListServices(_)) => {
                return self.list(open, &request).await;
            }
            Some(MessageRequest::FileContainingSymbol(symbol)) => Some(symbol.clone()),
            Some(MessageRequest::FileContainingExtension(extension)) => {
                Some(extension.containing_type.clone())
            }
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => Some(name.clone()),
            Some(MessageRequest::FileByFilename(_)) | None => None,
        };
        let mut targets = vec![Target::Local];
        targets.extend(self.instances(symbol.as_deref()));
        let mut first = None;
        for target in &targets {
            let Some(answer) = self.ask(open, target, &request).await else {
                continue;
            };
            if !matches!(
                answer.message_response,
                Some(MessageResponse::ErrorResponse(_))
            ) {
                return answer;
            }
            first.get_or_insert(answer);
        }
        first.unwrap_or_else(|| ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request.clone()),
            message_response: Some(MessageResponse::ErrorResponse(
                tonic_reflection::pb::v1::ErrorResponse {
                    error_code: tonic::Code::NotFound as i32,
                    error_message: "not found at the gateway or any serving instance".into(),
                },
            )),
        })
    }

    /// Every service of the gateway and of one serving instance of each pool.
    async fn list(
        &self,
        open: &mut BTreeMap<Target, Option<Open>>,
        request: &ServerReflectionRequest,
    ) -> ServerReflectionResponse {
        let mut names = BTreeSet::new();
        let mut targets = vec![Target::Local];
        targets.extend(self.instances(None));
        for target in &targets {
            if let Some(ServerReflectionResponse {
                message_response: Some(MessageResponse::ListServicesResponse(list)),
                ..
            }) = self.ask(open, target, request).await
            {
                names.extend(list.service.into_iter().map(|s| s.name));
            }
        }
        ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request.clone()),
            message_response: Some(MessageResponse::ListServicesResponse(ListServiceResponse {
                service: names
                    .into_iter()
                    .map(|name| ServiceResponse { name })
                    .collect(),
            })),
        }
    }

    /// Serves one reflection stream.
    fn session(
        &self,
        mut requests: impl Stream<Item = Result<ServerReflectionRequest, Status>>
        + Send
        + Unpin
        + 'static,
    ) -> Answers {
        let this = self.clone();
        let (send, answers) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio_stream::StreamExt;
            let mut open = BTreeMap::new();
            while let Some(request) = requests.next().await {
                let answer = match request {
                    Ok(request) => Ok(this.answer(&mut open, request).await),
                    Err(status) => Err(status),
                };
                if send.send(answer).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(answers))
    }
}

#[tonic::async_trait]
impl ServerReflection for GatewayReflection {
    type ServerReflectionInfoStream = Answers;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(self.session(request.into_inner())))
    }
}

/// The same, as `grpc.reflection.v1alpha` (whose messages are v1's, byte for byte).
#[derive(Debug, Clone)]
pub struct GatewayReflectionV1Alpha(pub GatewayReflection);

/// Re-reads a message as its twin of the other version.
fn convert<A: Message, B: Message + Default>(message: &A) -> Result<B, Status> {
    B::decode(message.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("reflection message: {e}")))
}

type AlphaAnswers =
    Pin<Box<dyn Stream<Item = Result<v1alpha::ServerReflectionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for GatewayReflectionV1Alpha {
    type ServerReflectionInfoStream = AlphaAnswers;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        use tokio_stream::StreamExt;
        let requests = request
            .into_inner()
            .map(|r| r.and_then(|r| convert::<_, ServerReflectionRequest>(&r)));
        let answers = self
            .0
            .session(Box::pin(requests))
            .map(|a| a.and_then(|a| convert::<_, v1alpha::ServerReflectionResponse>(&a)));
        Ok(Response::new(Box::pin(answers)))
    }
}
