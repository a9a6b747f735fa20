//! Shared test support: the mock CloudCasa, a gateway running in-process on ephemeral ports, a
//! Kubernetes-style Secret directory, and small HTTP helpers.
#![allow(dead_code)]

pub mod h2wire;
pub mod kube;
pub mod mock;
pub mod otlp;
pub mod redis_server;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use cloudcasa_gateway::Gateway;
use cloudcasa_gateway::config::{Config, Overrides};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

#[allow(unused_imports)]
pub use mock::{Fault, MockCloudCasa};

/// A directory laid out like a Secret volume: `token -> ..data/token`, `..data -> ..<version>`.
/// Rotation swaps `..data` atomically, as the kubelet does.
pub struct SecretDir {
    pub dir: tempfile::TempDir,
    version: u32,
}

impl SecretDir {
    pub fn new(token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Self { dir, version: 0 };
        s.write_version(token);
        std::os::unix::fs::symlink("..data/token", s.dir.path().join("token")).unwrap();
        s
    }

    /// An empty directory: the Secret has not been mounted yet.
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        }
    }

    pub fn token_path(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    fn write_version(&mut self, token: &str) {
        self.version += 1;
        let versioned = format!("..2026_11_27_00_00_{:02}.{}", self.version, self.version);
        let vdir = self.dir.path().join(&versioned);
        std::fs::create_dir(&vdir).unwrap();
        std::fs::write(vdir.join("token"), format!("{token}\n")).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&versioned, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    /// Rotates the token the way the kubelet does.
    pub fn rotate(&mut self, token: &str) {
        self.write_version(token);
    }

    /// Makes the Secret appear in an empty directory.
    pub fn appear(&mut self, token: &str) {
        self.write_version(token);
        let link = self.dir.path().join("token");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("..data/token", link).unwrap();
        }
    }
}

/// A gateway running in this test's runtime.
pub struct TestGateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The audit file, unless the test configured its own sink.
    pub audit: Option<PathBuf>,
    _audit_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    /// Starts a gateway from TOML text; listeners default to ephemeral loopback ports.
    pub async fn start(toml: &str) -> Self {
        let text = format!("{toml}\n");
        let mut raw = Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e:?}"));
        raw.server
            .listen
            .get_or_insert_with(|| "127.0.0.1:0".into());
        raw.admin.listen.get_or_insert_with(|| "127.0.0.1:0".into());
        // Audit records go to a file of the test's own rather than the test runner's stdout.
        let audit_dir = tempfile::tempdir().unwrap();
        let audit = match raw.audit.path {
            Some(_) => None,
            None => {
                let path = audit_dir.path().join("audit.jsonl");
                raw.audit.path = Some(path.display().to_string());
                Some(path)
            }
        };
        let config = Config::from_raw(raw, &Overrides::default())
            .unwrap_or_else(|e| panic!("test config: {e:?}"));
        let gateway = Gateway::bind(config).await.expect("gateway binds");
        let (proxy, admin) = (gateway.proxy_addr(), gateway.admin_addr());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Self {
            proxy,
            admin,
            audit,
            _audit_dir: audit_dir,
            stop: Some(stop),
            task,
        }
    }

    /// A gateway in front of `mock` with the token from `secret`, plus extra TOML.
    pub async fn for_mock(mock: &MockCloudCasa, secret: &SecretDir, extra: &str) -> Self {
        Self::start(&format!(
            "[upstream]\nurl = \"{}\"\ntimeout = \"5s\"\n[token]\nfile = \"{}\"\n{extra}",
            mock.url(),
            secret.token_path().display()
        ))
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The audit records written so far, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let path = self
            .audit
            .as_ref()
            .expect("the test gateway's own audit file");
        read_records(path)
    }

    /// Waits until at least `n` audit records are written, and returns them all.
    pub async fn wait_audit(&self, n: usize) -> Vec<serde_json::Value> {
        let mut records = Vec::new();
        eventually(
            Duration::from_secs(10),
            &format!("{n} audit records"),
            || {
                records = self.audit_records();
                std::future::ready(records.len() >= n)
            },
        )
        .await;
        records
    }

    /// Begins shutdown and returns a handle that completes when the gateway has stopped.
    pub fn begin_shutdown(&mut self) -> &mut tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        &mut self.task
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts a hit from an entry fresh for `fresh` seconds, with `detail` (as
    /// `"; detail=shared"`, or empty) at the end of its `Cache-Status`: `ttl` may be a second or
    /// two under `fresh`, the time the test took since the fill on a busy machine.
    pub fn assert_fresh_hit(&self, fresh: u64, detail: &str) {
        let status = self.header("cache-status").unwrap_or_default();
        let ttl = status
            .strip_prefix("cloudcasa-gateway; hit; ttl=")
            .and_then(|rest| rest.strip_suffix(detail))
            .and_then(|ttl| ttl.parse::<u64>().ok());
        assert!(
            ttl.is_some_and(|t| t <= fresh && t + 2 >= fresh),
            "not a hit fresh for {fresh}s{detail}: {status:?}"
        );
    }
    /// Asserts the body is CloudCasa's error envelope with `status`, and returns its message.
    pub fn envelope_message(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        assert_eq!(v["_status"], "ERR", "{v}");
        assert_eq!(v["_error"]["code"], status, "{v}");
        v["_error"]["message"]
            .as_str()
            .expect("a message")
            .to_string()
    }
}

/// An HTTP/1.1 client for tests.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .expect("the gateway answers");
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("a complete body").to_bytes(),
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    send(Method::GET, url, headers, Bytes::new()).await
}

