//! Latest-state broadcast from the control loop (main thread) to its readers: ListAndWatch and
//! DRA health responders, which run as futures on the gRPC completion-queue thread, and DRA's
//! "prepare" and "slices" threads, which read the latest when they need it.
//!
//! Each subscriber has a one-slot crossbeam channel that always holds the newest state it has not
//! seen, plus a waker so a responder future can sleep until there is something to send. A slow
//! subscriber never makes the publisher wait and never receives stale lists: it skips straight to
//! the latest one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use futures_util::task::AtomicWaker;

/// Holds the latest value and hands it to every subscriber.
pub struct Broadcast<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    latest: T,
    subscribers: Vec<Slot<T>>,
}

struct Slot<T> {
    tx: Sender<T>,
    // A second receiver lets the publisher empty the slot before putting the newest value in.
    stale: Receiver<T>,
    waker: Arc<AtomicWaker>,
    closed: Arc<AtomicBool>,
}

impl<T> Slot<T> {
    fn subscriber_gone(&self) -> bool {
        // The subscription holds the only other reference to the waker.
        Arc::strong_count(&self.waker) == 1
    }
}

/// One subscriber's view: yields the newest value published since it last looked.
pub struct Subscription<T> {
    rx: Receiver<T>,
    waker: Arc<AtomicWaker>,
    closed: Arc<AtomicBool>,
}

impl<T: Clone> Broadcast<T> {
    pub fn new(initial: T) -> Broadcast<T> {
        Broadcast {
            inner: Mutex::new(Inner {
                latest: initial,
                subscribers: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panic while holding this lock cannot leave the data half-written: every critical
        // section replaces whole values. Keep serving rather than poisoning every caller.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value most recently published.
    pub fn latest(&self) -> T {
        self.lock().latest.clone()
    }

    /// Replaces the latest value and wakes every subscriber; forgets subscribers that are gone.
    pub fn publish(&self, value: T) {
        let mut inner = self.lock();
        inner.subscribers.retain(|slot| {
            if slot.subscriber_gone() {
                return false;
            }
            while slot.stale.try_recv().is_ok() {}
            // Cannot be full (just emptied under the lock) nor disconnected (we hold a receiver).
            let _ = slot.tx.try_send(value.clone());
            slot.waker.wake();
            true
        });
        inner.latest = value;
    }

    /// A new subscription whose first value is the latest one.
    pub fn subscribe(&self) -> Subscription<T> {
        let mut inner = self.lock();
        inner.subscribers.retain(|slot| !slot.subscriber_gone());
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.try_send(inner.latest.clone())
            .expect("a new one-slot channel has room for one value");
        let waker = Arc::new(AtomicWaker::new());
        let closed = Arc::new(AtomicBool::new(false));
        inner.subscribers.push(Slot {
            tx,
            stale: rx.clone(),
            waker: Arc::clone(&waker),
            closed: Arc::clone(&closed),
        });
        Subscription { rx, waker, closed }
    }

    /// Ends every subscription: each sees `None` once it has taken what was already sent.
    pub fn close(&self) {
        let slots = std::mem::take(&mut self.lock().subscribers);
        for slot in slots {
            slot.closed.store(true, Ordering::Release);
            drop(slot.tx);
            drop(slot.stale);
            slot.waker.wake();
        }
    }

    /// How many subscribers are still listening.
    pub fn subscriber_count(&self) -> usize {
        let mut inner = self.lock();
        inner.subscribers.retain(|slot| !slot.subscriber_gone());
        inner.subscribers.len()
    }
}

impl<T> Subscription<T> {
    /// Ready with the newest unseen value, `None` once the broadcast closed this subscription, or
    /// pending (and woken later) when there is nothing new.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Register before looking, so a publish between the two cannot be missed.
        self.waker.register(cx.waker());
        match self.rx.try_recv() {
            Ok(value) => Poll::Ready(Some(value)),
            Err(TryRecvError::Empty) => Poll::Pending,
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
        }
    }

    /// Whether the broadcast ended this subscription (`Broadcast::close`), as opposed to its
    /// reader going away: tells a stream we ended from one its client ended.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Blocks until a new value or the end; for callers that are not futures.
    pub fn recv(&self) -> Option<T> {
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker;
    use std::thread;

    fn poll<T>(sub: &Subscription<T>) -> Poll<Option<T>> {
        sub.poll_next(&mut Context::from_waker(&noop_waker()))
    }

    #[test]
    fn a_subscriber_first_gets_the_latest_value() {
        let b = Broadcast::new(1);
        b.publish(2);
        let sub = b.subscribe();
        assert_eq!(poll(&sub), Poll::Ready(Some(2)));
        assert_eq!(poll(&sub), Poll::Pending);
    }

    #[test]
    fn a_slow_subscriber_skips_to_the_newest_value() {
        let b = Broadcast::new(0);
        let sub = b.subscribe();
        for v in 1..=5 {
            b.publish(v);
        }
        assert_eq!(poll(&sub), Poll::Ready(Some(5)));
        assert_eq!(poll(&sub), Poll::Pending);
        assert_eq!(b.latest(), 5);
    }

    #[test]
    fn close_ends_subscriptions() {
        let b = Broadcast::new(0);
        let sub = b.subscribe();
        assert_eq!(poll(&sub), Poll::Ready(Some(0)));
        b.close();
        assert_eq!(poll(&sub), Poll::Ready(None));
        assert_eq!(b.subscriber_count(), 0);
    }

    #[test]
    fn dropped_subscribers_are_forgotten() {
        let b = Broadcast::new(0);
        let kept = b.subscribe();
        drop(b.subscribe());
        assert_eq!(b.subscriber_count(), 1);
        b.publish(1);
        assert_eq!(poll(&kept), Poll::Ready(Some(1)));
    }

    #[test]
    fn publish_wakes_a_blocked_receiver() {
        let b = Arc::new(Broadcast::new(0));
        let sub = b.subscribe();
        assert_eq!(sub.recv(), Some(0));
        let publisher = Arc::clone(&b);
        let t = thread::spawn(move || publisher.publish(7));
        assert_eq!(sub.recv(), Some(7));
        t.join().unwrap();
    }

    #[test]
    fn publish_wakes_the_registered_waker() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::{Wake, Waker};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let b = Broadcast::new(0);
        let sub = b.subscribe();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(sub.poll_next(&mut cx), Poll::Ready(Some(0)));
        assert_eq!(sub.poll_next(&mut cx), Poll::Pending);
        b.publish(1);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(sub.poll_next(&mut cx), Poll::Ready(Some(1)));
    }
}
