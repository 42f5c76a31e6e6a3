//! The "signals" thread: forwards SIGTERM, SIGINT and SIGHUP to the control loop as events and does
//! nothing else. The only action in signal context is signal-hook's own: once a first SIGTERM or
//! SIGINT has started a graceful shutdown, a second one exits at once.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crossbeam_channel::Sender;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::flag;
use signal_hook::iterator::Signals;

use crate::event::Event;
use crate::thread::ThreadHandle;

/// Exit status when a second SIGTERM or SIGINT cuts a graceful shutdown short.
pub const SECOND_SIGNAL_EXIT: i32 = 130;

/// Starts the "signals" thread.
pub fn spawn(events: Sender<Event>) -> io::Result<ThreadHandle> {
    // The exit is registered before the flag, so the first signal only arms it.
    let armed = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        flag::register_conditional_shutdown(signal, SECOND_SIGNAL_EXIT, Arc::clone(&armed))?;
        flag::register(signal, Arc::clone(&armed))?;
    }
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let handle = signals.handle();
    let forward = events.clone();
    ThreadHandle::spawn(
        "signals",
        events,
        move || {
            for signal in signals.forever() {
                let event = match signal {
                    SIGHUP => Event::Reload,
                    SIGINT => Event::Shutdown("SIGINT"),
                    _ => Event::Shutdown("SIGTERM"),
                };
                if forward.send(event).is_err() {
                    return;
                }
            }
        },
        move || handle.close(),
    )
}
