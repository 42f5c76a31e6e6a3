//! Driving grpcio's futures from our own blocking threads (main, register): a waker that posts to
//! a crossbeam channel, so a thread can wait for a future and for other channels in one `select!`.

use std::sync::Arc;
use std::task::{Wake, Waker};

use crossbeam_channel::{Receiver, Sender};

struct Notify(Sender<()>);

impl Wake for Notify {
    fn wake(self: Arc<Self>) {
        // One pending notice is enough: the waiter polls the future again either way.
        let _ = self.0.try_send(());
    }
}

/// A waker and the channel it posts to when woken.
pub fn channel_waker() -> (Waker, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    (Waker::from(Arc::new(Notify(tx))), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waking_posts_once_however_often() {
        let (waker, rx) = channel_waker();
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
        drop(waker);
        assert!(rx.recv().is_err(), "the channel closes with the last waker");
    }
}
