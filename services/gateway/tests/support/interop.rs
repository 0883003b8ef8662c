//! gRPC client stacks nobody here wrote, driven from the tests: Python grpcio (C-core), Node
//! @grpc/grpc-js and grpc-go (grpcurl), with tonic beside them. Each makes the same calls with
//! raw message bytes (Python and Node through `tests/interop/grpc_peer.{py,js}`), so one list
//! of cases runs on every stack, and reports what its caller saw: the status code's name, the
//! message, the answer and the metadata.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BufMut};
use tokio::io::AsyncWriteExt;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on one stack's whole run of a case list.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// One call, as every stack makes it.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// Names the case in failures.
    pub name: &'static str,
    /// The method's path, `/package.Service/Method`.
    pub method: String,
    /// The request message, encoded.
    pub request: Vec<u8>,
    /// The request as JSON, for grpcurl (which encodes it from reflection); without it,
    /// grpcurl skips this call.
    pub json: Option<String>,
    /// Request metadata (a `-bin` key's value is raw bytes in hex).
    pub metadata: Vec<(String, String)>,
    /// The call's deadline.
    pub timeout: Option<Duration>,
    /// Send the request gzip-compressed.
    pub gzip: bool,
    /// Cancel the call this long after it starts.
    pub cancel_after: Option<Duration>,
}

impl Call {
    /// A call of `method` with `request` (and its JSON form for grpcurl).
    pub fn new(name: &'static str, method: &str, request: Vec<u8>, json: Option<&str>) -> Self {
        Self {
            name,
            method: method.to_owned(),
            request,
            json: json.map(str::to_owned),
            ..Self::default()
        }
    }
}

/// What the caller saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The status code's name (`OK`, `INVALID_ARGUMENT`, ...).
    pub code: String,
    /// The status message, decoded.
    pub message: String,
    /// The answer: the message bytes, or with grpcurl its JSON text.
    pub response: Vec<u8>,
    /// Initial metadata (response headers), `-bin` values in hex.
    pub initial: Vec<(String, String)>,
    /// Trailing metadata (trailers), `-bin` values in hex.
    pub trailing: Vec<(String, String)>,
}

impl Outcome {
    /// The value of `key` in the initial or the trailing metadata (a Trailers-Only answer has
    /// only the latter, and stacks differ in where they show it).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.initial
            .iter()
            .chain(&self.trailing)
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A client stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// Python grpcio (C-core).
    Python,
    /// Node @grpc/grpc-js (pure JavaScript).
    Node,
    /// grpc-go, as grpcurl 1.8.6.
    Grpcurl,
    /// tonic, dlb's own.
    Tonic,
}

impl Stack {
    /// Every stack.
    pub const ALL: [Stack; 4] = [Stack::Python, Stack::Node, Stack::Grpcurl, Stack::Tonic];

    /// Whether this stack can make `call`: grpcurl needs the JSON form and a method that
    /// reflection knows, cannot compress or cancel, and has no deadline apart from its
    /// `-max-time`, which bounds its connection and reflection too.
    pub fn can_make(self, call: &Call) -> bool {
        self != Stack::Grpcurl
            || (call.json.is_some()
                && !call.gzip
                && call.cancel_after.is_none()
                && call.timeout.is_none())
    }

