//! Just enough of WebDriver (W3C) to drive a real headless Chromium through `chromedriver`
//! from `cargo test`: sessions, navigation, clicks, typing, scripts and screenshots, over
//! plain HTTP/1.1 on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The key WebDriver puts element references under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_tool(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|p| p.exists())
}

/// Splits a raw HTTP/1.1 response into status and JSON body (content-length or chunked).
fn parse_response(raw: &[u8]) -> (u16, Value) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("webdriver: no HTTP header end in {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("webdriver: bad status line in {head}"));
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
                .unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = out;
    }
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "webdriver: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })
    };
    (status, value)
}

/// Whether `raw` holds a whole response (by `Content-Length`, or the last chunk).
fn response_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|length| body.len() >= length)
}

fn request_bytes(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(Value::to_string).unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Longest a single WebDriver command may take (a page load, a script).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(&request_bytes(addr, method, path, body))
            .await?;
        // chromedriver may keep the connection open despite `Connection: close`: read
        // exactly one response.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        while !response_complete(&raw) {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(raw)
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
        Ok(Ok(raw)) => parse_response(&raw),
        Ok(Err(e)) => panic!("webdriver {method} {path}: {e}"),
        Err(_) => panic!("webdriver {method} {path}: no answer in {COMMAND_TIMEOUT:?}"),
    }
}

/// A WebDriver error answer: `error` code and message.
#[derive(Debug)]
pub struct WdError {
    /// e.g. `stale element reference`, `no such element`, `no such alert`.
    pub error: String,
    /// The driver's message.
    pub message: String,
}

/// A headless Chromium driven through a chromedriver this test started.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session with a fresh profile.
    pub async fn start() -> Self {
        let install = "install them with `apt-get install chromium chromium-driver` \
                       (or set DLB_CHROMEDRIVER / DLB_CHROMIUM)";
        let chromedriver = find_tool("DLB_CHROMEDRIVER", &["chromedriver"])
            .unwrap_or_else(|| panic!("chromedriver not found: {install}"));
        let chromium = find_tool(
            "DLB_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        )
        .unwrap_or_else(|| panic!("chromium not found: {install}"));
        let port = dlb::testing::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let profile =
            std::env::temp_dir().join(format!("dlb-ui-chromium-{}-{port}", std::process::id()));
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(stream) = TcpStream::connect(addr).await {
                drop(stream);
                let (status, body) = http(addr, "GET", "/status", None).await;
                if status == 200 && body["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // An alert a page script opens stays open, so that the test can see it.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1440,1200",
                    format!("--user-data-dir={}", browser.profile.display()),
                ],
            },
        }}});
        let (status, body) = http(addr, "POST", "/session", Some(&capabilities)).await;
        assert_eq!(status, 200, "new session: {body}");
        browser.session = body["value"]["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    async fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        let path = format!("/session/{}{path}", self.session);
        if std::env::var_os("DLB_WEBDRIVER_TRACE").is_some() {
            eprintln!("webdriver: {method} {path}");
        }
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, value) = http(self.addr, method, &path, body.as_ref()).await;
        if status == 200 {
            Ok(value["value"].clone())
        } else {
            Err(WdError {
                error: value["value"]["error"].as_str().unwrap_or("?").to_owned(),
                message: value["value"]["message"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    async fn must(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.command(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {}: {}", e.error, e.message))
    }

    /// Loads `url` and waits for the document.
    pub async fn goto(&self, url: &str) {
        self.must("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its
    /// value.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` until it returns something other than null/false/"" and returns that.
    pub async fn wait_for(
        &self,
        what: &str,
        script: &str,
        args: Value,
        patience: Duration,
    ) -> Value {
        let deadline = Instant::now() + patience;
        loop {
            let value = self.eval(script, args.clone()).await;
            let done = !matches!(&value, Value::Null | Value::Bool(false))
                && value != Value::String(String::new());
            if done {
                return value;
            }
            if Instant::now() > deadline {
                let shot = self.save_screenshot("failure").await;
                panic!(
                    "timed out waiting for {what} (screenshot: {})",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn find(&self, css: &str) -> Result<String, WdError> {
        let value = self
            .command(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        Ok(value[ELEMENT].as_str().unwrap_or_default().to_owned())
    }

    /// Clicks the element `css` like a user (retrying when the page re-rendered it meanwhile).
    pub async fn click(&self, css: &str) {
        let mut last = None;
        for _ in 0..20 {
            let result = match self.find(css).await {
                Ok(id) => self
                    .command("POST", &format!("/element/{id}/click"), None)
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot click {css}: {last:?}");
    }

    /// Replaces the value of the input `css` by typing `text`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self
            .find(css)
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e:?}"));
        self.must("POST", &format!("/element/{id}/clear"), None)
            .await;
        self.must(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// The text of an open alert, if a page script opened one.
    pub async fn alert_text(&self) -> Option<String> {
        self.command("GET", "/alert/text", None)
            .await
            .ok()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
    }

    /// Saves a PNG of the viewport as `target/dlb-ui/<name>.png` and returns its path.
    pub async fn save_screenshot(&self, name: &str) -> PathBuf {
        let data = self.must("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap_or_default())
            .unwrap();
        let dir = target_dir().join("dlb-ui");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Resizes the window (a taller one for a full-page screenshot).
    pub async fn resize(&self, width: u32, height: u32) {
        self.must(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Blocking on purpose: Drop cannot await, and the browser must not outlive the test.
        if !self.session.is_empty()
            && let Ok(mut stream) = StdTcpStream::connect(self.addr)
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let path = format!("/session/{}", self.session);
            let _ = stream.write_all(&request_bytes(self.addr, "DELETE", &path, None));
            let (mut raw, mut chunk) = (Vec::new(), [0u8; 4096]);
            while !response_complete(&raw) {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => raw.extend_from_slice(&chunk[..n]),
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium outlives a killed chromedriver; its processes are the ones started with
        // this test's own profile directory.
        for process in dlb::testing::processes_mentioning(&self.profile.to_string_lossy()) {
            if let Some((pid, _)) = process.split_once(':') {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `target/` of this workspace (the test binary lives in `target/<profile>/deps/`).
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"))
}
