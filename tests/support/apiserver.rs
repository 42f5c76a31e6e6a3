//! A fake Kubernetes API server for DRA mode, over real TLS with a CA of its own on the loopback:
//! it stores ResourceSlices and ResourceClaims as the API server's JSON, lists slices by field
//! selector, streams watch events from a resourceVersion, refuses a stale update with 409 and a
//! wrong token with 401, pages lists by `limit` and `continue`, drops device taints and throttles
//! slice writes (429 with Retry-After) when told to, and records every request and its time. Like the real one it assigns names from
//! `generateName`, resourceVersions and UIDs. One thread accepts; each connection has its own.
//! Faults on demand: any answer code for the next requests matching a method and path, a
//! watch that ends with 410 Expired, a token that rotates, and the server going away
//! (connections cut, port closed) and coming back on the same address with what it held.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{json, Value};

use super::WAIT;

const TOKEN: &str = "fake-service-account-token";
const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";
const CLAIMS: &str = "/apis/resource.k8s.io/v1/namespaces/";
const NODES: &str = "/api/v1/nodes/";

/// What the API server holds, and what it was asked.
#[derive(Default)]
pub struct State {
    resource_version: u64,
    /// ResourceSlices by name.
    pub slices: BTreeMap<String, Value>,
    /// ResourceClaims by `namespace/name`.
    pub claims: BTreeMap<String, Value>,
    /// Nodes by name; none unless a test adds one.
    pub nodes: BTreeMap<String, Value>,
    /// Every request, as `METHOD path?query`.
    pub requests: Vec<String>,
    /// When each request came, beside `requests`.
    pub request_times: Vec<Instant>,
    /// Drops every device's `taints` from slices it creates or updates, as an API server with the
    /// DRADeviceTaints feature gate off does (and answers with what it stored).
    pub drop_device_taints: bool,
    /// Answers this many slice writes with 429 and `Retry-After: <throttle_seconds>`, as the
    /// API server's priority and fairness does when a flow is over its share.
    pub throttle_writes: usize,
    pub throttle_seconds: u64,
    /// Answers the next requests that match each fault with its code instead of serving them.
    pub faults: Vec<Fault>,
    /// Answers this many watches with an ERROR event, 410 Expired, as the API server does when
    /// the resourceVersion asked for has been compacted away.
    pub expire_watches: usize,
    /// The bearer token it accepts; `FakeApiServer::rotate_token` changes it.
    token: String,
    /// Every slice event, with the resourceVersion it happened at, for watches to resume from.
    events: Vec<(u64, Value)>,
    watchers: Vec<Sender<Value>>,
}

/// Requests to answer with `code`: those whose method is `method` (any, if empty) and whose
/// path starts with `path`, `times` of them.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: &'static str,
    pub path: String,
    pub code: u16,
    pub times: usize,
}

impl State {
    /// Takes the fault that `request` meets, if any.
    fn fault_for(&mut self, method: &str, path: &str) -> Option<u16> {
        let fault = self.faults.iter_mut().find(|f| {
            f.times > 0 && (f.method.is_empty() || f.method == method) && path.starts_with(&f.path)
        })?;
        fault.times -= 1;
        Some(fault.code)
    }

