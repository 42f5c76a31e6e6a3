//! The "signals" thread: forwards SIGTERM, SIGINT and SIGHUP to the control loop as events and does
//! nothing else, so no work ever runs in a signal handler.

use std::io;
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;
use log::error;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::daemon::Event;

pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl SignalThread {
    pub fn spawn(events: Sender<Event>) -> io::Result<SignalThread> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let handle = signals.handle();
        let thread = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let event = match signal {
                        SIGHUP => Event::Reload,
                        SIGINT => Event::Shutdown("SIGINT"),
                        _ => Event::Shutdown("SIGTERM"),
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            })?;
        Ok(SignalThread { handle, thread })
    }

    /// Stops forwarding and waits for the thread.
    pub fn stop(self) {
        self.handle.close();
        if self.thread.join().is_err() {
            error!("the signals thread panicked");
        }
    }
}
