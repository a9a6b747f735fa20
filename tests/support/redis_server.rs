//! A real `redis-server` on a free loopback port, for the fleet tests: started, killed and
//! restarted on the same port as a test needs. CI installs it from Debian (`redis-server`);
//! without it the tests fail saying so, rather than skipping.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub addr: SocketAddr,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    pub tls_addr: Option<SocketAddr>,
    /// The CA that signed the TLS certificate (PEM file), for `fleet.ca_file`.
    pub ca_file: Option<std::path::PathBuf>,
    /// `requirepass`, when set.
    pub password: Option<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port (a port taken between choosing and binding is retried).
    pub async fn start() -> Self {
        Self::start_with(None, false).await
    }

    /// One that wants `password` (`requirepass`).
    pub async fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password.into()), false).await
    }

    /// One that also listens with TLS (a certificate for `localhost` from a test CA).
    pub async fn start_tls() -> Self {
        Self::start_with(None, true).await
    }

    async fn start_with(password: Option<String>, tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = tls.then(|| {
            let ca = super::tls::TestCa::new("redis test CA");
            let (cert, key) = ca.leaf_pem(&["localhost"]);
            std::fs::write(dir.path().join("redis.crt"), cert).unwrap();
            std::fs::write(dir.path().join("redis.key"), key).unwrap();
            let path = dir.path().join("ca.crt");
            std::fs::write(&path, ca.pem()).unwrap();
            path
        });
        let mut server = Self {
            addr: super::free_addr(),
            tls_addr: tls.then(super::free_addr),
            ca_file,
            password,
            child: None,
            dir,
        };
        for _ in 0..10 {
            if server.spawn().await {
                return server;
            }
            server.addr = super::free_addr();
            server.tls_addr = server.tls_addr.map(|_| super::free_addr());
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    /// `rediss://localhost:PORT/0` for the TLS port.
    pub fn tls_url(&self) -> String {
        let addr = self.tls_addr.expect("started with TLS");
        format!("rediss://localhost:{}/0", addr.port())
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@{}/0", self.addr),
            None => format!("redis://{}/0", self.addr),
        }
    }

    /// The URL without the password (the gateway reads it from `fleet.password_file`).
    pub fn url_without_password(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Starts the server on `self.addr`; `false` if it could not listen there.
    async fn spawn(&mut self) -> bool {
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--port",
            &self.addr.port().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.path().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(p) = &self.password {
            args.extend(["--requirepass".into(), p.clone()]);
        }
        if let Some(tls) = self.tls_addr {
            let file = |name: &str| self.dir.path().join(name).display().to_string();
            args.extend([
                "--tls-port".into(),
                tls.port().to_string(),
                "--tls-cert-file".into(),
                file("redis.crt"),
                "--tls-key-file".into(),
                file("redis.key"),
                "--tls-ca-cert-file".into(),
                file("ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot run redis-server ({e}): the fleet tests need a real Redis \
                 (Debian: apt-get install redis-server)"
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.ping().await {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        false
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(self.addr).await else {
            return false;
        };
        let mut ask = Vec::new();
        if let Some(p) = &self.password {
            ask.extend_from_slice(format!("AUTH {p}\r\n").as_bytes());
        }
        ask.extend_from_slice(b"PING\r\n");
        if stream.write_all(&ask).await.is_err() {
            return false;
        }
        let expected: &[u8] = match self.password {
            Some(_) => b"+OK\r\n+PONG\r\n",
            None => b"+PONG\r\n",
        };
        let mut answer = vec![0u8; expected.len()];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut answer)).await,
            Ok(Ok(_))
        ) && answer == expected
    }

    /// Kills it (as a crash would: SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client connection, for looking at what is stored.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        Self::connect(&self.url()).await
    }

    async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Every key.
    pub async fn keys(&self) -> Vec<String> {
        let mut c = self.connection().await;
        redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Every key and every value (strings, hashes, sorted sets) as text.
    pub async fn dump(&self) -> String {
        Self::dump_from(self.connection().await).await
    }

    /// [`RedisServer::dump`] after the password changed to `password`.
    pub async fn dump_with_password(&self, password: &str) -> String {
        let url = format!("redis://:{password}@{}/0", self.addr);
        Self::dump_from(Self::connect(&url).await).await
    }

    async fn dump_from(mut c: redis::aio::MultiplexedConnection) -> String {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut out = String::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            let value = match kind.as_str() {
                "string" => {
                    redis::cmd("GET")
                        .arg(&key)
                        .query_async::<Vec<u8>>(&mut c)
                        .await
                }
                "hash" => redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async::<Vec<Vec<u8>>>(&mut c)
                    .await
                    .map(|v| v.concat()),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async::<Vec<Vec<u8>>>(&mut c)
                    .await
                    .map(|v| v.concat()),
                _ => Ok(Vec::new()),
            }
            .unwrap();
            out.push_str(&key);
            out.push(' ');
            out.push_str(&String::from_utf8_lossy(&value));
            out.push('\n');
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of a Redis that can make the subscriptions open at one moment go
/// silent without closing them, as a node that vanishes (no FIN, no RST) leaves them.
pub struct SilencingProxy {
    pub addr: SocketAddr,
    silence: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SilencingProxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silence: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let flags = silence.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                // Set for connections that subscribed, once silenced.
                let subscribed = Arc::new(AtomicBool::new(false));
                let silenced = Arc::new(AtomicBool::new(false));
                flags.lock().unwrap().push(silenced.clone());
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let sub = subscribed.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n]
                            .windows(9)
                            .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                        {
                            sub.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if subscribed.load(Ordering::SeqCst) && silenced.load(Ordering::SeqCst) {
                            continue; // swallowed: the socket stays open and says nothing
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            silence,
            task,
        }
    }

    /// Silences the subscriptions open now (later ones pass).
    pub fn silence_open_subscriptions(&self) {
        for flag in self.silence.lock().unwrap().iter() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
