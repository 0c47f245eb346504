//! Serving the admin API with bounded connections (the accept loop `axum::serve` would
//! run, plus the limits it lacks).
//!
//! - `admin.header_read_timeout`: a connection must deliver a request's headers within
//!   this time after it opens or after its previous response, or hyper closes it. A
//!   client that connects and sends nothing (slowloris) holds its descriptor that long.
//! - `TCP_DEFER_ACCEPT` on the listener (about `header_read_timeout`): a connection that
//!   has sent nothing waits in the kernel, so it reaches `accept` with its request and a
//!   client that sends a moment after connecting is never evicted below as idle. Holds
//!   for [`ACCEPT_BACKLOG`] such connections; beyond, the kernel's SYN cookies are not
//!   deferred and eviction alone bounds them.
//! - `admin.max_connections`: at the cap, the oldest connection with no request in
//!   progress is closed to make room for the new one (so a liveness probe still gets in
//!   while idle connections pile up); when every connection is busy for [`ROOM_WAIT`],
//!   the new one is closed. Either way the process holds at most the cap (plus at most
//!   [`CLOSING_SLACK`] evicted connections still closing).
//!
//! - Out of descriptors (`accept` fails with EMFILE: something beyond its share, or a
//!   limit lowered under the running process), the accept spends one of the admin API's
//!   spare descriptors (`fdbudget::admin_spare`), so `/healthz` still gets in; the spare
//!   is refilled as connections close. With no spare left, the oldest idle connection is
//!   closed to make way.
//!
//! Closed connections are counted in `mediagate_admin_connections_closed{reason}`.

use crate::metrics::{Metrics, child, labels};
use crate::ratelog::RateLimit;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Evicted connections that may still be closing when a new one is accepted: lets the
/// accept loop keep pace with a flood of connections (a full accept queue delays
/// everyone's connect, a liveness probe's too) at the cost of a few descriptors.
const CLOSING_SLACK: usize = 8;

/// How long a new connection waits, at the cap, for one of the open ones to become idle
/// (or close) before it is refused.
const ROOM_WAIT: Duration = Duration::from_millis(250);

/// Connections the kernel may queue for the admin listener (capped by
/// `net.core.somaxconn`): deferred ones (see [`serve`]) wait in this queue, so it is
/// larger than tokio's default of 1024. Beyond it the kernel answers with SYN cookies,
/// whose connections are not deferred.
const ACCEPT_BACKLOG: i32 = 4096;

/// Binds the admin listener.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = crate::sockio::bind_tcp_listener(addr, ACCEPT_BACKLOG)?;
    sock.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(sock)
}

/// The limits of the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Marks a response whose body is a long-lived stream (`GET /events`): its connection
/// counts as busy until the body ends, so it is never evicted as idle.
#[derive(Clone, Copy, Debug)]
pub struct Streaming;

/// A response body that keeps its connection busy while it lives.
struct HeldBody {
    inner: axum::body::Body,
    _busy: Busy,
}

impl axum::body::HttpBody for HeldBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One open connection as the accept loop sees it.
struct Conn {
    id: u64,
    /// Requests in progress on it.
    busy: Arc<AtomicUsize>,
    /// Fired to close it (evicted).
    close: CancellationToken,
    /// Its socket, to see whether a request is waiting to be read. Valid while the entry
    /// is in the table: the task removes the entry before it closes the socket.
    fd: std::os::fd::RawFd,
}

impl Conn {
    /// Neither a request in progress nor bytes of one waiting in the socket: a connection
    /// that just arrived with its request is not taken for an idle one.
    fn idle(&self) -> bool {
        if self.busy.load(Ordering::Acquire) > 0 {
            return false;
        }
        let mut b = [0u8; 1];
        let waiting = nix::sys::socket::recv(
            self.fd,
            &mut b,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        );
        !matches!(waiting, Ok(n) if n > 0)
    }
}

/// Open connections, oldest first.
#[derive(Default)]
struct Table {
    conns: Mutex<VecDeque<Conn>>,
    /// Connections whose descriptor is still open (an evicted one leaves `conns` at once
    /// but closes when its task next runs).
    open: AtomicUsize,
    /// Signalled when a connection's descriptor closed.
    closed: tokio::sync::Notify,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for one more connection under `max`: Ok(evicted one) or Err (all busy).
    fn make_room(&self, max: usize) -> Result<bool, ()> {
        let mut conns = self.lock();
        if conns.len() < max {
            return Ok(false);
        }
        match conns.iter().position(Conn::idle) {
            Some(i) => {
                if let Some(c) = conns.remove(i) {
                    c.close.cancel();
                }
                Ok(true)
            }
            None => Err(()),
        }
    }

