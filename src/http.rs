//! The optional "http" thread and its two "http-N" workers: `/metrics` (Prometheus text),
//! `/healthz` and `/readyz` over HTTP/1.0-style one-request connections. The "http" thread
//! accepts and hands connections to the workers through a bounded queue; all three block while
//! nobody scrapes.
//!
//! Whoever can reach the port can open connections, so everything a client can make us hold is
//! bounded: three threads, a queue of `QUEUE` connections (more are closed at once), a request of
//! `MAX_REQUEST` bytes and `DEADLINE` per connection, idle or slow ones included. A flood leaves
//! threads and memory where they were and never touches device serving; scrapes during it may be
//! refused, which Prometheus and the kubelet's probes retry. Written here rather than taken from
//! a crate: the well-kept synchronous servers (tiny_http among them) start a thread per
//! connection, and three routes need no more than this.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, info};

use crate::event::Event;
use crate::metrics::Metrics;
use crate::thread::ThreadHandle;

/// Workers answering requests; scrapes are rare and answers take microseconds.
const WORKERS: usize = 2;
/// Accepted connections waiting for a worker; beyond this they are closed unanswered.
const QUEUE: usize = 16;
/// The longest request head we read; our routes need one line.
const MAX_REQUEST: usize = 8 * 1024;
/// How long one connection may take, from accept to the last byte of the answer, its time in
/// the queue included: a flood of idle connections is gone from the queue within this.
const DEADLINE: Duration = Duration::from_secs(2);

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen for metrics on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the http threads")]
    Spawn(#[source] io::Error),
}

/// The running "http" threads and the address they serve.
pub struct HttpServer {
    /// The acceptor first: stopping it closes the queue, which ends the workers.
    threads: Vec<ThreadHandle>,
    #[cfg_attr(not(test), allow(dead_code))]
    address: SocketAddr,
}

impl HttpServer {
    /// Listens on `address` and answers from `metrics`; a panic is reported to `events`.
    pub fn start(
        address: SocketAddr,
        metrics: &Arc<Metrics>,
        events: &Sender<Event>,
    ) -> Result<HttpServer, HttpError> {
        let listener =
            TcpListener::bind(address).map_err(|source| HttpError::Listen { address, source })?;
        // Port 0 asks for any free port; report the one we got.
        let address = listener.local_addr().unwrap_or(address);
        let (queue, work) = crossbeam_channel::bounded::<Accepted>(QUEUE);
        let mut threads = Vec::with_capacity(WORKERS + 1);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stopping);
        let acceptor = ThreadHandle::spawn(
            "http",
            events.clone(),
            move || accept(&listener, &queue, &stopping),
            move || {
                stop_flag.store(true, Ordering::SeqCst);
                // Wakes the blocked accept; it sees the flag and ends, closing the queue.
                let _ = TcpStream::connect_timeout(&wake_address(address), DEADLINE);
            },
        )
        .map_err(HttpError::Spawn)?;
        threads.push(acceptor);
        for i in 0..WORKERS {
            let (work, metrics) = (work.clone(), Arc::clone(metrics));
            let worker = ThreadHandle::spawn(
                &format!("http-{i}"),
                events.clone(),
                move || serve(&work, &metrics),
                || {},
            )
            .map_err(HttpError::Spawn)?;
            threads.push(worker);
        }
        info!("serving /metrics, /healthz and /readyz on http://{address}");
        Ok(HttpServer { threads, address })
    }

    /// Where it listens (the port chosen, if 0 was asked for).
    #[cfg(test)]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops answering and waits for the threads.
    pub fn stop(self) {
        for thread in self.threads {
            thread.stop();
        }
    }
}

/// Where to connect to reach our own listener: the unspecified address means any local one.
fn wake_address(mut address: SocketAddr) -> SocketAddr {
    if address.ip().is_unspecified() {
        let loopback: std::net::IpAddr = if address.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        address.set_ip(loopback);
    }
    address
}

/// A connection and when it must be done.
type Accepted = (TcpStream, Instant);

