//! gRPC framing of the relay: a unary request and an answer read whole as received (their
//! 5-byte prefixes checked, never decoded), with the caller's protocol errors told apart from
//! the instance's.

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;

use super::{Chunks, FRAME_HEADER};
use crate::conn::AnswerBody;

/// Whether the request's `grpc-encoding` allows compressed messages (names anything but
/// identity). Which encodings the instance takes is the instance's to say.
pub(super) fn may_be_compressed(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_some_and(|encoding| encoding != "identity")
}

/// Reads a unary request whole: one gRPC message with its 5-byte prefix, as received. A
/// message over `limit` is refused as soon as its prefix says so, and so is one whose prefix
/// breaks the protocol: the compressed flag without a `grpc-encoding` (INTERNAL, as the gRPC
/// compression spec says), or a flag that is neither 0 nor 1. Such a request is the caller's
/// fault and never reaches an instance, where it would count as the instance's failure.
pub(super) async fn read_request(
    mut body: Body,
    limit: usize,
    compressed_ok: bool,
) -> Result<Chunks, Status> {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut total = 0usize;
    let mut declared: Option<usize> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| Status::cancelled(format!("the request ended early: {}", e.message())))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len();
        chunks.push(data);
        if declared.is_none() && total >= FRAME_HEADER {
            let mut prefix = [0u8; FRAME_HEADER];
            copy_prefix(&chunks, &mut prefix);
            match prefix[0] {
                0 => {}
                1 if compressed_ok => {}
                1 => {
                    return Err(Status::internal(
                        "protocol error: received message with compressed-flag but no \
                         grpc-encoding was specified",
                    ));
                }
                flag => {
                    return Err(Status::internal(format!(
                        "protocol error: received message with invalid compression flag: \
                         {flag} (valid flags are 0 and 1)"
                    )));
                }
            }
            let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if length > limit {
                return Err(oversize(length, limit));
            }
            declared = Some(length);
        }
        if total > FRAME_HEADER + limit {
            return Err(oversize(total - FRAME_HEADER, limit));
        }
    }
    let Some(length) = declared else {
        return Err(Status::internal(format!(
            "the request carries no gRPC message ({total} bytes, a message takes at least 5)"
        )));
    };
    if total != FRAME_HEADER + length {
        return Err(Status::internal(format!(
            "the request is not one gRPC message: {length} bytes announced, {} received",
            total - FRAME_HEADER
        )));
    }
    Ok(chunks)
}

pub(super) fn oversize(found: usize, limit: usize) -> Status {
    Status::resource_exhausted(dlb::status::oversize_message(found, limit))
}

pub(super) fn copy_prefix(chunks: &[Bytes], out: &mut [u8]) {
    let mut filled = 0;
    for chunk in chunks {
        let n = chunk.len().min(out.len() - filled);
        out[filled..filled + n].copy_from_slice(&chunk[..n]);
        filled += n;
        if filled == out.len() {
            return;
        }
    }
}

/// Why an answer could not be read.
pub(super) enum ReadAnswerError {
    /// Over the limit.
    TooLarge,
    /// The stream or connection failed: below gRPC.
    Failed(String),
}

/// Reads an instance's answer whole: its data and its trailers. Any failure is below gRPC.
pub(super) async fn read_answer(
    mut body: AnswerBody,
    limit: usize,
) -> Result<(Chunks, Option<http::HeaderMap>), ReadAnswerError> {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut total = 0usize;
    while let Some(data) = body.data().await {
        let data =
            data.map_err(|e| ReadAnswerError::Failed(dlb::status::error_chain(e.as_ref())))?;
        total += data.len();
        if total > limit {
            return Err(ReadAnswerError::TooLarge);
        }
        chunks.push(data);
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| ReadAnswerError::Failed(dlb::status::error_chain(e.as_ref())))?;
    Ok((chunks, trailers))
}
