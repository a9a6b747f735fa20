//! An OTLP/HTTP receiver: accepts `POST /v1/traces` (protobuf), decodes each export with
//! opentelemetry-proto, and keeps the spans.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;

/// A received span with the resource it came with.
#[derive(Debug, Clone)]
pub struct Received {
    pub span: Span,
    pub service_name: Option<String>,
}

impl Received {
    /// An attribute's value as text (strings as they are, numbers formatted).
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(text)
    }
}

fn text(v: &AnyValue) -> Option<String> {
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(text)
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    pub spans: Arc<Mutex<Vec<Received>>>,
    /// Requests that were not a decodable export.
    pub rejected: Arc<Mutex<Vec<String>>>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let rejected = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (spans.clone(), rejected.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, r) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (s, r) = (s.clone(), r.clone());
                        async move { Ok::<_, hyper::Error>(receive(req, &s, &r).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            spans,
            rejected,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

async fn receive(
    req: Request<Incoming>,
    spans: &Mutex<Vec<Received>>,
    rejected: &Mutex<Vec<String>>,
) -> Response<Full<Bytes>> {
    let what = format!(
        "{} {} {:?}",
        req.method(),
        req.uri(),
        req.headers().get("content-type")
    );
    let proto = req.headers().get("content-type").map(|v| v.as_bytes())
        == Some(b"application/x-protobuf".as_slice());
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let decoded = match (proto, body) {
        (true, Ok(bytes)) => ExportTraceServiceRequest::decode(bytes).ok(),
        _ => None,
    };
    let Some(export) = decoded.filter(|_| what.starts_with("POST /v1/traces")) else {
        rejected.lock().unwrap().push(what);
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::new()))
            .unwrap();
    };
    let mut out = spans.lock().unwrap();
    for rs in export.resource_spans {
        let service_name = rs
            .resource
            .as_ref()
            .and_then(|r| string_attr(&r.attributes, "service.name"));
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(Received {
                    span,
                    service_name: service_name.clone(),
                });
            }
        }
    }
    Response::builder()
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::new()))
        .unwrap()
}
