//! Listeners: accepting TCP connections (at most `server.max_connections` at once), TLS (with
//! client certificates) when configured, serving HTTP/1.1 and HTTP/2 on the same port (prior
//! knowledge in clear text, ALPN over TLS), cutting off clients that trickle their headers, send
//! no request or stop reading their responses, closing idle connections, and draining on
//! shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::{Service, ServiceExt};

use crate::context::{ClientAddr, PeerIdentity};
use crate::http::body::Body;
use crate::layers::identity::identity_from_certificate;
use crate::observability::metrics::{CloseReason, ListenerMetrics};
use crate::secrets::tls::ServerTls;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a client has to send its request headers (and, before that, its first bytes; on
    /// HTTP/2, its first request).
    pub header_timeout: Duration,
    /// Time in-flight requests get to finish once shutdown begins.
    pub drain_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY first).
    pub idle_timeout: Duration,
    /// Connections open at once at most; past it new connections are closed at once.
    pub max_connections: usize,
    /// HTTP/2: a PING after this long without frames from the client...
    pub h2_keepalive_interval: Duration,
    /// ...and the connection closes if the PING is not acknowledged within this.
    pub h2_keepalive_timeout: Duration,
    /// A connection whose client keeps a write waiting this long (it stopped reading) is
    /// closed.
    pub send_timeout: Duration,
    /// An HTTP/2 connection one of whose streams waits this long for the client to take its
    /// next frame is closed.
    pub h2_stall_timeout: Duration,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Serves `service` on `listener` until `stop` turns true, then drains.
pub async fn serve<S>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    tls: Option<Arc<ServerTls>>,
    stop: watch::Receiver<bool>,
    metrics: ListenerMetrics,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let streams = Streams::default();
    let mut builder = auto::Builder::new(streams.clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        // Bounds what one connection buffers each way: request headers (64 KiB is twice
        // nginx's largest default) and response bytes queued for a client that is not reading
        // (hyper's default, ~400 KiB plus up to 16 queued chunks, made a stalled client cost
        // megabytes).
        .max_buf_size(CONNECTION_BUFFER)
        .keep_alive(true);
    // Pings find dead peers (a vanished client behind a NAT holds no resources for long); they
    // are not activity: an idle connection is one without requests.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(options.h2_keepalive_interval))
        .keep_alive_timeout(options.h2_keepalive_timeout)
        // What one HTTP/2 connection can make the gateway hold, bounded: hyper's defaults (200
        // streams, 1 MiB windows, 400 KiB queued per stream) let a client that never reads
        // hold 73 MiB with 100 streams, these 20–31 MiB (measured; see the README's "Memory
        // bounds").
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    // One permit per open connection: all permits back means every connection has closed.
    let slots = Arc::new(Semaphore::new(options.max_connections));
    // The connections' tasks, so that those still open at the drain timeout are closed (and
    // their requests accounted for, audit records included) before `serve` returns.
    let mut connections = tokio::task::JoinSet::new();
    let mut accept_stop = stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            // Finished connections are reaped as they finish: the set holds the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning on the error.
                    tracing::warn!(listener = name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(&mut accept_stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once rather than left in the backlog: the client learns now, and the
            // connections already open are unaffected.
            metrics.refused.inc();
            tracing::debug!(listener = name, %peer, "connection refused: server.max_connections open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            metrics.open.inc();
            if let Err(reason) =
                serve_connection(stream, peer, service, builder, options, tls, stop).await
            {
                metrics.closed(reason);
            }
            metrics.open.dec();
            drop(slot);
        });
    }
    drop(listener);
    let open = options.max_connections - slots.available_permits();
    if open > 0 {
        tracing::info!(listener = name, connections = open, "draining");
    }
    let all = u32::try_from(options.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(options.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            connections = options.max_connections - slots.available_permits(),
            "drain timeout reached; closing the remaining connections"
        );
    }
    // Closes what is left and waits until it is gone, HTTP/2 streams (tasks of their own)
    // included: an unfinished request's outcome (499 in its audit record) is recorded now,
    // before the audit trail's last flush, rather than lost when the runtime is dropped.
    connections.shutdown().await;
    streams.shutdown().await;
}

