//! The API server, from inside the pod (called on the "slices" and "prepare" threads): a blocking
//! HTTPS client that authenticates with the pod's ServiceAccount token, trusts only the cluster's
//! CA, and speaks JSON in the API's own types (k8s-openapi). Every call is bounded in time, so a
//! stalled API server delays a thread of ours but never hangs it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::http::Method;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::Agent;

/// Where the kubelet mounts a pod's ServiceAccount credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The longest one API call may take, connecting included: NodePrepareResources must answer
/// within the kubelet's 45 s, after all.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer we read: a list of our own node's slices or one claim is far smaller.
const MAX_BODY: u64 = 8 * 1024 * 1024;

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
}

/// A client of the cluster's API server, shared by the threads that call it.
#[derive(Clone)]
pub struct Client {
    agent: Agent,
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
        let agent = Agent::config_builder()
            .tls_config(tls)
            // Error answers carry a Status object whose message we want to report.
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .max_idle_connections(2)
            .build()
            .new_agent();
        Ok(Client {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            token_file: credentials.join("token"),
        })
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

    /// One request, with our token, a JSON body if any, and the answer decoded as `T`.
    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        action: &str,
    ) -> Result<T, KubeError> {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("Authorization", self.authorization()?)
            .header("Accept", "application/json");
        let invalid = |e: ureq::http::Error| KubeError::Request {
            action: action.to_owned(),
            message: e.to_string(),
        };
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

/// The body of a successful answer as `T`, or the API server's own reason for refusing.
fn decode<T: DeserializeOwned>(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    action: &str,
) -> Result<T, KubeError> {
    let mut response = response.map_err(|source| KubeError::Transport {
        action: action.to_owned(),
        source: Box::new(source),
    })?;
    let code = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|source| KubeError::Transport {
            action: action.to_owned(),
            source: Box::new(source),
        })?;
    if !(200..300).contains(&code) {
        return Err(KubeError::Status {
            action: action.to_owned(),
            code,
            message: status_message(&text),
        });
    }
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
}
