//! The "register" thread: registers resources through `kubelet.sock`. It calls Register off the
//! control loop, so the kubelet's synchronous dial-back never waits on the control loop or a
//! completion-queue thread, and retries with backoff until the kubelet accepts.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};
use grpcio::{CallOption, ChannelBuilder, Environment};
use log::{debug, info, warn};

use crate::event::{Event, RegisterCommand as Command, RegisterJob as Job};
use crate::proto;
use crate::rpc::Driven;
use crate::thread::ThreadHandle;

/// The kubelet dials the plugin back before answering; it gives that dial 10 s itself.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// The first wait after a refused Register; it doubles up to `MAX_RETRY`. Short because the
/// common refusal is over within milliseconds: kubelets 1.25 to 1.36, having dropped our stream
/// in a surge rollout, refuse the registration that comes back at once if it lands while they
/// still tear the dropped client down ("the client connection is closing", about 3 ms), and
/// refuse every pod asking for the resource until the next one.
const FIRST_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Tells one kubelet.sock from its successor at the same path (inode numbers get reused, so the
/// change time goes with them).
pub type KubeletId = (u64, u64, i64, i64);

/// The identity of the kubelet serving `socket` now; `None` while there is none.
pub fn kubelet_id(socket: &Path) -> Option<KubeletId> {
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
    /// For `Command::Again`: the kubelet that dropped us, the only one this job is for.
    again_with: Option<Option<KubeletId>>,
    /// The kubelet's calls to the job's server when it was asked for.
    calls_seen: u64,
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
            Command::Register(job) => self.add(job, None),
            Command::Again(job) => {
                // The kubelet holds this server no more: asking again is not a repeat.
                self.registered.remove(&job.resource_name);
                let kubelet = kubelet_id(&self.kubelet_socket);
                self.add(job, Some(kubelet));
            }
            Command::Forget(name) => {
                self.pending.remove(&name);
            }
            Command::Stop => return false,
        }
        true
    }

    fn add(&mut self, job: Job, again_with: Option<Option<KubeletId>>) {
        self.generation += 1;
        let pending = Pending {
            calls_seen: job.kubelet_calls.count(),
            job,
            generation: self.generation,
            due: Instant::now(),
            retry: FIRST_RETRY,
            failures: 0,
            again_with,
        };
        self.pending
            .insert(pending.job.resource_name.clone(), pending);
    }

    /// Tries every registration that is due, and those that come due while calls are in
    /// flight. False when told to stop meanwhile.
    fn attempt_due(&mut self, commands: &Receiver<Command>) -> bool {
        let mut in_flight = Vec::new();
        let mut client = None;
        loop {
            self.start_due(&mut client, &mut in_flight);
            let mut i = 0;
            while i < in_flight.len() {
                if let Poll::Ready(result) = in_flight[i].1.poll() {
                    let (attempt, _) = in_flight.swap_remove(i);
                    self.settle(&attempt, result);
                } else {
                    i += 1;
                }
            }
            if in_flight.is_empty() {
                return true;
            }
            let mut select = Select::new();
            for (_, call) in &in_flight {
                select.recv(call.woken());
            }
            let command_index = select.recv(commands);
            // A retry of a resource not in flight may come due meanwhile.
            let next_due = self
                .pending
                .iter()
                .filter(|(name, _)| !in_flight.iter().any(|(a, _)| a.name == **name))
                .map(|(_, p)| p.due)
                .min();
            let operation = match next_due {
                Some(due) => match select.select_deadline(due) {
                    Ok(operation) => operation,
                    Err(_) => continue,
                },
                None => select.select(),
            };
            let index = operation.index();
            if index == command_index {
                let command = operation.recv(commands);
                if !command.is_ok_and(|command| self.apply(command)) {
                    // Cancelled rather than left to delay shutdown.
                    for (_, call) in &mut in_flight {
                        call.inner().cancel();
                    }
                    return false;
                }
            } else {
                let _ = operation.recv(in_flight[index].1.woken());
            }
        }
    }

    /// Starts a Register call for every resource that is due and has none in flight: all at
    /// once, since the kubelet dials each plugin back before it answers, and a kubelet that
    /// dropped every resource of ours refuses pods until each one is registered again.
    fn start_due(
        &mut self,
        client: &mut Option<proto::RegistrationClient>,
        in_flight: &mut Vec<(Attempt, Call)>,
    ) {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(name, p)| p.due <= now && !in_flight.iter().any(|(a, _)| a.name == **name))
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
                due.len()
            );
            for name in due {
                self.pending.remove(&name);
            }
            return;
        }
        let client = client.get_or_insert_with(|| {
            let channel = ChannelBuilder::new(Arc::clone(&self.env))
                .connect(&format!("unix:{}", self.kubelet_socket.display()));
            proto::RegistrationClient::new(channel)
        });
        for name in due {
            let Some(pending) = self.pending.get(&name) else {
                continue;
            };
            let kubelet = kubelet_id(&self.kubelet_socket);
            if pending
                .again_with
                .is_some_and(|dropped_by| dropped_by != kubelet)
            {
                // A new kubelet: in plugin-watcher mode its watcher registers us, and a second
                // registration of ours would give it two streams of one server.
                debug!(
                    "{name}: the kubelet restarted; not registering it again through kubelet.sock"
                );
                self.pending.remove(&name);
                continue;
            }
            let server = pending.job.server;
            if kubelet.is_some()
                && self.registered.get(&name) == kubelet.map(|k| (k, server)).as_ref()
            {
                // Asked twice for one kubelet start (our socket's removal and kubelet.sock's
                // creation can reach the control loop in separate batches): once is enough.
                debug!("{name} is already registered with this kubelet");
                self.pending.remove(&name);
                continue;
            }
            let request = pending.job.request();
            let attempt = Attempt {
                name,
                endpoint: request.endpoint.clone(),
                generation: pending.generation,
                server,
                kubelet,
                started: Instant::now(),
            };
            let options = CallOption::default().timeout(REGISTER_TIMEOUT);
            match client.register_async_opt(&request, options) {
                Ok(receiver) => in_flight.push((attempt, Driven::new(receiver))),
                Err(e) => self.settle(&attempt, Err(e)),
            }
        }
    }

    /// Takes the answer to one Register call.
    fn settle(&mut self, attempt: &Attempt, result: grpcio::Result<proto::Empty>) {
        let name = &attempt.name;
        if result.is_ok() {
            info!(
                "registered {name} (endpoint {}) with the kubelet in {:.1} ms",
                attempt.endpoint,
                attempt.started.elapsed().as_secs_f64() * 1e3
            );
            // Recorded even if a newer request came meanwhile: if that one is for the same
            // server and kubelet, it is then already done.
            if let Some(kubelet) = attempt.kubelet {
                self.registered
                    .insert(name.clone(), (kubelet, attempt.server));
            }
            // The control loop is gone only while shutting down.
            let _ = self.events.send(Event::Registered(name.clone()));
        }
        let Some(pending) = self.pending.get_mut(name) else {
            return;
        };
        if pending.generation != attempt.generation {
            // Asked again while this call was in flight (the kubelet restarted, say): the newer
            // request is due and goes next, unless this answer already settled it.
            if result.is_ok() && self.took_the_newer_server(attempt) {
                debug!("{name}: the kubelet reached the server serving its endpoint now");
                self.pending.remove(name);
            }
            return;
        }
        match result {
            Ok(_) => {
                self.pending.remove(name);
            }
            Err(e) => {
                pending.failures += 1;
                let retry = pending.retry;
                if pending.failures == 1 {
                    warn!("cannot register {name} with the kubelet: {e}; retrying with backoff");
                } else {
                    debug!("register {name}: attempt {} failed: {e}", pending.failures);
                }
                pending.due = Instant::now() + retry;
                pending.retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

impl Registrar {
    /// Whether the kubelet that accepted `attempt`, a call for an older server of the resource,
    /// holds the newer one pending now: it dials the endpoint's path, not a server, and a server
    /// that replaced ours there (the kubelet restarted and wiped our sockets while we retried)
    /// counts its calls. Registering that one too would give the kubelet two registrations of
    /// one socket, and 1.37 refuses the second and keeps neither. Only for the kubelet that
    /// answered: a call to the newer server from one that went away since proves nothing.
    fn took_the_newer_server(&mut self, attempt: &Attempt) -> bool {
        let Some(pending) = self.pending.get(&attempt.name) else {
            return false;
        };
        let Some(kubelet) = attempt.kubelet else {
            return false;
        };
        if pending.job.endpoint != attempt.endpoint
            || pending.job.kubelet_calls.count() <= pending.calls_seen
            || kubelet_id(&self.kubelet_socket) != Some(kubelet)
        {
            return false;
        }
        self.registered
            .insert(attempt.name.clone(), (kubelet, pending.job.server));
        true
    }
}

/// One Register call in flight.
struct Attempt {
    name: String,
    endpoint: String,
    generation: u64,
    server: u64,
    kubelet: Option<KubeletId>,
    started: Instant,
}

type Call = Driven<grpcio::ClientUnaryReceiver<proto::Empty>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KubeletCalls;
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
            kubelet_calls: Default::default(),
        })
    }

    fn again(name: &str, server: u64) -> Command {
        match job(name, server) {
            Command::Register(job) => Command::Again(job),
            _ => unreachable!(),
        }
    }

    fn registered(events: &Receiver<Event>) -> String {
        match events.recv_timeout(WAIT) {
            Ok(Event::Registered(name)) => name,
            other => panic!("expected a registration, got {other:?}"),
        }
    }

    /// A kubelet.sock in a directory of its own, the register thread dialing it, and what each
    /// saw.
    struct Bench {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        env: Arc<Environment>,
        calls_tx: Sender<String>,
        calls: Receiver<String>,
        events: Receiver<Event>,
        commands: RegisterThread,
    }

    impl Bench {
        /// The bench, and the kubelet serving there.
        fn new() -> (Bench, grpcio::Server) {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("kubelet.sock");
            let env = Arc::new(EnvBuilder::new().cq_count(1).build());
            let (calls_tx, calls) = crossbeam_channel::unbounded();
            let first = kubelet(&env, &socket, calls_tx.clone());
            let (events_tx, events) = crossbeam_channel::unbounded();
            let commands =
                RegisterThread::spawn(Arc::clone(&env), socket.clone(), events_tx).unwrap();
            let bench = Bench {
                _dir: dir,
                socket,
                env,
                calls_tx,
                calls,
                events,
                commands,
            };
            (bench, first)
        }

        /// Stops `kubelet` and starts another at the same path.
        fn restart(&self, mut kubelet: grpcio::Server) -> grpcio::Server {
            futures_executor::block_on(kubelet.shutdown()).unwrap();
            drop(kubelet);
            let _ = std::fs::remove_file(&self.socket);
            self::kubelet(&self.env, &self.socket, self.calls_tx.clone())
        }
    }

    #[test]
    fn the_same_server_is_registered_once_per_kubelet_start() {
        let (bench, first) = Bench::new();
        let Bench {
            commands,
            events,
            calls,
            ..
        } = &bench;

        commands.send(job("a", 1));
        assert_eq!(registered(events), "a");
        // Asked again for the same server and kubelet: skipped. "b" shows when it was handled.
        commands.send(job("a", 1));
        commands.send(job("b", 1));
        assert_eq!(registered(events), "b");
        let seen: Vec<String> = calls.try_iter().collect();
        assert_eq!(seen, ["a", "b"]);

        // A new server for "a" registers again.
        commands.send(job("a", 2));
        assert_eq!(registered(events), "a");
        // So does the same server with a new kubelet.
        let _second = bench.restart(first);
        commands.send(job("a", 2));
        assert_eq!(registered(events), "a");
        assert_eq!(calls.try_iter().collect::<Vec<_>>(), ["a", "a"]);

        let Bench {
            commands, events, ..
        } = bench;
        drop(commands);
        assert!(matches!(
            events.recv_timeout(Duration::ZERO),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn a_server_the_kubelet_dropped_is_registered_again_but_only_with_that_kubelet() {
        let (bench, first) = Bench::new();
        bench.commands.send(job("a", 1));
        assert_eq!(registered(&bench.events), "a");

        // The same server and kubelet: not a repeat, since the kubelet dropped it.
        bench.commands.send(again("a", 1));
        assert_eq!(registered(&bench.events), "a");
        assert_eq!(bench.calls.try_iter().collect::<Vec<_>>(), ["a", "a"]);

        // Asked of a kubelet that then restarts: the request was for the old one, so it is
        // dropped, not sent to the new one (whose plugin watcher registers us by itself).
        let (events_tx, events) = crossbeam_channel::unbounded();
        let mut registrar = Registrar {
            env: Arc::clone(&bench.env),
            kubelet_socket: bench.socket.clone(),
            events: events_tx,
            pending: BTreeMap::new(),
            generation: 0,
            registered: BTreeMap::new(),
        };
        assert!(registrar.apply(again("a", 1)));
        let _second = bench.restart(first);
        let calls = &bench.calls;
        let (_commands, commands_rx) = crossbeam_channel::unbounded();
        assert!(registrar.attempt_due(&commands_rx));
        assert!(registrar.pending.is_empty());
        assert!(events.try_recv().is_err());
        // The same, asked of the new kubelet: sent.
        assert!(registrar.apply(again("a", 1)));
        assert!(registrar.attempt_due(&commands_rx));
        assert_eq!(registered(&events), "a");
        assert_eq!(calls.try_iter().collect::<Vec<_>>(), ["a"]);
    }

    /// A kubelet serving `registration` on a socket of its own, and the register thread dialing
    /// it: the kubelet (drop it last), the thread's events, and the thread.
    fn with_kubelet(
        registration: grpcio::Service,
    ) -> (
        (tempfile::TempDir, grpcio::Server),
        Receiver<Event>,
        RegisterThread,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kubelet.sock");
        let env = Arc::new(EnvBuilder::new().cq_count(1).build());
        let server = crate::rpc::test_server(&env, registration, &socket);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let commands = RegisterThread::spawn(env, socket, events_tx).unwrap();
        ((dir, server), events, commands)
    }

    /// A kubelet that answers no Register until `n` are in flight at once.
    #[derive(Clone)]
    struct Gathering {
        n: usize,
        waiting: Arc<std::sync::Mutex<Vec<UnarySink<proto::Empty>>>>,
    }

    impl proto::Registration for Gathering {
        fn register(
            &mut self,
            ctx: RpcContext<'_>,
            _req: proto::RegisterRequest,
            sink: UnarySink<proto::Empty>,
        ) {
            let mut waiting = self.waiting.lock().unwrap();
            waiting.push(sink);
            if waiting.len() == self.n {
                for sink in waiting.drain(..) {
                    ctx.spawn(sink.success(proto::Empty::new()).map(|_| ()));
                }
            }
        }
    }

    #[test]
    fn resources_due_together_are_registered_concurrently() {
        // Each Register waits for the kubelet to dial the plugin back: one after another, the
        // last resource of a kubelet that dropped them all would wait for every other's.
        let (_kubelet, events, commands) = with_kubelet(proto::create_registration(Gathering {
            n: 3,
            waiting: Arc::default(),
        }));
        commands.send(again("a", 1));
        commands.send(again("b", 1));
        commands.send(again("c", 1));
        let mut names: Vec<String> = (0..3).map(|_| registered(&events)).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
    }

    /// A kubelet that refuses the first Register, as 1.25 to 1.36 do one that lands while they
    /// still tear down the client they just dropped, and notes when each call came.
    #[derive(Clone)]
    struct RefusingOnce {
        calls: Sender<Instant>,
        refused: Arc<std::sync::atomic::AtomicBool>,
    }

    impl proto::Registration for RefusingOnce {
        fn register(
            &mut self,
            ctx: RpcContext<'_>,
            _req: proto::RegisterRequest,
            sink: UnarySink<proto::Empty>,
        ) {
            let _ = self.calls.send(Instant::now());
            if !self.refused.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let status = grpcio::RpcStatus::with_message(
                    grpcio::RpcStatusCode::UNKNOWN,
                    "failed to get device plugin options: the client connection is closing".into(),
                );
                ctx.spawn(sink.fail(status).map(|_| ()));
            } else {
                ctx.spawn(sink.success(proto::Empty::new()).map(|_| ()));
            }
        }
    }

    #[test]
    fn a_refused_registration_is_tried_again_within_milliseconds() {
        // Every millisecond between the refusal and the next call, the kubelet refuses pods
        // asking for the resource; the e2e suite holds that window under 100 ms.
        let (calls_tx, calls) = crossbeam_channel::unbounded();
        let (_kubelet, events, commands) = with_kubelet(proto::create_registration(RefusingOnce {
            calls: calls_tx,
            refused: Arc::default(),
        }));
        commands.send(again("a", 1));
        assert_eq!(registered(&events), "a");
        let first = calls.recv_timeout(WAIT).unwrap();
        let second = calls.recv_timeout(WAIT).unwrap();
        let gap = second - first;
        assert!(gap < Duration::from_millis(80), "tried again after {gap:?}");
    }

    /// A kubelet that keeps its answer to the first Register of "a" until the test gives it.    /// A kubelet that keeps its answer to the first Register of "a" until the test gives it.
    #[derive(Clone)]
    struct Holding {
        calls: Sender<String>,
        held: Arc<std::sync::Mutex<Option<Option<UnarySink<proto::Empty>>>>>,
    }

    impl proto::Registration for Holding {
        fn register(
            &mut self,
            ctx: RpcContext<'_>,
            req: proto::RegisterRequest,
            sink: UnarySink<proto::Empty>,
        ) {
            let _ = self.calls.send(req.resource_name.clone());
            let mut held = self.held.lock().unwrap();
            if req.resource_name == "a" && held.is_none() {
                *held = Some(Some(sink));
            } else {
                ctx.spawn(sink.success(proto::Empty::new()).map(|_| ()));
            }
        }
    }

    #[test]
    fn a_server_the_kubelet_dialled_through_an_older_registration_is_not_registered_twice() {
        // Our socket is replaced while a Register for the old server is in flight: the kubelet
        // dials the path, reaches the new server, and holds it. Registering the new one too
        // gives the kubelet two registrations of one socket, and 1.37 then keeps neither.
        let (calls_tx, calls) = crossbeam_channel::unbounded();
        let kubelet = Holding {
            calls: calls_tx,
            held: Arc::default(),
        };
        let held = Arc::clone(&kubelet.held);
        let (_kubelet, events, commands) = with_kubelet(proto::create_registration(kubelet));

        commands.send(job("a", 1));
        assert_eq!(calls.recv_timeout(WAIT).unwrap(), "a");
        let second = KubeletCalls::default();
        let mut replacement = Job {
            resource_name: "a".into(),
            endpoint: "a.sock".into(),
            options: Default::default(),
            server: 2,
            kubelet_calls: second.clone(),
        };
        commands.send(Command::Register(replacement.clone()));
        // "b" registered shows the thread took the replacement, which came before it.
        commands.send(job("b", 1));
        assert_eq!(registered(&events), "b");
        // The kubelet dials "a.sock", served by server 2 now, and answers the first call.
        second.add();
        let sink = held.lock().unwrap().as_mut().unwrap().take().unwrap();
        futures_executor::block_on(sink.success(proto::Empty::new())).unwrap();
        assert_eq!(registered(&events), "a");
        commands.send(job("c", 1));
        assert_eq!(registered(&events), "c");
        assert_eq!(calls.try_iter().collect::<Vec<_>>(), ["b", "c"]);

        // A server the kubelet did not call is registered.
        replacement.server = 3;
        replacement.kubelet_calls = KubeletCalls::default();
        commands.send(Command::Register(replacement));
        assert_eq!(registered(&events), "a");
        assert_eq!(calls.try_iter().collect::<Vec<_>>(), ["a"]);
    }
}