    /// Makes `calls` one after the other on one channel to `target` (`HOST:PORT`, plaintext),
    /// each that this stack can make (see [`Stack::can_make`]), in order.
    pub async fn run(self, target: &str, calls: &[Call]) -> Vec<(Call, Outcome)> {
        let calls: Vec<Call> = calls.iter().filter(|c| self.can_make(c)).cloned().collect();
        let outcomes = tokio::time::timeout(RUN_LIMIT, async {
            match self {
                Stack::Python => {
                    let python = workspace_file(".venv/bin/python");
                    let script = workspace_file("tests/interop/grpc_peer.py");
                    driven(
                        python,
                        &[script.into_os_string(), "client".into()],
                        target,
                        &calls,
                    )
                    .await
                }
                Stack::Node => {
                    let script = workspace_file("tests/interop/grpc_peer.js");
                    driven(
                        PathBuf::from("node"),
                        &[script.into_os_string()],
                        target,
                        &calls,
                    )
                    .await
                }
                Stack::Grpcurl => {
                    let mut outcomes = Vec::new();
                    for call in &calls {
                        outcomes.push(grpcurl(target, call).await);
                    }
                    outcomes
                }
                Stack::Tonic => {
                    let channel = Channel::from_shared(format!("http://{target}"))
                        .expect("target")
                        .connect_lazy();
                    let mut outcomes = Vec::new();
                    for call in &calls {
                        outcomes.push(tonic_call(channel.clone(), call).await);
                    }
                    outcomes
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{self:?} ran {} calls for over {RUN_LIMIT:?}", calls.len()));
        assert_eq!(outcomes.len(), calls.len(), "{self:?}: an outcome per call");
        calls.into_iter().zip(outcomes).collect()
    }
}

/// A file of the workspace (the interop scripts and their `.venv`).
pub fn workspace_file(relative: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative);
    assert!(
        path.exists(),
        "{} is missing: install the client stacks as .ci/run does \
         (.venv/bin/pip install grpcio grpcio-health-checking; npm ci --prefix tests/interop)",
        path.display()
    );
    path
}

/// Runs a peer script as a client: the plan on its stdin, one JSON outcome per line out.
async fn driven(
    program: PathBuf,
    args: &[std::ffi::OsString],
    target: &str,
    calls: &[Call],
) -> Vec<Outcome> {
    let cases: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "method": c.method,
                "request": hex(&c.request),
                "metadata": c.metadata,
                "timeout_ms": c.timeout.map(|t| t.as_millis() as u64),
                "compression": c.gzip.then_some("gzip"),
                "cancel_after_ms": c.cancel_after.map(|t| t.as_millis() as u64),
            })
        })
        .collect();
    let plan = serde_json::json!({ "target": target, "cases": cases }).to_string();
    let mut child = tokio::process::Command::new(&program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(plan.as_bytes()).await.expect("write plan");
    drop(stdin);
    let output = child.wait_with_output().await.expect("peer output");
    assert!(
        output.status.success(),
        "{} failed: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("an outcome line");
            let pairs = |key: &str| -> Vec<(String, String)> {
                serde_json::from_value(v[key].clone()).unwrap_or_default()
            };
            Outcome {
                code: v["code"].as_str().unwrap_or_default().to_owned(),
                message: v["message"].as_str().unwrap_or_default().to_owned(),
                response: unhex(v["response"].as_str().unwrap_or_default()),
                initial: pairs("initial_metadata"),
                trailing: pairs("trailing_metadata"),
            }
        })
        .collect()
}

/// One call with grpcurl (`-v`, the request on stdin), read from its report.
async fn grpcurl(target: &str, call: &Call) -> Outcome {
    let mut command = tokio::process::Command::new(dlb::testing::grpcurl());
    command.args(["-plaintext", "-v", "-d", "@"]);
    for (key, value) in &call.metadata {
        let value = if key.ends_with("-bin") {
            // grpcurl takes -bin values base64-encoded.
            base64(&unhex(value))
        } else {
            value.clone()
        };
        command.args(["-H", &format!("{key}: {value}")]);
    }
    let mut child = command
        .arg(target)
        .arg(call.method.trim_start_matches('/'))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run grpcurl");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let json = call.json.clone().unwrap_or_default();
    stdin
        .write_all(json.as_bytes())
        .await
        .expect("write request");
    drop(stdin);
    let output = child.wait_with_output().await.expect("grpcurl output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut outcome = Outcome {
        code: "OK".to_owned(),
        ..Outcome::default()
    };
    let mut section = "";
    for line in stdout.lines() {
        match line {
            "Response headers received:" => section = "headers",
            "Response trailers received:" => section = "trailers",
            "Response contents:" => section = "contents",
            "" => {
                section = if section == "contents" {
                    "contents"
                } else {
                    ""
                }
            }
            _ if line.starts_with("Sent ") => section = "",
            _ => match section {
                "headers" | "trailers" => {
                    if let Some((k, v)) = line.split_once(": ") {
                        let v = if k.ends_with("-bin") {
                            hex(&unbase64(v))
                        } else {
                            v.to_owned()
                        };
                        let list = if section == "headers" {
                            &mut outcome.initial
                        } else {
                            &mut outcome.trailing
                        };
                        list.push((k.to_owned(), v));
                    }
                }
                "contents" => {
                    outcome.response.extend_from_slice(line.as_bytes());
                    outcome.response.push(b'\n');
                }
                _ => {}
            },
        }
    }
    if !output.status.success() {
        // ERROR:\n  Code: InvalidArgument\n  Message: ...
        let field = |name: &str| {
            stderr
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(str::to_owned))
        };
        match field("Code: ") {
            Some(code) => {
                outcome.code = screaming(&code);
                outcome.message = field("Message: ").unwrap_or_default();
            }
            // Its words for a connection refused, before any call.
            None if stderr.contains("Failed to dial target host") => {
                outcome.code = "UNAVAILABLE".to_owned();
                outcome.message = stderr.trim().to_owned();
            }
            None => panic!("grpcurl failed: {stderr}"),
        }
    }
    outcome
}

