//! Listeners: accepting TCP connections, TLS (with client certificates) when configured, serving
//! HTTP/1.1 and HTTP/2 on the same port (prior knowledge in clear text, ALPN over TLS), cutting
//! off clients that trickle their headers or, after TLS, send nothing, and draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::body::Body;
use crate::identity::{PeerIdentity, identity_from_certificate};
use crate::tls::ServerTls;

/// The address of the peer that sent a request, in request extensions.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    /// The peer's socket address.
    pub addr: SocketAddr,
    /// The address as text, formatted once per connection (every audit record carries it).
    pub text: Arc<str>,
}

impl ClientAddr {
    /// Formats `addr` once.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            text: addr.to_string().into(),
        }
    }
}

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a client has to send its request headers (and, before that, its first bytes).
    pub header_timeout: Duration,
    /// Time in-flight requests get to finish once shutdown begins.
    pub drain_timeout: Duration,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `service` on `listener` until `stop` turns true, then drains.
pub async fn serve<S>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    tls: Option<Arc<ServerTls>>,
    mut stop: watch::Receiver<bool>,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning on the error.
                    tracing::warn!(listener = name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                if !await_protocol_bytes(&stream, options.header_timeout).await {
                    tracing::debug!(%peer, "closing a connection that sent no request in time");
                    return;
                }
                let connection = builder
                    .serve_connection(TokioIo::new(stream), per_request(service, peer, None))
                    .into_owned();
                if let Err(err) = watcher.watch(connection).await {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            };
            let stream =
                match tokio::time::timeout(options.header_timeout, tls.acceptor().accept(stream))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake not completed in time");
                        return;
                    }
                };
            let (_, session) = stream.get_ref();
            let identity = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| identity_from_certificate(cert))
                .map(|id| PeerIdentity(Arc::new(id)));
            // ALPN decided the protocol: no sniffing, so no wait for a silent client either.
            let builder = match session.alpn_protocol() {
                Some(b"h2") => builder.http2_only(),
                _ => builder.http1_only(),
            };
            // hyper has no timer before an HTTP/2 client's preface: without this bound, a client
            // that negotiated h2 and then stayed silent would hold the connection forever.
            let stream = FirstBytesBy::new(stream, options.header_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), per_request(service, peer, identity))
                .into_owned();
            if let Err(err) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(listener = name, connections = open, "draining");
    }
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain timeout reached; closing the remaining connections"
        );
    }
}

/// Adds what the connection knows (peer address, certificate identity) to each request.
fn per_request<S>(
    service: S,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
) -> TowerToHyperService<
    impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone,
>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let peer = ClientAddr::new(peer);
    TowerToHyperService::new(service.map_request(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        req
    }))
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A closed channel means the owner is gone: stop as well.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// A stream whose reads fail with `TimedOut` if its first bytes have not arrived by a deadline;
/// after they have, it is the inner stream.
struct FirstBytesBy<T> {
    inner: T,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> FirstBytesBy<T> {
    fn new(inner: T, within: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytesBy<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request bytes in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytesBy<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Waits until the client has sent enough bytes for hyper to tell HTTP/1 from HTTP/2, within
/// `timeout`. hyper's automatic protocol detection has no timer of its own (hyper#3962), so
/// without this a client that connects and stays silent would hold a connection forever.
async fn await_protocol_bytes(stream: &TcpStream, timeout: Duration) -> bool {
    let wait = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            // Enough to decide: either a full preface, or bytes that already differ from it.
            if n == H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] {
                return true;
            }
            // A partial preface: wait for more bytes to arrive.
            if stream.readable().await.is_err() {
                return false;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}
