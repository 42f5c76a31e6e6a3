//! Liveness and readiness on a Unix socket of our own (the "health" thread), and the `alive`
//! subcommand that asks it (the kubelet's exec probes). The socket lives inside our container, so
//! no pod can reach it, flood it or starve it, unlike the metrics port every pod may scrape; it
//! answers `ok` only once the control loop has taken a ping off its queue, so a wedged loop fails
//! the probe, and, asked for readiness, only when `/readyz` would.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use log::info;

use crate::event::{Event, Pong};
use crate::metrics::Metrics;
use crate::thread::ThreadHandle;

/// How long the control loop has to answer a ping: far longer than any turn of it takes.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How long a connection may take to ask and to read its answer.
const CONNECTION_WITHIN: Duration = Duration::from_secs(1);

/// What a prober asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Question {
    /// Whether the control loop answers (liveness).
    Alive,
    /// That, and whether the kubelet holds every endpoint (readiness, as `/readyz`).
    Ready,
}

impl Question {
    fn word(self) -> &'static str {
        match self {
            Question::Alive => "alive",
            Question::Ready => "ready",
        }
    }
}

/// What can fail here. Each variant's `#[error]` message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot listen on the health socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the health thread")]
    Spawn(#[source] io::Error),
    #[error("cannot ask {path} whether the plugin is alive")]
    Ask {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the plugin is not alive: {answer}")]
    NotAlive { answer: String },
}

/// The health socket and the thread answering on it; the socket goes when it stops.
pub struct HealthServer {
    thread: ThreadHandle,
    path: PathBuf,
}

impl HealthServer {
    /// Listens on `path` (a socket left there by an earlier run is replaced; anything else is an
    /// error) and answers each connection once the control loop, reached through `events`, has.
    pub fn start(
        path: &Path,
        metrics: &Arc<Metrics>,
        events: &Sender<Event>,
    ) -> Result<HealthServer, HealthError> {
        let error = |source| HealthError::Listen {
            path: path.to_owned(),
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => fs::remove_file(path).map_err(error)?,
            Ok(_) => {
                return Err(error(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "something other than a socket is there",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e)),
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(error)?;
        }
        let listener = UnixListener::bind(path).map_err(error)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(error)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stopping);
        let (wake, queue, metrics) = (path.to_owned(), events.clone(), Arc::clone(metrics));
        let thread = ThreadHandle::spawn(
            "health",
            events.clone(),
            move || answer_all(&listener, &queue, &metrics, &stopping),
            move || {
                stop_flag.store(true, Ordering::SeqCst);
                // Wakes the blocked accept; it sees the flag and ends.
                let _ = UnixStream::connect(&wake);
            },
        )
        .map_err(HealthError::Spawn)?;
        info!("answering liveness probes on {}", path.display());
        Ok(HealthServer {
            thread,
            path: path.to_owned(),
        })
    }

    /// Stops answering and removes the socket.
    pub fn stop(self) {
        self.thread.stop();
        let _ = fs::remove_file(&self.path);
    }
}

/// The "health" thread: one connection at a time, each answered with the control loop's word.
fn answer_all(
    listener: &UnixListener,
    events: &Sender<Event>,
    metrics: &Metrics,
    stopping: &AtomicBool,
) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = stream else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(CONNECTION_WITHIN));
        let _ = stream.set_write_timeout(Some(CONNECTION_WITHIN));
        // The whole line: a socket closed with unread bytes resets the prober's read.
        let mut asked = [0_u8; 16];
        let mut n = 0;
        while n < asked.len() && !asked[..n].contains(&b'\n') {
            match stream.read(&mut asked[n..]) {
                Ok(0) | Err(_) => break,
                Ok(read) => n += read,
            }
        }
        let question = match std::str::from_utf8(&asked[..n]).map(str::trim) {
            Ok("ready") => Question::Ready,
            _ => Question::Alive,
        };
        let mut answer = ask_control_loop(events);
        if question == Question::Ready && answer == "ok\n" {
            if let Err(why) = metrics.ready() {
                answer = format!("not ready: {why}\n");
            }
        }
        let _ = stream.write_all(answer.as_bytes());
    }
}

/// `ok` once the control loop has taken a ping off its queue; why not, otherwise.
fn ask_control_loop(events: &Sender<Event>) -> String {
    let (pong, answered) = crossbeam_channel::bounded(1);
    if events.send(Event::Ping(Pong::new(pong))).is_err() {
        return "the control loop has ended\n".to_owned();
    }
    match answered.recv_timeout(ANSWER_WITHIN) {
        Ok(()) => "ok\n".to_owned(),
        Err(_) => format!("the control loop did not answer within {ANSWER_WITHIN:?}\n"),
    }
}

/// The `alive` subcommand: asks the health socket at `path`; an error unless it says `ok`.
pub fn alive(path: &Path, question: Question, timeout: Duration) -> Result<(), HealthError> {
    let ask = |source| HealthError::Ask {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(ask)?;
    stream.set_read_timeout(Some(timeout)).map_err(ask)?;
    stream.set_write_timeout(Some(timeout)).map_err(ask)?;
    stream
        .write_all(format!("{}\n", question.word()).as_bytes())
        .map_err(ask)?;
    let mut answer = String::new();
    stream.take(256).read_to_string(&mut answer).map_err(ask)?;
    if answer.trim() == "ok" {
        Ok(())
    } else {
        Err(HealthError::NotAlive {
            answer: answer.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new())
    }

    #[test]
    fn alive_only_while_the_control_loop_answers_and_ready_as_readyz() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/health.sock");
        let (events_tx, events) = crossbeam_channel::unbounded();
        let metrics = metrics();
        let server = HealthServer::start(&path, &metrics, &events_tx).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A control loop that answers pings.
        let answering = std::thread::spawn(move || {
            for _ in 0..2 {
                if let Ok(Event::Ping(pong)) = events.recv() {
                    pong.answer();
                }
            }
            events
        });
        alive(&path, Question::Alive, Duration::from_secs(5)).unwrap();
        // Alive, but not ready before the resources are set up: /readyz's reason.
        let e = alive(&path, Question::Ready, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("not ready: starting"), "{e}");
        let events = answering.join().unwrap();
        // One that does not: the probe says why.
        let e = alive(&path, Question::Alive, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("did not answer within 2s"), "{e}");
        assert!(matches!(events.try_recv(), Ok(Event::Ping(_))));
        server.stop();
        assert!(!path.exists());
        assert!(alive(&path, Question::Alive, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("health.sock");
        drop(UnixListener::bind(&path).unwrap());
        let (events_tx, _events) = crossbeam_channel::unbounded();
        HealthServer::start(&path, &metrics(), &events_tx)
            .unwrap()
            .stop();
        fs::write(&path, b"").unwrap();
        let e = HealthServer::start(&path, &metrics(), &events_tx)
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot listen on the health socket"));
    }
}
