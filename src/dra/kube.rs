//! The API server, from inside the pod (called on the "slices" and "prepare" threads): a blocking
//! HTTPS client that authenticates with the pod's ServiceAccount token, trusts only the cluster's
//! CA, and speaks JSON in the API's own types (k8s-openapi). Every call is bounded in time, so a
//! stalled API server delays a thread of ours but never hangs it; a watch (the "slice-watch"
//! thread's) is bounded by its silence instead, and can be interrupted from another thread.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::http::Method;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use ureq::{Agent, BodyReader};

/// Where the kubelet mounts a pod's ServiceAccount credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The longest one API call may take, connecting included: NodePrepareResources must answer
/// within the kubelet's 45 s, after all.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer we read: a list of our own node's slices or one claim is far smaller.
/// A watch's events are each bounded by it too.
const MAX_BODY: u64 = 8 * 1024 * 1024;
/// Items asked for per page of a list: a page of our fullest slices (64 devices each) stays far
/// under `MAX_BODY`, however many slices a pool has.
const LIST_PAGE: usize = 50;
/// The most pages one list may take, so that a server that never ends a list cannot keep us.
const MAX_PAGES: usize = 10_000;
/// How long a watch may stay silent before we take its connection for dead. The API server ends
/// a watch at the `timeoutSeconds` its caller asks for (and may send bookmarks before), so this
/// is only ever reached when the connection is lost without a word.
const WATCH_SILENCE: Duration = Duration::from_secs(6 * 60);

/// An agent that finds an address it is given as an IP address without a thread. ureq's own
/// resolver runs every call's lookup on a new thread whenever the call has a time limit, as ours
/// all do, even for a literal address, which is what the API server's always is in a pod
/// (`KUBERNETES_SERVICE_HOST`): a thread made and ended per prepare, found by perf in the
/// "claim-reader" threads (clone3 in 15% of their samples). Names still go to ureq's resolver.
fn agent_of(config: ureq::config::Config) -> Agent {
    Agent::with_parts(config, DefaultConnector::default(), LiteralFirst::default())
}

#[derive(Debug, Default)]
struct LiteralFirst(DefaultResolver);

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        match literal_address(uri) {
            Some(address) => {
                let mut found = self.empty();
                found.push(address);
                Ok(found)
            }
            None => self.0.resolve(uri, config, timeout),
        }
    }
}

