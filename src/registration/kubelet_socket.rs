//! The "register" thread: registers resources through `kubelet.sock`. It calls Register off the
//! control loop, so the kubelet's synchronous dial-back never waits on the control loop or a
//! completion-queue thread, and retries with backoff until the kubelet accepts.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use grpcio::{CallOption, ChannelBuilder, Environment};
use log::{debug, info, warn};

use crate::event::{Event, RegisterCommand as Command, RegisterJob as Job};
use crate::proto;
use crate::rpc::Driven;
use crate::thread::ThreadHandle;

/// The kubelet dials the plugin back before answering; it gives that dial 10 s itself.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Tells one kubelet.sock from its successor at the same path (inode numbers get reused, so the
/// change time goes with them).
type KubeletId = (u64, u64, i64, i64);

fn kubelet_id(socket: &Path) -> Option<KubeletId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(socket)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

struct Pending {
    job: Job,
    /// Which request this is, so the answer to an older one does not settle a newer one.
    generation: u64,
    due: Instant,
    retry: Duration,
    failures: u32,
}

/// The running "register" thread and the channel that feeds it.
pub struct RegisterThread {
    commands: Sender<Command>,
    /// Stopped (a call in flight cancelled) and joined when this is dropped.
    _thread: ThreadHandle,
}

impl RegisterThread {
    /// Starts the thread, dialing `kubelet_socket` for each registration.
    pub fn spawn(
        env: Arc<Environment>,
        kubelet_socket: PathBuf,
        events: Sender<Event>,
    ) -> io::Result<RegisterThread> {
        let (commands, commands_rx) = crossbeam_channel::unbounded();
        let registrar = Registrar {
            env,
            kubelet_socket,
            events: events.clone(),
            pending: BTreeMap::new(),
            generation: 0,
            registered: BTreeMap::new(),
        };
        let stop = commands.clone();
        let thread = ThreadHandle::spawn(
            "register",
            events,
            move || registrar.run(&commands_rx),
            // The thread outlives the control loop only while this send is in the queue.
            move || {
                let _ = stop.send(Command::Stop);
            },
        )?;
        Ok(RegisterThread {
            commands,
            _thread: thread,
        })
    }

    /// Hands a command to the thread; it works while the caller goes on.
    pub fn send(&self, command: Command) {
        // The thread ends only when told to, or by a panic that was reported already.
        let _ = self.commands.send(command);
    }
}

struct Registrar {
    env: Arc<Environment>,
    kubelet_socket: PathBuf,
    events: Sender<Event>,
    /// By resource name: one attempt at a time per resource, the newest job wins.
    pending: BTreeMap<String, Pending>,
    generation: u64,
    /// By resource name: the kubelet and server of the last successful registration.
    registered: BTreeMap<String, (KubeletId, u64)>,
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
                    if !self.apply(command) {
                        return;
                    }
                    // Take every queued command before dialing, so a burst (a kubelet restart)
                    // registers each resource once.
                    while let Ok(command) = commands.try_recv() {
                        if !self.apply(command) {
                            return;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if !self.attempt_due(commands) {
                return;
            }
        }
    }

    /// Takes one command; false when told to stop.
    fn apply(&mut self, command: Command) -> bool {
        match command {
            Command::Register(job) => {
                self.generation += 1;
                let pending = Pending {
                    job,
                    generation: self.generation,
                    due: Instant::now(),
                    retry: FIRST_RETRY,
                    failures: 0,
                };
                self.pending
                    .insert(pending.job.resource_name.clone(), pending);
            }
            Command::Forget(name) => {
                self.pending.remove(&name);
            }
            Command::Stop => return false,
        }
        true
    }

