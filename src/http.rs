//! The optional "http" thread: serves `/metrics` (Prometheus text), `/healthz` and `/readyz`. It
//! blocks waiting for requests; nothing runs while nobody scrapes. tiny_http accepts connections
//! on threads of its own (one acceptor, a small pool, all blocked while idle), which we cannot
//! name or join; they exist only when the endpoint is enabled.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Sender;
use log::{debug, info};
use tiny_http::{Header, Method, Response, Server};

use crate::event::Event;
use crate::metrics::Metrics;
use crate::thread::ThreadHandle;

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen for metrics on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the http thread")]
    Spawn(#[source] io::Error),
}

/// The running "http" thread and the address it serves.
pub struct HttpServer {
    thread: ThreadHandle,
    #[cfg_attr(not(test), allow(dead_code))]
    address: SocketAddr,
}

impl HttpServer {
    /// Listens on `address` and answers from `metrics`; a panic is reported to `events`.
    pub fn start(
        address: SocketAddr,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
    ) -> Result<HttpServer, HttpError> {
        let server = Arc::new(
            Server::http(address).map_err(|source| HttpError::Listen { address, source })?,
        );
        // Port 0 asks for any free port; report the one we got.
        let address = server.server_addr().to_ip().unwrap_or(address);
        let serving = Arc::clone(&server);
        let thread = ThreadHandle::spawn(
            "http",
            events,
            move || {
                for request in serving.incoming_requests() {
                    let response = answer(request.method(), request.url(), &metrics);
                    if let Err(e) = request.respond(response) {
                        debug!("could not answer an HTTP request: {e}");
                    }
                }
            },
            move || server.unblock(),
        )
        .map_err(HttpError::Spawn)?;
        info!("serving /metrics, /healthz and /readyz on http://{address}");
        Ok(HttpServer { thread, address })
    }

    /// Where it listens (the port chosen, if 0 was asked for).
    #[cfg(test)]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops answering and waits for the thread.
    pub fn stop(self) {
        self.thread.stop();
    }
}

fn answer(method: &Method, url: &str, metrics: &Metrics) -> Response<io::Cursor<Vec<u8>>> {
    let path = url.split('?').next().unwrap_or(url);
    let (status, content_type, body) = match (method, path) {
        (Method::Get | Method::Head, "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (Method::Get | Method::Head, "/healthz") => (200, "text/plain", "ok\n".to_owned()),
        (Method::Get | Method::Head, "/readyz") => match metrics.ready() {
            Ok(()) => (200, "text/plain", "ready\n".to_owned()),
            Err(reason) => (503, "text/plain", format!("not ready: {reason}\n")),
        },
        (Method::Get | Method::Head, _) => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (405, "text/plain", "only GET and HEAD\n".to_owned()),
    };
    let header =
        Header::from_bytes("Content-Type", content_type).expect("a static header is valid");
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header)
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
        let server =
            HttpServer::start("127.0.0.1:0".parse().unwrap(), Arc::clone(&metrics), events)
                .unwrap();
        let address = server.address();
        assert_ne!(address.port(), 0);
        assert_eq!(get(address, "/healthz"), (200, "ok\n".to_owned()));
        metrics.track("example.com/kvm");
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
        // Returns once our thread has ended; tiny_http closes its listener on a thread of its own.
        server.stop();
    }
}