/// The socket address `uri` names, when its host is an IP address (IPv6 in brackets).
fn literal_address(uri: &ureq::http::Uri) -> Option<SocketAddr> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host.parse().ok()?;
    let port = match (authority.port_u16(), uri.scheme_str()) {
        (Some(port), _) => port,
        (None, Some("https")) => 443,
        (None, Some("http")) => 80,
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("KUBERNETES_SERVICE_HOST is not set: DRA mode runs in a pod, with the API server's address in its environment")]
    NoServiceHost,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot {action}")]
    Transport {
        action: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("cannot {action}: the API server answered {code}: {message}")]
    Status {
        action: String,
        code: u16,
        message: String,
    },
    #[error("cannot {action}: the API server is throttling us (429) for {wait:?}: {message}")]
    Throttled {
        action: String,
        wait: Duration,
        message: String,
    },
    #[error("cannot {action}: the request is not valid HTTP: {message}")]
    Request { action: String, message: String },
    #[error("cannot {action}: cannot encode the request")]
    Encode {
        action: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot {action}: the answer is not what the API defines")]
    Decode {
        action: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot {action}: the list did not end within {MAX_PAGES} pages")]
    EndlessList { action: String },
    #[error("cannot {action}: the stream of events broke off")]
    Stream {
        action: String,
        #[source]
        source: io::Error,
    },
}

/// A client of the cluster's API server, shared by the threads that call it.
#[derive(Clone)]
pub struct Client {
    agent: Agent,
    tls: TlsConfig,
    base: String,
    token_file: PathBuf,
}

impl Client {
    /// The in-cluster client: the address from the environment the kubelet gives every pod, the
    /// credentials from `credentials` (the ServiceAccount directory).
    pub fn in_cluster(credentials: &Path) -> Result<Client, KubeError> {
        let host =
            std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NoServiceHost)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Client::new(&format!("https://{host}:{port}"), credentials)
    }

    /// A client of the API server at `base` (`https://host:port`), trusting `credentials/ca.crt`
    /// and sending `credentials/token`.
    pub fn new(base: &str, credentials: &Path) -> Result<Client, KubeError> {
        let ca_path = credentials.join("ca.crt");
        let pem = fs::read(&ca_path).map_err(|source| KubeError::Read {
            path: ca_path.clone(),
            source,
        })?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(KubeError::NoCertificate { path: ca_path });
        }
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::from(certs))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        Ok(Client::with_tls(base, tls, credentials.join("token")))
    }

    /// A client of `base` that trusts as `tls` says and sends the token in `token_file`.
    pub(crate) fn with_tls(base: &str, tls: TlsConfig, token_file: PathBuf) -> Client {
        let config = Agent::config_builder()
            .tls_config(tls.clone())
            // Error answers carry a Status object whose message we want to report.
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .max_idle_connections(2)
            .build();
        let agent = agent_of(config);
        Client {
            agent,
            tls,
            base: base.trim_end_matches('/').to_owned(),
            token_file,
        }
    }

    /// A client of the same API server for one thread's watches, on connections of its own: a
    /// watch lasts minutes, so only its connecting and its silences are bounded, and
    /// `interrupt` ends it at once without touching anyone else's calls.
    pub fn for_watching(&self) -> Client {
        let config = Agent::config_builder()
            .tls_config(self.tls.clone())
            .http_status_as_error(false)
            .timeout_connect(Some(CALL_TIMEOUT))
            .timeout_recv_response(Some(CALL_TIMEOUT))
            .timeout_per_read(Some(WATCH_SILENCE))
            .max_idle_connections(1)
            .build();
        let agent = agent_of(config);
        Client {
            agent,
            tls: self.tls.clone(),
            base: self.base.clone(),
            token_file: self.token_file.clone(),
        }
    }

    /// Ends every call of this client in flight, from any thread, and refuses new ones: how a
    /// watching thread is told to stop while it waits on the API server.
    pub fn interrupt(&self) {
        self.agent.clone().shutdown();
    }

    /// The bearer token, read again for every call: the kubelet rotates the projected token in
    /// place, and an old one is refused an hour or so later.
    fn authorization(&self) -> Result<String, KubeError> {
        let token = fs::read_to_string(&self.token_file).map_err(|source| KubeError::Read {
            path: self.token_file.clone(),
            source,
        })?;
        Ok(format!("Bearer {}", token.trim()))
    }

    /// GET `path` (with its query), decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str, action: &str) -> Result<T, KubeError> {
        self.call(Method::GET, path, None::<&()>, action)
    }

    /// GET the whole collection at `path` (with its query), a page at a time, so that no list
    /// is too long to read. The list's resourceVersion is the first page's: the API server
    /// serves the later pages from the same snapshot.
    pub fn list<T>(&self, path: &str, action: &str) -> Result<k8s_openapi::List<T>, KubeError>
    where
        T: k8s_openapi::ListableResource + DeserializeOwned,
    {
        let separator = if path.contains('?') { '&' } else { '?' };
        let page = |token: Option<&str>| {
            let mut at = format!("{path}{separator}limit={LIST_PAGE}");
            if let Some(token) = token {
                at.push_str(&format!("&continue={}", escape(token)));
            }
            self.get::<k8s_openapi::List<T>>(&at, action)
        };
        let mut list = page(None)?;
        for _ in 0..MAX_PAGES {
            let Some(token) = list.metadata.continue_.take().filter(|t| !t.is_empty()) else {
                return Ok(list);
            };
            let next = page(Some(&token))?;
            list.items.extend(next.items);
            list.metadata.continue_ = next.metadata.continue_;
        }
        Err(KubeError::EndlessList {
            action: action.to_owned(),
        })
    }

    /// POST `body` to the collection at `path`; the created object.
    pub fn create<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        action: &str,
    ) -> Result<T, KubeError> {
        self.call(Method::POST, path, Some(body), action)
    }

    /// PUT `body` at `path` (an update guarded by the body's resourceVersion); the object as
    /// stored.
    pub fn replace<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        action: &str,
    ) -> Result<T, KubeError> {
        self.call(Method::PUT, path, Some(body), action)
    }

    /// DELETE `path`; an object already gone counts as deleted.
    pub fn delete(&self, path: &str, action: &str) -> Result<(), KubeError> {
        match self.call::<(), serde_json::Value>(Method::DELETE, path, None, action) {
            Err(KubeError::Status { code: 404, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// GET `path` as a watch (its query holds `watch=true`): the events as they come, each
    /// decoded as a `WatchEvent<T>`.
    pub fn watch<T: DeserializeOwned>(
        &self,
        path: &str,
        action: &str,
    ) -> Result<Watch<T>, KubeError> {
        let request = self
            .request(Method::GET, path)?
            .body(())
            .map_err(|e| invalid(action, &e))?;
        let response = checked(self.agent.run(request), action)?;
        Ok(Watch {
            lines: BufReader::new(response.into_body().into_reader()),
            action: action.to_owned(),
            line: Vec::new(),
            of: PhantomData,
        })
    }

    fn request(
        &self,
        method: Method,
        path: &str,
    ) -> Result<ureq::http::request::Builder, KubeError> {
        Ok(ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("Authorization", self.authorization()?)
            .header("Accept", "application/json"))
    }

    /// One request, with our token, a JSON body if any, and the answer decoded as `T`.
    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        action: &str,
    ) -> Result<T, KubeError> {
        let request = self.request(method, path)?;
        let invalid = |e: ureq::http::Error| invalid(action, &e);
        let response = match body {
            Some(body) => {
                let json = serde_json::to_vec(body).map_err(|source| KubeError::Encode {
                    action: action.to_owned(),
                    source,
                })?;
                let request = request
                    .header("Content-Type", "application/json")
                    .body(json)
                    .map_err(invalid)?;
                self.agent.run(request)
            }
            // No body at all, not an empty one: a GET or DELETE carries none.
            None => self.agent.run(request.body(()).map_err(invalid)?),
        };
        decode(response, action)
    }
}

/// The events of one watch, read as the API server sends them (one JSON object a line).
pub struct Watch<T> {
    lines: BufReader<BodyReader<'static>>,
    action: String,
    line: Vec<u8>,
    of: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Watch<T> {
    /// The next event, waiting for it; `None` once the API server ended the watch.
    pub fn next_event(
        &mut self,
    ) -> Result<Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::WatchEvent<T>>, KubeError>
    {
        let broke = |source| KubeError::Stream {
            action: self.action.clone(),
            source,
        };
        loop {
            self.line.clear();
            let read = (&mut self.lines)
                .take(MAX_BODY)
                .read_until(b'\n', &mut self.line)
                .map_err(broke)?;
            if read == 0 {
                return Ok(None);
            }
            if !self.line.ends_with(b"\n") && read as u64 == MAX_BODY {
                return Err(broke(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an event is longer than {MAX_BODY} bytes"),
                )));
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&self.line)
                .map(Some)
                .map_err(|source| KubeError::Decode {
                    action: self.action.clone(),
                    source,
                });
        }
    }
}

fn invalid(action: &str, e: &ureq::http::Error) -> KubeError {
    KubeError::Request {
        action: action.to_owned(),
        message: e.to_string(),
    }
}

/// The answer if it is a success, or the API server's own reason for refusing.
fn checked(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    action: &str,
) -> Result<ureq::http::Response<ureq::Body>, KubeError> {
    let mut response = response.map_err(|source| KubeError::Transport {
        action: action.to_owned(),
        source: Box::new(source),
    })?;
    let code = response.status().as_u16();
    if (200..300).contains(&code) {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = read_body(&mut response, action)?;
    if code == 429 {
        return Err(KubeError::Throttled {
            action: action.to_owned(),
            wait: throttled_for(retry_after.as_deref()),
            message: status_message(&text),
        });
    }
    Err(KubeError::Status {
        action: action.to_owned(),
        code,
        message: status_message(&text),
    })
}

/// How long a 429 asks us to wait: its Retry-After in seconds (the API server's priority and
/// fairness sends 1 and more), within 1 s and 5 minutes; 1 s when it names none.
fn throttled_for(retry_after: Option<&str>) -> Duration {
    let seconds = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds.clamp(1, 300))
}

impl KubeError {
    /// How long the API server asked us to wait before the next try, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            KubeError::Throttled { wait, .. } => Some(*wait),
            _ => None,
        }
    }
}

