//! The one way we run a thread of our own ("signals", "inotify", "register", "http", DRA's
//! "prepare", "claim-reader-N", "slices", "slice-watch" and "kubelet-release"): named, told
//! to stop by a closure its starter provides, joined, and its panic reported both as an event to
//! the control loop (at once, so the process does not go on without it) and in the log when
//! joined. Dropping a handle stops the thread.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;
use log::error;

use crate::event::Event;

/// A running thread of ours.
pub struct ThreadHandle {
    name: String,
    stop: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<JoinHandle<()>>,
}

impl ThreadHandle {
    /// Runs `body` on a thread called `name`. `stop` must make `body` return soon (close its
    /// channel, wake its blocking read); it runs on the thread that stops the handle. A panic in
    /// `body` sends `Event::ThreadPanicked` to `events`.
    pub fn spawn(
        name: &str,
        events: Sender<Event>,
        body: impl FnOnce() + Send + 'static,
        stop: impl FnOnce() + Send + 'static,
    ) -> io::Result<ThreadHandle> {
        let thread_name = name.to_owned();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(body)) {
                    error!(
                        "the {thread_name} thread panicked: {}",
                        panic_message(&*payload)
                    );
                    // The control loop is gone only while shutting down.
                    let _ = events.send(Event::ThreadPanicked(thread_name));
                }
            })?;
        Ok(ThreadHandle {
            name: name.to_owned(),
            stop: Some(Box::new(stop)),
            thread: Some(thread),
        })
    }

    /// Tells the thread to stop and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(thread) = self.thread.take() {
            // A panic was caught and reported inside the thread; this is what escaped that.
            if thread.join().is_err() {
                error!("the {} thread panicked", self.name);
            }
        }
    }
}

impl Drop for ThreadHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Threads stopped in the reverse of the order they started in, so a thread is stopped before
/// anything it depends on.
#[derive(Default)]
pub struct Threads(Vec<ThreadHandle>);

impl Threads {
    /// Keeps a started thread.
    pub fn push(&mut self, handle: ThreadHandle) {
        self.0.push(handle);
    }

    /// Stops every thread, the last started first.
    pub fn stop_all(&mut self) {
        while let Some(handle) = self.0.pop() {
            handle.stop();
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn a_stopped_thread_is_joined_and_named() {
        let (events, _rx) = crossbeam_channel::unbounded();
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let (name_tx, name_rx) = crossbeam_channel::bounded(1);
        let handle = ThreadHandle::spawn(
            "worker",
            events,
            move || {
                let _ = name_tx.send(thread::current().name().map(str::to_owned));
                // Blocks until the stop closure drops the sender.
                let _ = rx.recv();
            },
            move || drop(tx),
        )
        .unwrap();
        assert_eq!(name_rx.recv().unwrap().as_deref(), Some("worker"));
        handle.stop();
    }

    #[test]
    fn a_panic_is_reported_as_an_event() {
        let (events, rx) = crossbeam_channel::unbounded();
        let handle = ThreadHandle::spawn("doomed", events, || panic!("on purpose"), || {}).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Event::ThreadPanicked("doomed".into()))
        );
        handle.stop();
    }

    #[test]
    fn threads_stop_in_reverse_start_order() {
        let (events, _rx) = crossbeam_channel::unbounded();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Threads::default();
        for name in ["first", "second", "third"] {
            let (tx, rx) = crossbeam_channel::bounded::<()>(0);
            let order = Arc::clone(&order);
            threads.push(
                ThreadHandle::spawn(
                    name,
                    events.clone(),
                    move || {
                        let _ = rx.recv();
                    },
                    move || {
                        order.lock().unwrap().push(name);
                        drop(tx);
                    },
                )
                .unwrap(),
            );
        }
        threads.stop_all();
        assert_eq!(*order.lock().unwrap(), ["third", "second", "first"]);
    }
}