/// hyper's executor for HTTP/2 streams, each a task of its own: the tasks are kept, so that
/// those still running when the drain ends are closed before `serve` returns.
#[derive(Clone, Default)]
pub struct Streams(Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>);

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, tokio::task::JoinSet<()>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn shutdown(&self) {
        let mut tasks = std::mem::take(&mut *self.lock());
        tasks.shutdown().await;
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        let mut tasks = self.lock();
        // Finished streams are reaped as new ones start: the set holds the running ones.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            stream.await;
        });
    }
}

/// What one HTTP/1 connection buffers in each direction at most.
const CONNECTION_BUFFER: usize = 64 * 1024;

/// Streams one HTTP/2 client may have open at once: RFC 9113 asks for at least 100, nginx
/// allows 128. Each can hold a response queued for the client (`H2_SEND_BUFFER`).
const H2_MAX_STREAMS: u32 = 100;
/// Request body bytes a client may send on one stream before the gateway has read them: the
/// protocol's own default (64 KiB), enough for API bodies at cluster round-trip times.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// ...and on all its streams together: what a client's uploads can make one connection hold.
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
/// Response bytes queued on one HTTP/2 stream for a client that is not reading: one full
/// frame. The kernel's socket buffer does the bulk buffering; each queued chunk can pin a
/// larger allocation (the upstream's read buffer), so this costs about three times its size:
/// 64 KiB measured 39 MiB for 100 stalled streams, 16 KiB 23 MiB (single runs).
const H2_SEND_BUFFER: usize = 16 * 1024;
/// Decoded request headers of one HTTP/2 request (hyper's default, made explicit).
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// Serves one connection to its end; `Err` says why the gateway closed it itself (counted in
/// `connections_closed_total`), `Ok` that the client closed it or a shutdown drained it.
async fn serve_connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    builder: auto::Builder<Streams>,
    options: ServeOptions,
    tls: Option<Arc<ServerTls>>,
    stop: watch::Receiver<bool>,
) -> Result<(), CloseReason>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let state = Arc::new(ConnState::new(ClientAddr::new(peer)));
    // The connection's bytes, its protocol and, over mTLS, who the client is.
    let (io, protocol, identity): (Box<dyn Io>, Protocol, Option<PeerIdentity>) = match tls {
        None => {
            let (protocol, prefix) = match read_preface(&stream, options.header_timeout).await {
                Ok(read) => read,
                Err(PrefaceError::TimedOut) => {
                    tracing::debug!(%peer, "closing a connection that sent no request in time");
                    return Err(CloseReason::HeaderTimeout);
                }
                Err(PrefaceError::Closed) => return Ok(()),
            };
            (
                Box::new(Watched::new(Rewind::new(prefix, stream), state.clone())),
                protocol,
                None,
            )
        }
        Some(tls) => {
            let accepted =
                tokio::time::timeout(options.header_timeout, tls.acceptor().accept(stream)).await;
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "TLS handshake failed");
                    return Err(CloseReason::TlsHandshakeFailed);
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake not completed in time");
                    return Err(CloseReason::TlsHandshakeTimeout);
                }
            };
            let (_, session) = stream.get_ref();
            let identity = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| identity_from_certificate(cert))
                .map(|id| PeerIdentity(Arc::new(id)));
            // ALPN decided the protocol: no sniffing.
            let protocol = match session.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            (
                Box::new(Watched::new(stream, state.clone())),
                protocol,
                identity,
            )
        }
    };
    let io = TokioIo::new(io);
    let service = per_request(
        service,
        state.client.clone(),
        identity,
        state.clone(),
        protocol,
    );
    match protocol {
        Protocol::Http1 => {
            let conn = builder
                .http1_only()
                .serve_connection(io, service)
                .into_owned();
            drive(conn, &state, protocol, options, stop, peer).await
        }
        Protocol::Http2 => {
            let conn = builder
                .http2_only()
                .serve_connection(io, service)
                .into_owned();
            drive(conn, &state, protocol, options, stop, peer).await
        }
    }
}

