//! Registers resources with the kubelet on `kubelet.sock`. Runs on the "register" thread, so the
//! kubelet's synchronous dial-back never waits on the control loop or a completion-queue thread.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use grpcio::{CallOption, ChannelBuilder, Environment};
use log::{debug, info, warn};

use crate::daemon::Event;
use crate::proto;

/// The kubelet dials the plugin back before answering; it gives that dial 10 s itself.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// One resource to register: everything the `RegisterRequest` carries.
#[derive(Clone, Debug)]
pub struct Job {
    pub resource_name: String,
    /// Socket file name, relative to the plugin directory.
    pub endpoint: String,
    pub options: proto::DevicePluginOptions,
}

impl Job {
    fn request(&self) -> proto::RegisterRequest {
        let mut request = proto::RegisterRequest::new();
        request.version = proto::VERSION.to_owned();
        request.endpoint = self.endpoint.clone();
        request.resource_name = self.resource_name.clone();
        request.options = Some(self.options.clone()).into();
        request
    }
}

/// What the control loop asks of the register thread.
#[derive(Debug)]
pub enum Command {
    /// Register now, replacing any pending attempt for the same resource.
    Register(Job),
    /// Give up pending attempts for this resource (it stopped).
    Forget(String),
}

struct Pending {
    job: Job,
    due: Instant,
    retry: Duration,
    failures: u32,
}

/// Starts the register thread. It ends when `commands` is disconnected.
pub fn spawn(
    env: Arc<Environment>,
    kubelet_socket: PathBuf,
    commands: Receiver<Command>,
    events: Sender<Event>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("register".into())
        .spawn(move || {
            Registrar {
                env,
                kubelet_socket,
                events,
                pending: BTreeMap::new(),
            }
            .run(&commands)
        })
}

struct Registrar {
    env: Arc<Environment>,
    kubelet_socket: PathBuf,
    events: Sender<Event>,
    /// By resource name: one attempt at a time per resource, the newest job wins.
    pending: BTreeMap<String, Pending>,
}

impl Registrar {
    fn run(mut self, commands: &Receiver<Command>) {
        loop {
            let next_due = self.pending.values().map(|p| p.due).min();
            // Sleep until a command arrives or a retry is due: no wake-ups while idle.
            let command = match next_due {
                None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(due) => commands.recv_deadline(due),
            };
            match command {
                Ok(command) => {
                    self.apply(command);
                    // Take every queued command before dialing, so a burst (a kubelet restart)
                    // registers each resource once.
                    while let Ok(command) = commands.try_recv() {
                        self.apply(command);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.attempt_due();
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Register(job) => {
                let name = job.resource_name.clone();
                self.pending.insert(
                    name,
                    Pending {
                        job,
                        due: Instant::now(),
                        retry: FIRST_RETRY,
                        failures: 0,
                    },
                );
            }
            Command::Forget(name) => {
                self.pending.remove(&name);
            }
        }
    }

    fn attempt_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        if !self.kubelet_socket.exists() {
            // The control loop asks again when the kubelet creates its socket.
            debug!(
                "{} is gone; dropping {} pending registrations",
                self.kubelet_socket.display(),
                self.pending.len()
            );
            self.pending.clear();
            return;
        }
        let channel = ChannelBuilder::new(Arc::clone(&self.env))
            .connect(&format!("unix:{}", self.kubelet_socket.display()));
        let client = proto::RegistrationClient::new(channel);
        for name in due {
            let Some(pending) = self.pending.get_mut(&name) else {
                continue;
            };
            let started = Instant::now();
            match client.register_opt(
                &pending.job.request(),
                CallOption::default().timeout(REGISTER_TIMEOUT),
            ) {
                Ok(_) => {
                    info!(
                        "registered {} (endpoint {}) with the kubelet in {:.1} ms",
                        name,
                        pending.job.endpoint,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    self.pending.remove(&name);
                    // The control loop is gone only while shutting down.
                    let _ = self.events.send(Event::Registered(name));
                }
                Err(e) => {
                    pending.failures += 1;
                    let retry = pending.retry;
                    if pending.failures == 1 {
                        warn!(
                            "cannot register {name} with the kubelet: {e}; retrying with backoff"
                        );
                    } else {
                        debug!("register {name}: attempt {} failed: {e}", pending.failures);
                    }
                    pending.due = Instant::now() + retry;
                    pending.retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }
}
