//! dlb: a distributed load balancer built as a Rust gRPC microservice mesh.
//!
//! This root package holds the library every dlb service links (below) and the `dlb` CLI (the
//! binary, `src/cli/`). The layering: services use only this library; the library never uses
//! the CLI; nothing but the binary uses the CLI's modules (`up`, `suite`, the certificate
//! commands, its process handling and report printing), so changing them rebuilds the `dlb`
//! binary alone.
//!
//! - [`proto`]: the generated `dlb.v1` protobuf and gRPC code, plus the descriptor set that every
//!   server registers for reflection.
//! - [`deadline`]: `grpc-timeout` and the margin servers keep back from it.
//! - [`dial`]: how every client dials: user-given addresses (`127.0.0.1:13001`,
//!   `http://host:port`), TLS, HTTP/2 windows.
//! - [`metadata`]: the response metadata keys that make up part of the public contract.
//! - [`events`]: the centralized event log in Redis (writer and reader).
//! - [`health`]: the server side of `grpc.health.v1.Health`, whose `Watch` streams end when a
//!   server drains (the gateway's `monitor` is the client side).
//! - [`server`]: reflection and the shutdown signal every server shares.
//! - [`status`]: the exact gRPC statuses every server answers where tonic's are wrong or mute.
//! - [`procfs`]: a process's CPU time and memory, from `/proc`.
//! - [`registry`]: the Redis registry where instances announce themselves (`--register`) and
//!   gateways find them (`--discover`).
//! - [`tls`]: certificates, mutual TLS for servers and clients, and the hints for TLS errors.
//! - [`telemetry`]: the tracing subscriber that binaries install.
//! - [`trace`]: distributed tracing: W3C Trace Context, spans, the OTLP/gRPC exporter.
//! - `testing` (feature `test-fixtures`, for tests only): a private `redis-server`.
//! - [`client`]: one call and the load generator, as `dlb call`, `dlb bench`, the dashboard and
//!   tests send them.

pub mod authz;
pub mod client;
pub mod deadline;
mod decimal;
pub mod dial;
pub mod events;
pub mod health;
pub mod metadata;
pub mod procfs;
pub mod registry;
pub mod server;
pub mod status;
pub mod telemetry;
#[cfg(feature = "test-fixtures")]
pub mod testing;
pub mod tls;
pub mod trace;

/// Generated protobuf and gRPC code for package `dlb.v1`.
pub mod proto {
    /// `dlb.v1`: the operations API and load reporting.
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1 {
        tonic::include_proto!("dlb.v1");
    }

    /// Serialized `FileDescriptorSet` of every dlb proto, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dlb_descriptor");
}

/// Every dlb process allocates with mimalloc (version 2, transparent huge pages off). glibc's
/// allocator gave the top of its heap back to the kernel whenever a large message's buffers
/// were freed and faulted it back in, page by page, for the next one: about 100 page faults
/// per 1 MiB call in the gateway, whose CPU time per such call fell from 1.9 ms to 1.1 ms with
/// mimalloc. Huge pages off and version 2 keep the resident size close to glibc's (27 MB
/// against 23.5 MB for a gateway with 1,024 calls in flight; mimalloc 3 took 30-37 MB, with
/// huge pages 47-49 MB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
