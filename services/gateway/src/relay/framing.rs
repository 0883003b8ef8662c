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

/// What [`MessageCounter::feed`] found.
pub(super) enum Counted {
    /// The bytes are well framed so far.
    Ok,
    /// A message is over the limit, or a prefix breaks the protocol: the caller's fault.
    Refused(Status),
}

/// Follows a stream of gRPC messages through their 5-byte prefixes, as the bytes pass in
/// whatever pieces they come: counts the messages and checks each prefix (the flag, and the
/// length against the limit) without holding or decoding anything.
#[derive(Debug)]
pub(super) struct MessageCounter {
    limit: usize,
    compressed_ok: bool,
    /// The prefix being read, and how much of it came.
    prefix: [u8; FRAME_HEADER],
    have: usize,
    /// Bytes of the current message still to come (after its prefix).
    remaining: usize,
    messages: u64,
}

impl MessageCounter {
    pub(super) fn new(limit: usize, compressed_ok: bool) -> Self {
        Self {
            limit,
            compressed_ok,
            prefix: [0; FRAME_HEADER],
            have: 0,
            remaining: 0,
            messages: 0,
        }
    }

    /// Messages whose prefix has passed.
    pub(super) fn count(&self) -> u64 {
        self.messages
    }

    pub(super) fn feed(&mut self, mut data: &[u8]) -> Counted {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < FRAME_HEADER {
                break;
            }
            self.have = 0;
            match self.prefix[0] {
                0 => {}
                1 if self.compressed_ok => {}
                1 => {
                    return Counted::Refused(Status::internal(
                        "protocol error: received message with compressed-flag but no \
                         grpc-encoding was specified",
                    ));
                }
                flag => {
                    return Counted::Refused(Status::internal(format!(
                        "protocol error: received message with invalid compression flag: \
                         {flag} (valid flags are 0 and 1)"
                    )));
                }
            }
            let p = &self.prefix;
            let length = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
            if length > self.limit {
                return Counted::Refused(oversize(length, self.limit));
            }
            self.messages += 1;
            self.remaining = length;
        }
        Counted::Ok
    }

    /// The stream ended: it must not end inside a message.
    pub(super) fn finish(&self) -> Result<(), Status> {
        if self.have > 0 || self.remaining > 0 {
            return Err(Status::internal(format!(
                "the request ended inside a gRPC message ({} byte(s) of it missing)",
                if self.have > 0 {
                    FRAME_HEADER - self.have
                } else {
                    self.remaining
                }
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn messages_are_counted_in_any_split_and_checked() {
        let mut stream = framed(0, b"hello");
        stream.extend(framed(0, b""));
        stream.extend(framed(0, &[7; 300]));
        // Every way of cutting the bytes in two counts three messages.
        for cut in 0..=stream.len() {
            let mut counter = MessageCounter::new(1024, false);
            assert!(matches!(counter.feed(&stream[..cut]), Counted::Ok));
            assert!(matches!(counter.feed(&stream[cut..]), Counted::Ok));
            assert_eq!(counter.count(), 3, "cut at {cut}");
            assert!(counter.finish().is_ok());
        }
        let mut counter = MessageCounter::new(100, false);
        assert!(
            matches!(counter.feed(&framed(0, &[1; 101])), Counted::Refused(s) if s.code() == tonic::Code::ResourceExhausted)
        );
        let mut counter = MessageCounter::new(100, false);
        assert!(
            matches!(counter.feed(&framed(1, b"x")), Counted::Refused(s) if s.code() == tonic::Code::Internal)
        );
        let mut counter = MessageCounter::new(100, true);
        assert!(matches!(counter.feed(&framed(1, b"x")), Counted::Ok));
        let mut counter = MessageCounter::new(100, false);
        assert!(matches!(counter.feed(&framed(0, b"abc")[..6]), Counted::Ok));
        assert!(counter.finish().is_err());
    }
}