    /// The devices of every slice of `driver`, by name, in slice order.
    pub fn devices(&self, driver: &str) -> Vec<String> {
        self.slices
            .values()
            .filter(|s| s["spec"]["driver"] == driver)
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .filter_map(|d| d["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Requests whose line starts with `prefix` (`"PUT /apis/..."`, say).
    pub fn count(&self, prefix: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    fn next_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, kind: &str, object: &Value, version: u64) {
        let event = json!({"type": kind, "object": object});
        self.events.push((version, event.clone()));
        self.watchers.retain(|w| w.send(event.clone()).is_ok());
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// The open connections, to cut when the server goes away.
    connections: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running fake API server.
pub struct FakeApiServer {
    pub address: SocketAddr,
    /// A ServiceAccount directory for it: `ca.crt` and `token`.
    pub credentials: PathBuf,
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
    accept: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    pub fn start() -> FakeApiServer {
        let dir = tempfile::tempdir().expect("a temp dir for the credentials");
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake-kubernetes-ca");
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("a server key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).expect("the server certificate");
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("a TLS configuration");
        let tls = Arc::new(tls);

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                token: TOKEN.to_owned(),
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let accept = accept_on(listener, &shared, &tls);
        FakeApiServer {
            address,
            credentials: dir.path().to_owned(),
            _dir: dir,
            shared,
            tls,
            accept: Some(accept),
        }
    }

    /// Goes away as a restarting API server does: every connection cut (watches end), the port
    /// closed (connections refused). What it holds stays for `up`.
    pub fn down(&mut self) {
        self.stop_accepting();
        for c in self.shared.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.shared.lock().watchers.clear();
    }

    /// Back on the same address, with what it held.
    pub fn up(&mut self) {
        let listener = TcpListener::bind(self.address).expect("bind the fake API server again");
        self.shared.stop.store(false, Ordering::Release);
        self.accept = Some(accept_on(listener, &self.shared, &self.tls));
    }

    fn stop_accepting(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wakes the accept loop, which then sees the flag and drops the listener.
        let _ = TcpStream::connect(self.address);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }

    /// A new ServiceAccount token, as the kubelet rotates a projected one: written to the file
    /// first, then the only one accepted.
    pub fn rotate_token(&self, token: &str) {
        let path = self.credentials.join("token");
        let staged = self.credentials.join(".token.new");
        std::fs::write(&staged, format!("{token}\n")).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        self.shared.lock().token = token.to_owned();
    }

    /// The environment a pod gets for the API server's address.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("KUBERNETES_SERVICE_HOST", self.address.ip().to_string()),
            ("KUBERNETES_SERVICE_PORT", self.address.port().to_string()),
        ]
    }

    /// The state as it is now.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Waits until `check` finds what it wants in the state, and returns it.
    pub fn wait_for<T>(&self, what: &str, check: impl FnMut(&State) -> Option<T>) -> T {
        self.wait_for_within(what, WAIT, check)
    }

    /// `wait_for` with a bound of its own, for work that takes longer (thousands of writes).
    pub fn wait_for_within<T>(
        &self,
        what: &str,
        bound: Duration,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + bound;
        let mut state = self.shared.lock();
        loop {
            if let Some(found) = check(&state) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the API server never saw {what}; requests: {:#?}",
                state.requests
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Deletes every slice of `driver`, as the kubelet does to its node's as it starts.
    pub fn delete_slices_of(&self, driver: &str) {
        let mut state = self.shared.lock();
        let names: Vec<String> = state
            .slices
            .iter()
            .filter(|(_, s)| s["spec"]["driver"] == driver)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            if let Some(slice) = state.slices.remove(&name) {
                let version = state.next_version();
                state.record("DELETED", &slice, version);
            }
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Stores a ResourceClaim allocated `devices` (name, request) from `driver`'s pool `pool`.
    pub fn add_claim(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        driver: &str,
        pool: &str,
        devices: &[(&str, &str)],
    ) {
        let results: Vec<Value> = devices
            .iter()
            .map(|(device, request)| {
                json!({"driver": driver, "pool": pool, "device": device, "request": request})
            })
            .collect();
        self.add_claim_with(namespace, name, uid, &results);
    }

    /// A claim allocated with these results, each as the scheduler writes one.
    pub fn add_claim_with(&self, namespace: &str, name: &str, uid: &str, results: &[Value]) {
        let claim = json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
            "spec": {"devices": {"requests": []}},
            "status": {"allocation": {"devices": {"results": results}}},
        });
        let mut state = self.shared.lock();
        state.claims.insert(format!("{namespace}/{name}"), claim);
        self.shared.changed.notify_all();
    }

    /// Deletes a ResourceClaim, as the claim controller does once the pod it was made for is
    /// gone from the API server.
    pub fn remove_claim(&self, namespace: &str, name: &str) {
        self.shared
            .lock()
            .claims
            .remove(&format!("{namespace}/{name}"));
        self.shared.changed.notify_all();
    }

    /// A Node whose kubelet reports `kubelet_version`, as `status.nodeInfo` has it.
    pub fn add_node(&self, name: &str, kubelet_version: &str) {
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "uid": format!("node-uid-{name}"), "resourceVersion": "1"},
            "status": {"nodeInfo": {"kubeletVersion": kubelet_version}},
        });
        self.shared.lock().nodes.insert(name.to_owned(), node);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Ends every watch: its channel disconnects.
        self.shared.lock().watchers.clear();
        self.stop_accepting();
    }
}

fn accept_on(
    listener: TcpListener,
    shared: &Arc<Shared>,
    tls: &Arc<rustls::ServerConfig>,
) -> JoinHandle<()> {
    let (shared, tls) = (Arc::clone(shared), Arc::clone(tls));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let Ok(stream) = stream else { continue };
            if let Ok(copy) = stream.try_clone() {
                shared.connections.lock().unwrap().push(copy);
            }
            let (shared, tls) = (Arc::clone(&shared), Arc::clone(&tls));
            std::thread::spawn(move || serve_connection(stream, &tls, &shared));
        }
    })
}

/// One request as read off the wire.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    /// The bearer token it carried.
    token: Option<String>,
    body: Vec<u8>,
}