/// A client connection's byte stream: plain TCP (with its first bytes replayed) or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What a connection's requests tell its watchdog: how many are in flight, and how many have
/// started and ended. Counters only: no clock is read per request; the watchdog notices quiet
/// by sampling them.
#[derive(Debug)]
pub struct ConnState {
    opened: tokio::time::Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    completed: AtomicU64,
    /// [`ConnState::activity`] when the client's bytes were last read ([`NEVER`] before any):
    /// tells a client that sent nothing since its last request (idle) from one that stalled
    /// halfway through the next one's headers.
    read_at: AtomicU64,
    /// The connection's writes, as [`Watched`] reports them: how many times a write has had to
    /// wait for the client (shifted left one bit) and whether one is waiting now
    /// ([`WRITE_WAITING`]). A waiting write leaves the same value until it goes through, so
    /// the watchdog can tell one long wait ([`SendStall`]) from many short ones.
    writes: AtomicU64,
    /// The client, shared with its requests: marked when the gateway cuts the connection off
    /// (its requests' records say why, and its socket is reset rather than closed).
    client: ClientAddr,
    /// HTTP/2: the response bodies of the streams, as the watchdog last saw them (each with
    /// its [`SendStall`]); ended ones are dropped as the watchdog passes, or when the list
    /// fills.
    streams: std::sync::Mutex<Vec<(std::sync::Weak<StreamProgress>, SendStall)>>,
}

/// What an HTTP/2 stream's response body tells the watchdog, in one word: how many frames hyper
/// has taken from it (shifted left one bit), and whether it is owed a poll ([`WRITE_WAITING`]:
/// its headers or its last frame went out and hyper has not come back for more). A client that
/// keeps the stream's flow-control window shut leaves that word as it is, bit set, for as long
/// as it likes; it can read its connection meanwhile, so no write waits at the socket and only
/// this shows it.
#[derive(Debug)]
pub struct StreamProgress(AtomicU64);

/// A stream's side of its [`StreamProgress`]: published only when the owed bit changes.
#[derive(Debug)]
pub struct StreamWatch {
    shared: Arc<StreamProgress>,
    taken: u64,
    owed: bool,
}

impl StreamWatch {
    /// hyper polls the body: it is owed nothing now.
    fn polled(&mut self) {
        if self.owed {
            self.owed = false;
            self.shared.0.store(self.taken << 1, Ordering::Relaxed);
        }
    }

    /// The body handed hyper a frame: owed a poll until hyper comes back.
    fn handed(&mut self) {
        self.owed = true;
        self.taken += 1;
        self.shared
            .0
            .store((self.taken << 1) | WRITE_WAITING, Ordering::Relaxed);
    }
}

/// The bit of [`ConnState::writes`] that says a write is waiting for the client.
const WRITE_WAITING: u64 = 1;

/// [`ConnState::read_at`] before the first read.
const NEVER: u64 = u64::MAX;