/// `InvalidArgument` -> `INVALID_ARGUMENT`.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// One call with tonic, the message as raw bytes. A cancel is the call dropped (tonic has no
/// cancel of its own; dropping sends RST_STREAM CANCEL), reported as CANCELLED.
async fn tonic_call(channel: Channel, call: &Call) -> Outcome {
    let mut grpc = tonic::client::Grpc::new(channel);
    if call.gzip {
        grpc = grpc
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip);
    }
    let mut request = tonic::Request::new(call.request.clone());
    for (key, value) in &call.metadata {
        if key.ends_with("-bin") {
            let key = tonic::metadata::BinaryMetadataKey::from_bytes(key.as_bytes()).expect("key");
            request.metadata_mut().insert_bin(
                key,
                tonic::metadata::BinaryMetadataValue::from_bytes(&unhex(value)),
            );
        } else {
            let key = tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes()).expect("key");
            request
                .metadata_mut()
                .insert(key, value.parse().expect("an ASCII value"));
        }
    }
    if let Some(timeout) = call.timeout {
        request.set_timeout(timeout);
    }
    let path: tonic::codegen::http::uri::PathAndQuery = call.method.parse().expect("a path");
    let made = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(request, path, RawCodec).await
    };
    let result = match call.cancel_after {
        Some(after) => match tokio::time::timeout(after, made).await {
            Ok(result) => result,
            Err(_) => Err(Status::cancelled("dropped by the test")),
        },
        None => made.await,
    };
    match result {
        Ok(response) => Outcome {
            code: "OK".to_owned(),
            initial: metadata_pairs(response.metadata()),
            response: response.into_inner(),
            ..Outcome::default()
        },
        Err(status) => {
            let mut trailing = metadata_pairs(status.metadata());
            if !status.details().is_empty() {
                trailing.push(("grpc-status-details-bin".to_owned(), hex(status.details())));
            }
            Outcome {
                code: code_name(status.code()),
                message: status.message().to_owned(),
                trailing,
                ..Outcome::default()
            }
        }
    }
}

fn metadata_pairs(metadata: &tonic::metadata::MetadataMap) -> Vec<(String, String)> {
    metadata
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.to_string(), v.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) => {
                Some((k.to_string(), hex(&v.to_bytes().ok()?)))
            }
        })
        .collect()
}

/// The protocol's name of `code` (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> String {
    dlb::status::code_name(code).to_owned()
}

/// Messages as raw bytes, for tonic's generic client.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut message = vec![0; src.remaining()];
        src.copy_to_slice(&mut message);
        Ok(Some(message))
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower- or upper-case hex text.
pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let Some(value) = BASE64.iter().position(|b| *b == c) else {
            continue;
        };
        acc = acc << 6 | value as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A script of `tests/interop` run by the workspace's `.venv` Python: its stdin, and its
/// stdout line by line (read by a thread, so it never blocks on a full pipe). Killed on drop.
pub struct PythonScript {
    pub stdin: std::process::ChildStdin,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub child: dlb::testing::KillOnDrop,
}

impl PythonScript {
    /// Starts `tests/interop/SCRIPT ARGS...`.
    pub fn start(script: &str, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(workspace_file(".venv/bin/python"))
            .arg(workspace_file(&format!("tests/interop/{script}")))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{script} (needs .venv, see .ci/run): {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            stdin,
            lines,
            child: dlb::testing::KillOnDrop(child),
        }
    }

    /// The address its first line ends with ("... listening on 127.0.0.1:PORT").
    pub fn listening_addr(&self) -> String {
        let first = self
            .lines
            .recv_timeout(dlb::testing::PATIENCE)
            .expect("its listening line");
        first.rsplit(' ').next().expect("an address").to_owned()
    }
}