fn read_body(
    response: &mut ureq::http::Response<ureq::Body>,
    action: &str,
) -> Result<String, KubeError> {
    response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|source| KubeError::Transport {
            action: action.to_owned(),
            source: Box::new(source),
        })
}

/// The body of a successful answer as `T`, or the API server's own reason for refusing.
fn decode<T: DeserializeOwned>(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    action: &str,
) -> Result<T, KubeError> {
    let mut response = checked(response, action)?;
    let text = read_body(&mut response, action)?;
    serde_json::from_str(&text).map_err(|source| KubeError::Decode {
        action: action.to_owned(),
        source,
    })
}

/// The message of a `Status` answer, or the start of whatever else came.
fn status_message(text: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Status {
        message: Option<String>,
    }
    match serde_json::from_str::<Status>(text) {
        Ok(Status { message: Some(m) }) => m,
        _ => text.chars().take(200).collect(),
    }
}

/// `s` escaped for a URL path segment or query value: names are DNS subdomains, but a field
/// selector holds `=` and `,`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_are_the_api_servers_own() {
        let text = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"resourceslices.resource.k8s.io \"x\" is forbidden","reason":"Forbidden","code":403}"#;
        assert_eq!(
            status_message(text),
            "resourceslices.resource.k8s.io \"x\" is forbidden"
        );
        assert_eq!(status_message("502 Bad Gateway"), "502 Bad Gateway");
    }

    #[test]
    fn a_throttled_answer_waits_as_long_as_it_asks_within_bounds() {
        assert_eq!(throttled_for(Some("7")), Duration::from_secs(7));
        assert_eq!(throttled_for(Some(" 2 ")), Duration::from_secs(2));
        assert_eq!(throttled_for(None), Duration::from_secs(1));
        assert_eq!(throttled_for(Some("0")), Duration::from_secs(1));
        assert_eq!(
            throttled_for(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Duration::from_secs(1)
        );
        assert_eq!(throttled_for(Some("86400")), Duration::from_secs(300));
    }

    #[test]
    fn field_selectors_are_escaped() {
        assert_eq!(
            escape("spec.nodeName=n1,spec.driver=devices.anza-labs.dev"),
            "spec.nodeName%3Dn1%2Cspec.driver%3Ddevices.anza-labs.dev"
        );
    }

    #[test]
    fn a_missing_or_empty_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::new("https://127.0.0.1:1", dir.path())
            .err()
            .unwrap();
        assert!(matches!(e, KubeError::Read { .. }), "{e}");
        fs::write(dir.path().join("ca.crt"), "not a certificate\n").unwrap();
        let e = Client::new("https://127.0.0.1:1", dir.path())
            .err()
            .unwrap();
        assert!(matches!(e, KubeError::NoCertificate { .. }), "{e}");
    }

    #[test]
    fn an_ip_address_is_its_own_resolution_and_a_name_is_left_to_the_resolver() {
        let address = |u: &str| literal_address(&u.parse().unwrap());
        assert_eq!(
            address("https://10.96.0.1:443/api"),
            Some("10.96.0.1:443".parse().unwrap())
        );
        assert_eq!(
            address("https://[fd00::1]:6443/apis"),
            Some("[fd00::1]:6443".parse().unwrap())
        );
        assert_eq!(
            address("https://10.96.0.1/"),
            Some("10.96.0.1:443".parse().unwrap())
        );
        assert_eq!(
            address("http://127.0.0.1/"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(address("https://kubernetes.default.svc:443/"), None);
    }
}
