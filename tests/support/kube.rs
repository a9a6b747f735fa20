//! A fake Kubernetes API server over TLS that answers TokenReviews the way the real one does:
//! `authenticated` only for known tokens valid for one of the requested audiences.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::tls::server_config_for_localhost;

/// The token the gateway must authenticate its own reviews with.
pub const GATEWAY_SA_TOKEN: &str = "gateway-serviceaccount-token";

/// token → (username, audiences it is valid for).
type Tokens = Mutex<HashMap<String, (String, Vec<String>)>>;

pub struct FakeKube {
    pub addr: SocketAddr,
    pub ca_pem: String,
    tokens: Arc<Tokens>,
    pub reviews: Arc<AtomicUsize>,
    /// How long each review takes to answer, in milliseconds (0: at once).
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JWT-shaped token (unsigned; the fake does not verify) expiring in an hour.
pub fn sa_token(name: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256"})),
        b64(&json!({"exp": exp, "sub": name})),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
    )
}

impl FakeKube {
    pub async fn start() -> Self {
        let (config, ca_pem) = server_config_for_localhost();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tokens = Arc::new(Mutex::new(HashMap::new()));
        let reviews = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (t, r, d) = (tokens.clone(), reviews.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, t, r, d) = (acceptor.clone(), t.clone(), r.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (t, r, d) = (t.clone(), r.clone(), d.clone());
                        async move { Ok::<_, hyper::Error>(review(req, &t, &r, &d).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_pem,
            tokens,
            reviews,
            delay_ms,
            task,
        }
    }

    /// Makes every review take `delay` before it is answered.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Makes `token` valid for `audiences` as ServiceAccount `namespace/name`.
    pub fn add(&self, token: &str, namespace: &str, name: &str, audiences: &[&str]) {
        self.tokens.lock().unwrap().insert(
            token.to_string(),
            (
                format!("system:serviceaccount:{namespace}:{name}"),
                audiences.iter().map(|a| a.to_string()).collect(),
            ),
        );
    }

    /// Makes `token` valid as `namespace/name` with an empty `status.audiences`: what an API
    /// server answers for a token issued for its own audience when asked without one.
    pub fn add_without_audiences(&self, token: &str, namespace: &str, name: &str) {
        self.add(token, namespace, name, &[]);
    }

    pub fn reviews(&self) -> usize {
        self.reviews.load(Ordering::SeqCst)
    }
}

async fn review(
    req: Request<Incoming>,
    tokens: &Tokens,
    reviews: &AtomicUsize,
    delay_ms: &AtomicU64,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, v: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    if req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews" {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "code": 404}),
        );
    }
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {GATEWAY_SA_TOKEN}"));
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"kind": "Status", "code": 401}),
        );
    }
    reviews.fetch_add(1, Ordering::SeqCst);
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
        .unwrap_or(Value::Null);
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let known = tokens.lock().unwrap().get(token).cloned();
    let status = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some((user, audiences)) if audiences.is_empty() => {
            json!({"authenticated": true, "user": {"username": user, "uid": "1"}, "audiences": []})
        }
        Some((user, audiences)) => {
            let both: Vec<&String> = audiences.iter().filter(|a| wanted.contains(a)).collect();
            if both.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({"authenticated": true, "user": {"username": user, "uid": "1"}, "audiences": both})
            }
        }
    };
    reply(
        StatusCode::CREATED,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}),
    )
}
