//! A real `redis-server` on a free loopback port, for the fleet tests: started, killed and
//! restarted on the same port as a test needs. CI installs it from Debian (`redis-server`);
//! without it the tests fail saying so, rather than skipping.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port (a port taken between choosing and binding is retried).
    pub async fn start() -> Self {
        let mut server = Self {
            addr: super::free_addr(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..10 {
            if server.spawn().await {
                return server;
            }
            server.addr = super::free_addr();
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Starts the server on `self.addr`; `false` if it could not listen there.
    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
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
            ])
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
        if stream.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut answer = [0u8; 7];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut answer)).await,
            Ok(Ok(_))
        ) && &answer == b"+PONG\r\n"
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
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Every key and every value (strings, hashes, sorted sets) as text.
    pub async fn dump(&self) -> String {
        let mut c = self.connection().await;
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