impl ConnState {
    fn new(client: ClientAddr) -> Self {
        Self {
            opened: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            read_at: AtomicU64::new(NEVER),
            writes: AtomicU64::new(0),
            client,
            streams: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Registers an HTTP/2 stream's response body, whose headers are going out, for the
    /// watchdog: owed a poll from the start (a client that opens no window is never sent a
    /// byte of it).
    fn watch_stream(&self) -> StreamWatch {
        let shared = Arc::new(StreamProgress(AtomicU64::new(WRITE_WAITING)));
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Ended streams go when the list is full, before it grows: the list stays within about
        // twice the streams open at once (a push rescans at most that many, and only when
        // it is full).
        if streams.len() == streams.capacity() {
            streams.retain(|(stream, _)| stream.strong_count() > 0);
        }
        streams.push((Arc::downgrade(&shared), SendStall::default()));
        StreamWatch {
            shared,
            taken: 0,
            owed: true,
        }
    }

    /// Samples the HTTP/2 streams at `now`: how long the longest stall among them has been
    /// seen. Forgets the streams that ended.
    fn longest_stream_stall(&self, now: tokio::time::Instant) -> Duration {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut longest = Duration::ZERO;
        streams.retain_mut(|(stream, stall)| match stream.upgrade() {
            Some(progress) => {
                longest = longest.max(stall.observe(progress.0.load(Ordering::Relaxed), now));
                true
            }
            None => false,
        });
        longest
    }

    fn started(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// Changes whenever a request starts or ends.
    fn activity(&self) -> u64 {
        self.requests.load(Ordering::Relaxed) + self.completed.load(Ordering::Relaxed)
    }

    /// Whether the connection has served a request and has been silent since the last one
    /// ended. (A pipelined request whose headers were read before the previous response ended
    /// and then stalled passes for idle: a miscount, not a missed close.)
    fn quiet_since_last_request(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.read_at.load(Ordering::Relaxed) != self.activity()
    }
}

/// A request in flight on a connection; dropped when its response body has ended (or the
/// request was abandoned).
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.completed.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's [`RequestGuard`] until it ends, and on HTTP/2
    /// tells the watchdog whether hyper keeps taking its frames.
    pub struct Guarded {
        #[pin]
        inner: Body,
        guard: Option<RequestGuard>,
        stream: Option<StreamWatch>,
    }
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = crate::http::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(stream) = this.stream.as_mut() {
            stream.polled();
        }
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match (&frame, this.stream.as_mut()) {
            (Some(Ok(_)), Some(stream)) => stream.handed(),
            (Some(Ok(_)), None) => {}
            _ => {
                this.guard.take();
                this.stream.take();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Runs one connection to its end: closes it gracefully when shutdown begins or it has been
/// idle for `server.idle_timeout` (HTTP/2: GOAWAY, and in-flight streams finish), and drops it
/// outright (a reset) if it is HTTP/2 and no request has arrived within `server.header_timeout`
/// (hyper has no timer before an HTTP/2 client's first request), if one write has waited for
/// the client for `server.send_timeout` (it stopped reading), if a graceful close has had
/// nothing in flight for `send_timeout` and still not ended (HTTP/2: a finished stream's last
/// bytes queued behind a shut window), or if one HTTP/2 stream's response has waited for
/// `server.h2_stall_timeout` for hyper to take its next frame (the client keeps its window
/// shut). Returns why the gateway closed it, when it did.
///
/// All are sampled, every quarter of the smallest of those timeouts but `header_timeout`: a
/// connection is idle once no request started or ended, and none was in flight, for
/// `idle_timeout`, and stalled once the same write (or stream) has been seen waiting for its
/// timeout (each give or take a sample, never less). An HTTP/1 connection may close earlier,
/// at `header_timeout`: hyper's header timer also runs while a keep-alive connection waits for
/// its next request.
async fn drive<C>(
    conn: C,
    state: &ConnState,
    protocol: Protocol,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) -> Result<(), CloseReason>
where
    C: Future<Output = Result<(), crate::http::body::BoxError>> + GracefulShutdown,
{
    tokio::pin!(conn);
    let mut first_request_by =
        (protocol == Protocol::Http2).then(|| state.opened + options.header_timeout);
    let shortest = options
        .idle_timeout
        .min(options.send_timeout)
        .min(options.h2_stall_timeout);
    let sample = (shortest / 4).max(Duration::from_millis(10));
    let mut stall = SendStall::default();
    // Since when a graceful close has had nothing in flight left to wait for.
    let mut drained_since: Option<tokio::time::Instant> = None;
    // Why the gateway began closing the connection, if it did.
    let mut closing: Option<Result<(), CloseReason>> = None;
    let (mut seen, mut quiet_since) = (state.activity(), state.opened);
    let first = first_request_by.map_or(state.opened + sample, |by| by.min(state.opened + sample));
    let check = tokio::time::sleep_until(first);
    tokio::pin!(check);
    let stop = stopped(&mut stop);
    tokio::pin!(stop);
    let side = SideWaker::new();
    loop {
        let event = std::future::poll_fn(|cx| {
            side.register(cx);
            if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(ended));
            }
            // The stop signal and the idle timer are polled only when they woke the task, not
            // on each of the connection's own wake-ups (several per request).
            if side.due() {
                let mut cx = side.context();
                if closing.is_none() && stop.as_mut().poll(&mut cx).is_ready() {
                    return Poll::Ready(Event::Stop);
                }
                if check.as_mut().poll(&mut cx).is_ready() {
                    return Poll::Ready(Event::Check);
                }
            }
            Poll::Pending
        })
        .await;
        // Whatever happened, the side futures are polled on the next turn (a reset timer must
        // be polled to be armed again).
        side.mark_due();
        match event {
            Event::Ended(ended) => {
                if let Some(closed) = closing {
                    return closed;
                }
                return match ended {
                    Err(err) => {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                        // hyper's own timers: the header timer (HTTP/1), an unanswered
                        // keep-alive PING (HTTP/2).
                        let timed_out = err
                            .downcast_ref::<hyper::Error>()
                            .is_some_and(hyper::Error::is_timeout);
                        match (timed_out, protocol) {
                            (false, _) => Ok(()),
                            // hyper's header timer also runs between requests: a keep-alive
                            // connection silent since its last request is idle, not slow.
                            (true, Protocol::Http1) if state.quiet_since_last_request() => {
                                Err(CloseReason::IdleTimeout)
                            }
                            (true, Protocol::Http1) => Err(CloseReason::HeaderTimeout),
                            (true, Protocol::Http2) => Err(CloseReason::KeepaliveTimeout),
                        }
                    }
                    Ok(()) => Ok(()),
                };
            }
            Event::Stop => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Ok(()));
            }
            Event::Check => {
                let now = tokio::time::Instant::now();
                let started_any = state.requests.load(Ordering::Relaxed) > 0;
                if let Some(by) = first_request_by {
                    if started_any {
                        first_request_by = None;
                    } else if now >= by {
                        tracing::debug!(%peer, "closing an HTTP/2 connection that sent no request in time");
                        return Err(CloseReason::NoRequest);
                    }
                }
                let waited = stall.observe(state.writes.load(Ordering::Relaxed), now);
                let stream_waited = match protocol {
                    Protocol::Http1 => Duration::ZERO,
                    Protocol::Http2 => state.longest_stream_stall(now),
                };
                // A graceful close that cannot end though nothing is in flight: HTTP/2 keeps a
                // finished stream's last bytes queued behind a window the client keeps shut.
                drained_since = match (&closing, state.in_flight.load(Ordering::Relaxed)) {
                    (Some(_), 0) => Some(drained_since.unwrap_or(now)),
                    _ => None,
                };
                let undrained =
                    drained_since.map_or(Duration::ZERO, |since| now.duration_since(since));
                if waited >= options.send_timeout
                    || stream_waited >= options.h2_stall_timeout
                    || undrained >= options.send_timeout
                {
                    // No graceful close: it would have to get past the very bytes that wait.
                    tracing::debug!(
                        %peer,
                        ?waited,
                        ?stream_waited,
                        ?undrained,
                        "closing a connection whose client stopped reading"
                    );
                    state.client.closing(CloseReason::SendTimeout.as_str());
                    return Err(CloseReason::SendTimeout);
                }
                let activity = state.activity();
                if activity != seen || state.in_flight.load(Ordering::Relaxed) > 0 {
                    (seen, quiet_since) = (activity, now);
                } else if closing.is_none()
                    && now.duration_since(quiet_since) >= options.idle_timeout
                {
                    tracing::debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Err(CloseReason::IdleTimeout));
                }
                let mut next = now + sample;
                if let Some(by) = first_request_by {
                    next = next.min(by);
                }
                check.as_mut().reset(next);
            }
        }
    }
}