fn serve_connection(stream: TcpStream, tls: &Arc<rustls::ServerConfig>, shared: &Shared) {
    // Each answer goes out in several writes: without this, Nagle's algorithm holds the last one
    // back until the client's delayed ACK, 40 ms a request.
    let _ = stream.set_nodelay(true);
    let Ok(connection) = rustls::ServerConnection::new(Arc::clone(tls)) else {
        return;
    };
    let mut stream = rustls::StreamOwned::new(connection, stream);
    // Keep-alive: requests follow one another until the client closes the connection.
    loop {
        let Some(request) = read_request(&mut stream) else {
            return;
        };
        let line = match request.query.is_empty() {
            true => format!("{} {}", request.method, request.path),
            false => {
                let query: Vec<String> = request
                    .query
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{} {}?{}", request.method, request.path, query.join("&"))
            }
        };
        let (throttled, fault, authorized, expire) = {
            let mut state = shared.lock();
            state.requests.push(line);
            state.request_times.push(Instant::now());
            let write = request.path.starts_with(SLICES)
                && matches!(request.method.as_str(), "POST" | "PUT");
            let throttled = (write && state.throttle_writes > 0).then(|| {
                state.throttle_writes -= 1;
                state.throttle_seconds
            });
            let fault = throttled
                .is_none()
                .then(|| state.fault_for(&request.method, &request.path))
                .flatten();
            let authorized = request.token.as_deref() == Some(state.token.as_str());
            let watch = request.query.get("watch").map(String::as_str) == Some("true");
            let expire = watch && authorized && state.expire_watches > 0;
            if expire {
                state.expire_watches -= 1;
            }
            (throttled, fault, authorized, expire)
        };
        shared.changed.notify_all();
        if let Some(seconds) = throttled {
            let body = status(
                429,
                "TooManyRequests",
                "too many requests, please try again later",
            );
            let text = body.to_string();
            let sent = write!(
                stream,
                "HTTP/1.1 429 X\r\nContent-Type: application/json\r\nRetry-After: {seconds}\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
            .and_then(|()| stream.flush());
            if sent.is_err() {
                return;
            }
            continue;
        }
        if let Some(code) = fault {
            if respond(
                &mut stream,
                code,
                &status(code, "Fault", "a fault the test asked for"),
            )
            .is_err()
            {
                return;
            }
            continue;
        }
        if !authorized {
            let _ = respond(
                &mut stream,
                401,
                &status(401, "Unauthorized", "a wrong token"),
            );
            continue;
        }
        if expire {
            let event = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let line = format!("{event}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{line}\r\n0\r\n\r\n",
                line.len()
            )
            .and_then(|()| stream.flush());
            return;
        }
        if request.query.get("watch").map(String::as_str) == Some("true") {
            watch(&mut stream, &request, shared);
            return;
        }
        let (code, body) = route(&request, shared);
        if respond(&mut stream, code, &body).is_err() {
            return;
        }
    }
}

fn read_request(stream: &mut impl Read) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head).ok().filter(|n| *n > 0)?;
    let mut parts = head.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let (mut length, mut token) = (0usize, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok().filter(|n| *n > 0)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "authorization" => {
                token = value.trim().strip_prefix("Bearer ").map(str::to_owned);
            }
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    // The reader buffered nothing past the body: the client waits for our answer.
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), unescape(v)))
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        token,
        body,
    })
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
           "reason": reason, "message": message})
}

/// Whether `slice` matches a field selector such as `spec.nodeName=n1,spec.driver=d`.
fn selected(slice: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').all(|term| match term.split_once('=') {
        Some(("spec.nodeName", v)) => slice["spec"]["nodeName"] == v,
        Some(("spec.driver", v)) => slice["spec"]["driver"] == v,
        _ => false,
    })
}

fn route(request: &Request, shared: &Shared) -> (u16, Value) {
    let mut state = shared.lock();
    let answer = route_locked(request, &mut state);
    drop(state);
    shared.changed.notify_all();
    answer
}