    /// Tries every registration that is due. False when told to stop meanwhile.
    fn attempt_due(&mut self, commands: &Receiver<Command>) -> bool {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        if due.is_empty() {
            return true;
        }
        if !self.kubelet_socket.exists() {
            // The control loop asks again when the kubelet creates its socket.
            debug!(
                "{} is gone; dropping {} pending registrations",
                self.kubelet_socket.display(),
                self.pending.len()
            );
            self.pending.clear();
            return true;
        }
        let channel = ChannelBuilder::new(Arc::clone(&self.env))
            .connect(&format!("unix:{}", self.kubelet_socket.display()));
        let client = proto::RegistrationClient::new(channel);
        for name in due {
            let Some(pending) = self.pending.get(&name) else {
                continue;
            };
            let (request, generation, server) = (
                pending.job.request(),
                pending.generation,
                pending.job.server,
            );
            let kubelet = kubelet_id(&self.kubelet_socket);
            if kubelet.is_some()
                && self.registered.get(&name) == kubelet.map(|k| (k, server)).as_ref()
            {
                // Asked twice for one kubelet start (our socket's removal and kubelet.sock's
                // creation can reach the control loop in separate batches): once is enough.
                debug!("{name} is already registered with this kubelet");
                self.pending.remove(&name);
                continue;
            }
            let started = Instant::now();
            let Some(result) = self.call(&client, &request, commands) else {
                return false;
            };
            if result.is_ok() {
                info!(
                    "registered {name} (endpoint {}) with the kubelet in {:.1} ms",
                    request.endpoint,
                    started.elapsed().as_secs_f64() * 1e3
                );
                // Recorded even if a newer request came meanwhile: if that one is for the same
                // server and kubelet, it is then already done.
                if let Some(kubelet) = kubelet {
                    self.registered.insert(name.clone(), (kubelet, server));
                }
                // The control loop is gone only while shutting down.
                let _ = self.events.send(Event::Registered(name.clone()));
            }
            let Some(pending) = self.pending.get_mut(&name) else {
                continue;
            };
            if pending.generation != generation {
                // Asked again while this call was in flight (the kubelet restarted, say):
                // the newer request is due and goes next.
                continue;
            }
            match result {
                Ok(_) => {
                    self.pending.remove(&name);
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
        true
    }

    /// One Register call, taking commands while it is in flight. `None` when told to stop
    /// meanwhile: the call is cancelled rather than left to delay shutdown.
    fn call(
        &mut self,
        client: &proto::RegistrationClient,
        request: &proto::RegisterRequest,
        commands: &Receiver<Command>,
    ) -> Option<grpcio::Result<proto::Empty>> {
        let options = CallOption::default().timeout(REGISTER_TIMEOUT);
        let mut call = match client.register_async_opt(request, options) {
            Ok(receiver) => Driven::new(receiver),
            Err(e) => return Some(Err(e)),
        };
        loop {
            if let Poll::Ready(result) = call.poll() {
                return Some(result);
            }
            crossbeam_channel::select! {
                recv(call.woken()) -> _ => {}
                recv(commands) -> command => {
                    if !command.is_ok_and(|command| self.apply(command)) {
                        call.inner().cancel();
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{Receiver, RecvTimeoutError};
    use futures_util::FutureExt;
    use grpcio::{EnvBuilder, RpcContext, UnarySink};

    const WAIT: Duration = Duration::from_secs(10);

    /// A kubelet's Registration service that reports each call's resource name.
    #[derive(Clone)]
    struct Kubelet(Sender<String>);

    impl proto::Registration for Kubelet {
        fn register(
            &mut self,
            ctx: RpcContext<'_>,
            req: proto::RegisterRequest,
            sink: UnarySink<proto::Empty>,
        ) {
            let _ = self.0.send(req.resource_name);
            ctx.spawn(sink.success(proto::Empty::new()).map(|_| ()));
        }
    }

    fn kubelet(env: &Arc<Environment>, socket: &Path, calls: Sender<String>) -> grpcio::Server {
        crate::rpc::test_server(env, proto::create_registration(Kubelet(calls)), socket)
    }

    fn job(name: &str, server: u64) -> Command {
        Command::Register(Job {
            resource_name: name.into(),
            endpoint: format!("{name}.sock"),
            options: Default::default(),
            server,
        })
    }

    fn registered(events: &Receiver<Event>) -> String {
        match events.recv_timeout(WAIT) {
            Ok(Event::Registered(name)) => name,
            other => panic!("expected a registration, got {other:?}"),
        }
    }

    #[test]
    fn the_same_server_is_registered_once_per_kubelet_start() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kubelet.sock");
        let env = Arc::new(EnvBuilder::new().cq_count(1).build());
        let (calls_tx, calls) = crossbeam_channel::unbounded();
        let mut first = kubelet(&env, &socket, calls_tx.clone());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let commands = RegisterThread::spawn(Arc::clone(&env), socket.clone(), events_tx).unwrap();

        commands.send(job("a", 1));
        assert_eq!(registered(&events), "a");
        // Asked again for the same server and kubelet: skipped. "b" shows when it was handled.
        commands.send(job("a", 1));
        commands.send(job("b", 1));
        assert_eq!(registered(&events), "b");
        let seen: Vec<String> = calls.try_iter().collect();
        assert_eq!(seen, ["a", "b"]);

        // A new server for "a" registers again.
        commands.send(job("a", 2));
        assert_eq!(registered(&events), "a");
        // So does the same server with a new kubelet.
        futures_executor::block_on(first.shutdown()).unwrap();
        drop(first);
        let _ = std::fs::remove_file(&socket);
        let _second = kubelet(&env, &socket, calls_tx);
        commands.send(job("a", 2));
        assert_eq!(registered(&events), "a");
        assert_eq!(calls.try_iter().collect::<Vec<_>>(), ["a", "a"]);

        drop(commands);
        assert!(matches!(
            events.recv_timeout(Duration::ZERO),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        ));
    }
}