/// The "http" thread: accepts, and queues what the workers can take.
fn accept(listener: &TcpListener, queue: &Sender<Accepted>, stopping: &AtomicBool) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => match queue.try_send((stream, Instant::now() + DEADLINE)) {
                Ok(()) => {}
                // Dropping the stream closes it: the client sees the connection end.
                Err(TrySendError::Full(_)) => debug!("metrics connections queue full; closing one"),
                Err(TrySendError::Disconnected(_)) => return,
            },
            // Out of descriptors, a connection reset before accept: the next one may do.
            Err(e) => debug!("cannot accept a metrics connection: {e}"),
        }
    }
}

/// An "http-N" worker: answers queued connections until the queue closes.
fn serve(work: &Receiver<Accepted>, metrics: &Metrics) {
    for (mut stream, deadline) in work {
        if let Err(e) = answer_connection(&mut stream, deadline, metrics) {
            debug!("metrics connection ended early: {e}");
        }
    }
}

/// Reads one request head within the deadline and answers it.
fn answer_connection(
    stream: &mut TcpStream,
    deadline: Instant,
    metrics: &Metrics,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                stream,
                deadline,
                431,
                "text/plain",
                "request too large\n",
                true,
            );
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = route(method, target, metrics);
    respond(
        stream,
        deadline,
        status,
        content_type,
        &body,
        method != "HEAD",
    )
}

fn respond(
    stream: &mut TcpStream,
    deadline: Instant,
    status: u16,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)?;
    stream.flush()
}

fn route(method: &str, target: &str, metrics: &Metrics) -> (u16, &'static str, String) {
    let path = target.split('?').next().unwrap_or(target);
    if method != "GET" && method != "HEAD" {
        return (405, "text/plain", "only GET and HEAD\n".to_owned());
    }
    match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        "/readyz" => match metrics.ready() {
            Ok(()) => (200, "text/plain", "ready\n".to_owned()),
            Err(reason) => (503, "text/plain", format!("not ready: {reason}\n")),
        },
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn get(address: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(address).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[test]
    fn serves_metrics_health_and_readiness() {
        let metrics = Arc::new(Metrics::new());
        let (events, _rx) = crossbeam_channel::unbounded();
        let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), &metrics, &events).unwrap();
        let address = server.address();
        assert_ne!(address.port(), 0);
        assert_eq!(get(address, "/healthz"), (200, "ok\n".to_owned()));
        assert_eq!(
            get(address, "/readyz").0,
            503,
            "ready before anything is set up"
        );
        metrics.track("example.com/kvm", "sent the kubelet its device list");
        metrics.started();
        let (status, body) = get(address, "/readyz");
        assert_eq!(
            (status, body.as_str()),
            (
                503,
                "not ready: example.com/kvm is not registered with the kubelet\n"
            )
        );
        metrics.registered("example.com/kvm");
        metrics.listed("example.com/kvm");
        assert_eq!(get(address, "/readyz").0, 200);
        let (status, body) = get(address, "/metrics");
        assert_eq!(status, 200);
        assert!(
            body.contains(r#"kdp_registrations_total{resource="example.com/kvm"} 1"#),
            "{body}"
        );
        assert_eq!(get(address, "/nope").0, 404);
        server.stop();
        assert!(TcpStream::connect(address).is_err(), "still listening");
    }

    #[test]
    fn idle_and_oversized_connections_cannot_hold_the_workers() {
        let metrics = Arc::new(Metrics::new());
        let (events, _rx) = crossbeam_channel::unbounded();
        let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), &metrics, &events).unwrap();
        let address = server.address();
        // More idle connections than workers and queue together.
        let idle: Vec<TcpStream> = (0..WORKERS + QUEUE + 20)
            .map(|_| TcpStream::connect(address).unwrap())
            .collect();
        // Each is answered or closed within the deadline; a request after them is answered.
        let started = Instant::now();
        for mut stream in idle {
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
        assert!(started.elapsed() < DEADLINE * 2, "{:?}", started.elapsed());
        assert_eq!(get(address, "/healthz").0, 200);
        // A head larger than we read is refused, not buffered.
        let mut big = TcpStream::connect(address).unwrap();
        let _ = big.write_all(&vec![b'a'; MAX_REQUEST * 2]);
        let mut text = String::new();
        let _ = big.read_to_string(&mut text);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{text}"
        );
        server.stop();
    }
}