fn route_locked(request: &Request, state: &mut State) -> (u16, Value) {
    let body = || serde_json::from_slice::<Value>(&request.body).unwrap_or(Value::Null);
    let slice_name = request
        .path
        .strip_prefix(SLICES)
        .and_then(|rest| rest.strip_prefix('/'));
    match (request.method.as_str(), request.path.as_str(), slice_name) {
        ("GET", SLICES, None) => {
            let selector = request.query.get("fieldSelector");
            let matching = || state.slices.values().filter(|s| selected(s, selector));
            // Pages as the API server cuts them with `limit`, the next one named by `continue`
            // (an offset here; an opaque token there). Only the page is copied.
            let from: usize = request
                .query
                .get("continue")
                .and_then(|c| c.strip_prefix("from-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let limit = request
                .query
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let page: Vec<Value> = matching().skip(from).take(limit).cloned().collect();
            let mut metadata = json!({"resourceVersion": state.resource_version.to_string()});
            if from.saturating_add(page.len()) < matching().count() {
                metadata["continue"] = json!(format!("from-{}", from + page.len()));
            }
            (
                200,
                json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
                         "metadata": metadata, "items": page}),
            )
        }
        ("POST", SLICES, None) => {
            let mut slice = body();
            if state.drop_device_taints {
                drop_taints(&mut slice);
            }
            let version = state.next_version();
            let name = match slice["metadata"]["name"].as_str() {
                Some(name) => name.to_owned(),
                None => format!(
                    "{}{version:05}",
                    slice["metadata"]["generateName"]
                        .as_str()
                        .unwrap_or("slice-")
                ),
            };
            if state.slices.contains_key(&name) {
                return (
                    409,
                    status(409, "AlreadyExists", &format!("{name} already exists")),
                );
            }
            slice["metadata"]["name"] = json!(name);
            slice["metadata"]["uid"] = json!(format!("uid-{version}"));
            slice["metadata"]["resourceVersion"] = json!(version.to_string());
            state.slices.insert(name, slice.clone());
            state.record("ADDED", &slice, version);
            (201, slice)
        }
        ("PUT", _, Some(name)) => {
            let mut slice = body();
            if state.drop_device_taints {
                drop_taints(&mut slice);
            }
            let Some(stored) = state.slices.get(name) else {
                return (404, status(404, "NotFound", &format!("{name} not found")));
            };
            if slice["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                return (409, status(409, "Conflict", "the object has been modified"));
            }
            slice["metadata"]["uid"] = stored["metadata"]["uid"].clone();
            let version = state.next_version();
            slice["metadata"]["resourceVersion"] = json!(version.to_string());
            state.slices.insert(name.to_owned(), slice.clone());
            state.record("MODIFIED", &slice, version);
            (200, slice)
        }
        ("DELETE", _, Some(name)) => match state.slices.remove(name) {
            Some(slice) => {
                let version = state.next_version();
                state.record("DELETED", &slice, version);
                (200, status(200, "", "deleted"))
            }
            None => (404, status(404, "NotFound", &format!("{name} not found"))),
        },
        ("GET", path, None) if path.starts_with(NODES) => {
            match state.nodes.get(&path[NODES.len()..]) {
                Some(node) => (200, node.clone()),
                None => (404, status(404, "NotFound", "node not found")),
            }
        }
        ("GET", path, None) if path.starts_with(CLAIMS) => {
            let rest = &path[CLAIMS.len()..];
            let key = rest.replacen("/resourceclaims/", "/", 1);
            match state.claims.get(&key) {
                Some(claim) => (200, claim.clone()),
                None => (
                    404,
                    status(404, "NotFound", &format!("claim {key} not found")),
                ),
            }
        }
        _ => (
            404,
            status(404, "NotFound", "the fake API server does not serve this"),
        ),
    }
}

fn drop_taints(slice: &mut Value) {
    if let Some(devices) = slice["spec"]["devices"].as_array_mut() {
        for device in devices {
            if let Some(device) = device.as_object_mut() {
                device.remove("taints");
            }
        }
    }
}

fn respond(stream: &mut impl Write, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

/// A watch of slices: the events after the requested resourceVersion, then each new one, as
/// chunks of one JSON line, until the watch's timeout or the server stops.
fn watch(stream: &mut impl Write, request: &Request, shared: &Shared) {
    let selector = request.query.get("fieldSelector");
    let from: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(WAIT, Duration::from_secs);
    let (tx, rx): (Sender<Value>, Receiver<Value>) = crossbeam_channel::unbounded();
    let backlog: Vec<Value> = {
        let mut state = shared.lock();
        state.watchers.push(tx);
        state
            .events
            .iter()
            .filter(|(v, _)| *v > from)
            .map(|(_, e)| e.clone())
            .collect()
    };
    if write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .and_then(|()| stream.flush())
    .is_err()
    {
        return;
    }
    let send = |stream: &mut dyn Write, event: &Value| -> std::io::Result<()> {
        if !selected(&event["object"], selector) {
            return Ok(());
        }
        let line = format!("{event}\n");
        write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
        stream.flush()
    };
    for event in &backlog {
        if send(stream, event).is_err() {
            return;
        }
    }
    let end = Instant::now() + timeout;
    loop {
        match rx.recv_deadline(end) {
            Ok(event) => {
                if send(stream, &event).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
    let _ = write!(stream, "0\r\n\r\n").and_then(|()| stream.flush());
}