/// The watchdog's view of a connection's writes: which waiting write it has seen, and since
/// when.
#[derive(Debug, Default)]
struct SendStall(Option<(u64, tokio::time::Instant)>);

impl SendStall {
    /// Notes [`ConnState::writes`] as sampled at `now`; how long the write waiting now has been
    /// seen waiting (zero when none waits, or it was not waiting at the last sample).
    fn observe(&mut self, writes: u64, now: tokio::time::Instant) -> Duration {
        if writes & WRITE_WAITING == 0 {
            self.0 = None;
            return Duration::ZERO;
        }
        match self.0 {
            Some((seen, since)) if seen == writes => now.duration_since(since),
            _ => {
                self.0 = Some((writes, now));
                Duration::ZERO
            }
        }
    }
}

/// What woke [`drive`].
enum Event {
    Ended(Result<(), crate::http::body::BoxError>),
    Stop,
    Check,
}

/// A waker for the futures a connection's driver polls beside the connection itself (its stop
/// signal, its idle timer): waking it marks them due and wakes the driver's task, so that the
/// connection's own wake-ups (reads, writes, the upstream's answer: several per request) do
/// not poll them too. `tokio::select!` polls every branch on every wake-up, which cost about a
/// thousand instructions per request.
struct SideWaker {
    shared: Arc<Side>,
    waker: std::task::Waker,
}