    /// Closes the oldest idle connection, if any.
    fn evict_idle(&self) -> bool {
        let mut conns = self.lock();
        match conns.iter().position(Conn::idle) {
            Some(i) => {
                if let Some(c) = conns.remove(i) {
                    c.close.cancel();
                }
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: u64) {
        let mut conns = self.lock();
        if let Some(i) = conns.iter().position(|c| c.id == id) {
            conns.remove(i);
        }
    }
}

/// Counts a request in progress on its connection while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(n: &Arc<AtomicUsize>) -> Busy {
        n.fetch_add(1, Ordering::AcqRel);
        Busy(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` within `limits` until `stop` fires; then in-flight
/// requests finish (connections close after their response).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    stop: CancellationToken,
) {
    // Idle connections wait in the kernel first: one whose request comes late (a stalled
    // client thread) then reaches `accept` with its request, never as an idle one to evict.
    let defer = limits.header_read_timeout.as_secs_f64().ceil().max(1.0) as u32;
    if let Err(e) = crate::sockio::set_defer_accept(listener.as_raw_fd(), defer) {
        tracing::warn!(error = %e, "admin API: TCP_DEFER_ACCEPT not set");
    }
    let table = Arc::new(Table::default());
    let closed = |reason| child(&metrics.admin_closed, &labels(&[("reason", reason)]));
    let (evicted, refused, timed_out) = (
        closed("evicted"),
        closed("refused"),
        closed("header_timeout"),
    );
    let accept_log = RateLimit::new("admin_accept", Duration::from_secs(10), 5);
    let spare = crate::fdbudget::admin_spare();
    spare.refill();
    let mut next_id = 0u64;
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) if crate::fdbudget::is_out_of_descriptors(&e) && spare.release() => {
                    // Out of descriptors: a spare's number goes to the connection waiting,
                    // accepted on the next turn (the kernel takes the number before it
                    // looks at the queue, so an empty queue also lands here: the number
                    // then waits for the next connection). The spare comes back when a
                    // connection closes.
                    if accept_log.allow() {
                        tracing::warn!(error = %e, spare_left = spare.held(), "admin API: out of descriptors; accepting with a spare one");
                    }
                    continue;
                }
                Err(e) => {
                    // Out of descriptors and spares: an idle connection makes way, and we
                    // wait for descriptors to come back instead of spinning.
                    if crate::fdbudget::is_out_of_descriptors(&e) && table.evict_idle() {
                        evicted.inc();
                    }
                    if accept_log.allow() {
                        tracing::warn!(error = %e, "admin API: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let mut made = table.make_room(limits.max_connections);
        let give_up = tokio::time::Instant::now() + ROOM_WAIT;
        while made.is_err() && tokio::time::Instant::now() < give_up {
            // Connections this loop just accepted may have bytes waiting that their tasks
            // have not had a turn to read yet: give them one, then look again.
            tokio::time::sleep(Duration::from_millis(2)).await;
            made = table.make_room(limits.max_connections);
        }
        match made {
            Ok(false) => {}
            Ok(true) => {
                evicted.inc();
            }
            Err(()) => {
                refused.inc();
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                continue;
            }
        }
        // Hold the cap on open descriptors, not only on the table: evicted connections
        // close when their task next runs; at most CLOSING_SLACK of them may still be
        // closing, beyond that wait (briefly) for them. This also lets connections that
        // just arrived read their request before the next eviction.
        let most = limits.max_connections + CLOSING_SLACK;
        let room = async {
            while table.open.load(Ordering::Acquire) >= most {
                let closed = table.closed.notified();
                if table.open.load(Ordering::Acquire) < most {
                    break;
                }
                closed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(1), room)
            .await
            .is_err()
        {
            refused.inc();
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            continue;
        }
        table.open.fetch_add(1, Ordering::AcqRel);
        next_id += 1;
        let id = next_id;
        let busy = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        table.lock().push_back(Conn {
            id,
            busy: busy.clone(),
            close: close.clone(),
            fd: stream.as_raw_fd(),
        });
        metrics.admin_connections.inc();
        let svc = TowerToHyperService::new(router.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = Busy::enter(&busy);
            let fut = hyper::service::Service::call(&svc, req);
            async move {
                let r = fut.await;
                match r {
                    Ok(resp) if resp.extensions().get::<Streaming>().is_some() => {
                        Ok(resp.map(|inner| {
                            axum::body::Body::new(HeldBody {
                                inner,
                                _busy: guard,
                            })
                        }))
                    }
                    r => {
                        drop(guard);
                        r
                    }
                }
            }
        });
        let (table, stop, metrics, timed_out) = (
            table.clone(),
            stop.clone(),
            metrics.clone(),
            timed_out.clone(),
        );
        tokio::spawn(async move {
            let mut conn = Box::pin(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(TokioIo::new(stream), service),
            );
            let result = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = close.cancelled() => None,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await.ok()
                }
            };
            if let Some(Err(e)) = result
                && e.is_timeout()
            {
                timed_out.inc();
            }
            // Out of the table first: `Conn::idle` may read the socket while it is listed.
            table.remove(id);
            drop(conn); // closes the descriptor
            // A spare spent on an accept takes the number back (no-op when all held).
            crate::fdbudget::admin_spare().refill();
            table.open.fetch_sub(1, Ordering::AcqRel);
            table.closed.notify_waiters();
            metrics.admin_connections.dec();
        });
    }
}