/// PATCHes an item's name with `If-Match: "etag"`, as a CloudCasa client edits it.
pub async fn rename(url: &str, etag: &str, name: &str) -> Reply {
    let body = serde_json::json!({ "name": name }).to_string();
    send(
        Method::PATCH,
        url,
        &[("if-match", &format!("\"{etag}\""))],
        body,
    )
    .await
}

/// Renames an item straight at the mock upstream with `token`, as a write through another path
/// (or one the upstream commits late) would.
pub async fn rename_at_upstream(
    mock: &MockCloudCasa,
    path: &str,
    etag: &str,
    token: &str,
    name: &str,
) -> Reply {
    let body = serde_json::json!({ "name": name }).to_string();
    send(
        Method::PATCH,
        &format!("{}{path}", mock.url()),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("if-match", &format!("\"{etag}\"")),
        ],
        body,
    )
    .await
}

/// Sends a PATCH renaming the item at `path` to `proxy`, waits until `mock` has received it,
/// and goes away without waiting for the answer.
pub async fn abandon_rename(proxy: SocketAddr, mock: &MockCloudCasa, path: &str, etag: &str) {
    let body = r#"{"name":"new"}"#;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    let request = format!(
        "PATCH {path} HTTP/1.1\r\nhost: x\r\nif-match: \"{etag}\"\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut client, request.as_bytes())
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the PATCH at the upstream", || {
        std::future::ready(
            mock.state
                .requests()
                .iter()
                .any(|r| r.method == Method::PATCH),
        )
    })
    .await;
    drop(client);
}

/// Writes raw bytes to `addr` and reads until the server closes the connection.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    // A reset is the server closing too (it did not wait to read what we sent).
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A loopback address nothing listens on (bound and released at once): for a child process's
/// listener, or an upstream that refuses connections.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until `check` holds, polling every 20 ms, for at most `limit`; panics with `what`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// Parses a JSON Lines audit file.
pub fn read_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// A mock CloudCasa, tenant `a`'s token in a Secret, and a gateway in front with `extra` TOML.
pub async fn setup(extra: &str) -> (MockCloudCasa, SecretDir, TestGateway) {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, extra).await;
    (mock, secret, gw)
}

/// Seeds a usergroup in tenant `a`; returns its id and ETag.
pub fn item(mock: &MockCloudCasa, name: &str) -> (String, String) {
    let doc = mock
        .state
        .seed("a", "usergroups", serde_json::json!({"name": name}));
    (
        doc["_id"].as_str().unwrap().to_string(),
        doc["_etag"].as_str().unwrap().to_string(),
    )
}

/// POSTs 2 KiB to a collection: over a `max_body_size = "1KiB"` limit.
pub async fn post_oversized(gw: &TestGateway) -> Reply {
    send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        "x".repeat(2048),
    )
    .await
}

/// The gateway binary running as a child process on two loopback ports (proxy and admin), its
/// stderr in a file; killed on drop.
pub struct ChildGateway {
    pub process: std::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl ChildGateway {
    /// Starts the binary with the environment `env` and the arguments `args(proxy, admin)`
    /// returns (it writes the config that names those ports); returns once the admin port
    /// accepts connections.
    ///
    /// Ports come from [`free_addr`], so another test can take one between its release and the
    /// child's bind; the child then exits with "Address already in use" and is started again on
    /// fresh ports (a few times). Any other early exit fails the test with what the child logged.
    pub async fn start<F>(log: PathBuf, env: &[(&str, &str)], mut args: F) -> ChildGateway
    where
        F: FnMut(SocketAddr, SocketAddr) -> Vec<std::ffi::OsString>,
    {
        for _ in 0..5 {
            let (proxy, admin) = (free_addr(), free_addr());
            let mut process = std::process::Command::new(env!("CARGO_BIN_EXE_cloudcasa-gateway"))
                .args(args(proxy, admin))
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if TcpStream::connect(admin).await.is_ok() {
                    return ChildGateway {
                        process,
                        proxy,
                        admin,
                        log,
                    };
                }
                if let Some(status) = process.try_wait().unwrap() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        text.contains("Address already in use"),
                        "the gateway exited before listening ({status}): {text}"
                    );
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    let _ = process.kill();
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("the gateway did not listen within 30 s: {text}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("no free ports for the gateway after 5 attempts");
    }

    /// What the child has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (polling, at most 30 s) for the child to exit; returns its status and logs.
    pub async fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return (status, self.logs());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not exit within 30 s: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (a name such as "HUP") to the child.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.process.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The value of one series (`name{labels}` exactly as exposed) in the admin listener's
/// `/metrics` at `admin`; `None` when the series is not there.
pub async fn metric_at(admin: SocketAddr, series: &str) -> Option<u64> {
    series_value(
        &get(&format!("http://{admin}/metrics"), &[]).await.text(),
        series,
    )
}

/// The value of one series (`name{labels}` exactly as exposed) in an exposition `text`.
pub fn series_value(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The `connections_closed_total` series of the proxy listener for `reason`.
pub fn closed_series(reason: &str) -> String {
    format!("cloudcasa_gateway_connections_closed_total{{listener=\"proxy\",reason=\"{reason}\"}}")
}

/// Waits (at most 5 s) until the series `series` at `admin` reads `expected`, and fails with
/// the value it had otherwise: a close is counted just after the socket closes.
pub async fn expect_metric(admin: SocketAddr, series: &str, expected: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric_at(admin, series).await;
        if value == Some(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {value:?}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