struct Side {
    due: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Side {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl SideWaker {
    /// Due at first, so the side futures are polled (and armed) on the first turn.
    fn new() -> Self {
        let shared = Arc::new(Side {
            due: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(shared.clone());
        Self { shared, waker }
    }

    /// Remembers the task to wake (each turn: a task's waker may change).
    fn register(&self, cx: &Context<'_>) {
        self.shared.task.register(cx.waker());
    }

    /// Whether the side futures woke since they were last polled; clears the mark.
    fn due(&self) -> bool {
        self.shared.due.swap(false, Ordering::AcqRel)
    }

    /// Marks the side futures due.
    fn mark_due(&self) {
        self.shared.due.store(true, Ordering::Release);
    }

    /// The context to poll the side futures with.
    fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

/// A connection that can be closed gracefully (hyper-util's own trait is sealed).
pub trait GracefulShutdown {
    /// Starts a graceful shutdown: HTTP/1 closes after the response in flight, HTTP/2 sends
    /// GOAWAY and lets open streams finish.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulShutdown for auto::Connection<'static, I, S, E>
where
    auto::Connection<'static, I, S, E>: Future,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<crate::http::body::BoxError>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<crate::http::body::BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::Connection::graceful_shutdown(self);
    }
}

/// Adds what the connection knows (peer address, certificate identity) to each request, and
/// tracks the request until its response body ends.
fn per_request<S>(
    service: S,
    peer: ClientAddr,
    identity: Option<PeerIdentity>,
    state: Arc<ConnState>,
    protocol: Protocol,
) -> TowerToHyperService<
    impl Service<Request<Incoming>, Response = Response<Guarded>, Error = Infallible, Future: Send>
    + Clone,
>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let service = service
        .map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(peer.clone());
            if let Some(identity) = &identity {
                req.extensions_mut().insert(identity.clone());
            }
            req
        })
        .map_future(move |future: S::Future| {
            let guard = state.started();
            async move {
                let Ok(response) = future.await;
                // HTTP/1.1 needs no watch: a response it cannot send waits at the socket.
                let stream = (protocol == Protocol::Http2).then(|| guard.0.watch_stream());
                Ok::<_, Infallible>(response.map(|inner| Guarded {
                    inner,
                    guard: Some(guard),
                    stream,
                }))
            }
        });
    TowerToHyperService::new(service)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A closed channel means the owner is gone: stop as well.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Why a connection's first bytes did not say its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrefaceError {
    /// Not enough bytes within `server.header_timeout`.
    TimedOut,
    /// The client closed the connection (or it failed) first.
    Closed,
}

/// Reads a connection's first bytes, within `timeout`, until it is clear whether they are the
/// HTTP/2 preface (prior knowledge) or an HTTP/1 request; returns the protocol and the bytes
/// read, which [`Rewind`] hands to hyper first. Reading (not peeking) matters: a peek does not
/// clear the socket's readiness, so waiting for more bytes after a partial preface would spin.
async fn read_preface(
    stream: &TcpStream,
    timeout: Duration,
) -> Result<(Protocol, Vec<u8>), PrefaceError> {
    let read = async {
        let mut buf = Vec::with_capacity(H2_PREFACE.len());
        loop {
            stream.readable().await.map_err(|_| PrefaceError::Closed)?;
            let mut chunk = [0u8; H2_PREFACE.len()];
            let want = H2_PREFACE.len() - buf.len();
            match stream.try_read(&mut chunk[..want]) {
                Ok(0) => return Err(PrefaceError::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(PrefaceError::Closed),
            }
            if buf[..] != H2_PREFACE[..buf.len()] {
                return Ok((Protocol::Http1, buf));
            }
            if buf.len() == H2_PREFACE.len() {
                return Ok((Protocol::Http2, buf));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(PrefaceError::TimedOut))
}

/// A connection's byte stream that notes in its [`ConnState`] when the client's bytes were last
/// read, so that a close by hyper's header timer can be told idle or slow, and when a write
/// starts and stops waiting for the client, for `server.send_timeout`.
struct Watched<T: Tcp> {
    inner: T,
    state: Arc<ConnState>,
    /// How many times a write has had to wait.
    waits: u64,
    /// Whether the last write (or flush) waited.
    waiting: bool,
}

impl<T: Tcp> Watched<T> {
    fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            waits: 0,
            waiting: false,
        }
    }

    /// Publishes a write's outcome when it changes whether one waits: a write that goes
    /// straight through after one that did too costs a comparison.
    fn wrote(&mut self, pending: bool) {
        if pending != self.waiting {
            self.waiting = pending;
            self.waits += u64::from(pending);
            let writes = (self.waits << 1) | u64::from(pending);
            self.state.writes.store(writes, Ordering::Relaxed);
        }
    }
}

impl<T: Tcp + AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TLS: a flush writes the records the session holds, and waits like a write.
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TLS: the close_notify record is a write too, and can wait on a client that does not
        // read (past an idle close or a drain, where nothing else bounds it).
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.wrote(polled.is_pending());
        polled
    }
}

impl<T: Tcp> Drop for Watched<T> {
    fn drop(&mut self) {
        // Cut off for `send_timeout`: reset rather than closed. Its client reads nothing, and a
        // graceful close would leave the unread bytes in the kernel's send buffer (up to
        // `tcp_wmem`'s maximum, megabytes) for as long as TCP retries. nginx's
        // `reset_timedout_connection`.
        if self.state.client.closed_for().is_some()
            && let Some(tcp) = self.inner.tcp()
        {
            let _ = tcp.set_zero_linger();
        }
    }
}

/// The TCP socket under a connection's byte stream.
trait Tcp {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Tcp for Rewind<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(&self.inner)
    }
}

impl Tcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
}

impl<T: Tcp + AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            let activity = this.state.activity();
            this.state.read_at.store(activity, Ordering::Relaxed);
        }
        polled
    }
}

/// A stream that yields `prefix` before reading from `inner`; writes go straight through.
pub struct Rewind<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Rewind<T> {
    /// `prefix` was read from `inner` already.
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// Writes go straight to the inner stream.
impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn conn_state() -> ConnState {
        ConnState::new(ClientAddr::new(SocketAddr::from(([127, 0, 0, 1], 1))))
    }

    /// A write that waits is seen waiting from the first sample that finds it; a write that
    /// went through, or a new wait, starts the count again.
    #[test]
    fn a_send_stall_is_one_write_waiting_across_samples() {
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut stall = SendStall::default();
        assert_eq!(stall.observe(0, at(0)), Duration::ZERO);
        // The first wait (waits = 1): seen at 100 ms, still there at 400 ms.
        assert_eq!(stall.observe(0b11, at(100)), Duration::ZERO);
        assert_eq!(stall.observe(0b11, at(400)), Duration::from_millis(300));
        // It went through and another write waits (waits = 2): a new stall.
        assert_eq!(stall.observe(0b101, at(500)), Duration::ZERO);
        assert_eq!(stall.observe(0b101, at(900)), Duration::from_millis(400));
        // Nothing waits: the count is gone.
        assert_eq!(stall.observe(0b100, at(1000)), Duration::ZERO);
        assert_eq!(stall.observe(0b111, at(1100)), Duration::ZERO);
    }

    /// An HTTP/2 stream owed a poll stalls from when the watchdog first sees it; one hyper keeps
    /// taking frames from does not; ended ones are forgotten.
    #[test]
    fn a_stream_owed_a_poll_stalls_and_ended_ones_are_forgotten() {
        let state = conn_state();
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let shut = state.watch_stream();
        let mut flowing = state.watch_stream();
        assert_eq!(state.longest_stream_stall(at(0)), Duration::ZERO);
        flowing.polled();
        flowing.handed();
        assert_eq!(
            state.longest_stream_stall(at(500)),
            Duration::from_millis(500)
        );
        drop(shut);
        // Taken, and polled again: owed nothing.
        flowing.polled();
        assert_eq!(state.longest_stream_stall(at(1000)), Duration::ZERO);
        assert_eq!(state.streams.lock().unwrap().len(), 1);
        // Handed a frame and never polled since: the same word, seen for 700 ms.
        flowing.handed();
        assert_eq!(state.longest_stream_stall(at(1100)), Duration::ZERO);
        assert_eq!(
            state.longest_stream_stall(at(1800)),
            Duration::from_millis(700)
        );
        drop(flowing);
        assert_eq!(state.longest_stream_stall(at(1900)), Duration::ZERO);
        assert!(state.streams.lock().unwrap().is_empty());
    }

    /// A stream whose writes (and flushes) wait while `open` is false, and whose close waits
    /// while `shut` is.
    struct Gate {
        open: bool,
        shut: bool,
    }

    impl Tcp for Gate {
        fn tcp(&self) -> Option<&TcpStream> {
            None
        }
    }

    impl AsyncWrite for Gate {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.open {
                true => Poll::Ready(Ok(buf.len())),
                false => Poll::Pending,
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.open {
                true => Poll::Ready(Ok(())),
                false => Poll::Pending,
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.shut {
                true => Poll::Ready(Ok(())),
                false => Poll::Pending,
            }
        }
    }

    /// The word [`Watched`] publishes: changed only when a write starts or stops waiting, and
    /// different for each wait.
    #[test]
    fn watched_writes_publish_each_wait_once() {
        let state = Arc::new(ConnState::new(ClientAddr::new(SocketAddr::from((
            [127, 0, 0, 1],
            1,
        )))));
        let mut io = Watched::new(
            Gate {
                open: true,
                shut: true,
            },
            state.clone(),
        );
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let writes = || state.writes.load(Ordering::Relaxed);
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"a").is_ready());
        assert_eq!(writes(), 0);
        io.inner.open = false;
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"b").is_pending());
        assert_eq!(writes(), 0b11);
        // Still the same wait.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(writes(), 0b11);
        io.inner.open = true;
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(writes(), 0b10);
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"c").is_ready());
        assert_eq!(writes(), 0b10);
        io.inner.open = false;
        let bufs = [io::IoSlice::new(b"d")];
        assert!(
            Pin::new(&mut io)
                .poll_write_vectored(&mut cx, &bufs)
                .is_pending()
        );
        assert_eq!(writes(), 0b101);
        // A close waits like a write.
        io.inner.open = true;
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"e").is_ready());
        assert_eq!(writes(), 0b100);
        io.inner.shut = false;
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_pending());
        assert_eq!(writes(), 0b111);
    }

    /// The side futures are polled on their own wake-ups (and at first), never on the task's.
    #[tokio::test(start_paused = true)]
    async fn a_side_waker_marks_only_its_own_wake_ups() {
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = std::task::Waker::from(count.clone());
        let side = SideWaker::new();
        side.register(&Context::from_waker(&task));
        assert!(side.due(), "due at first, to arm the side futures");
        assert!(!side.due(), "the mark is cleared when read");
        task.wake_by_ref();
        assert!(
            !side.due(),
            "the connection's own wake-up is not the side futures'"
        );
        // A timer polled with the side context wakes the task through it.
        let sleep = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(sleep);
        assert!(sleep.as_mut().poll(&mut side.context()).is_pending());
        assert!(!side.due());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(side.due(), "the timer marked the side futures due");
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "and woke the task");
        assert!(sleep.as_mut().poll(&mut side.context()).is_ready());
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_on() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut rewound = Rewind::new(b"hello".to_vec(), server);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn the_preface_decides_the_protocol() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for (sent, expected) in [
            (H2_PREFACE, Ok(Protocol::Http2)),
            (&b"GET / HTTP/1.1\r\n"[..], Ok(Protocol::Http1)),
            (&b"PRI * HTTP/1.1\r\n"[..], Ok(Protocol::Http1)),
            (&b""[..], Err(PrefaceError::Closed)),
            (&H2_PREFACE[..16], Err(PrefaceError::Closed)),
        ] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            // In pieces: a partial preface waits for more.
            for piece in sent.chunks(5) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            drop(client);
            let got = read_preface(&server, Duration::from_secs(2)).await;
            assert_eq!(
                got.as_ref().map(|(p, _)| *p).map_err(|e| *e),
                expected,
                "{sent:?}"
            );
            if let Ok((_, prefix)) = got {
                assert!(sent.starts_with(&prefix) && !prefix.is_empty());
            }
        }
        // A partial preface from a client that stays: cut off at the deadline.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(&H2_PREFACE[..16]).await.unwrap();
        let got = read_preface(&server, Duration::from_millis(100)).await;
        assert_eq!(got, Err(PrefaceError::TimedOut));
    }
}
