//! Glue between grpcio's futures and our blocking threads: a waker that posts to a crossbeam
//! channel, so a plain thread (main, "register") can wait for a gRPC future and for its other
//! channels in one `select!`, and the one way handlers hand an answer to a unary sink, or the
//! latest state of a broadcast to a server stream, without blocking the completion-queue thread.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use futures_util::{FutureExt, Sink, SinkExt};
use grpcio::{RpcContext, RpcStatus, ServerStreamingSink, UnarySink, WriteFlags};
use log::{debug, info};

use crate::broadcast::Subscription;

struct Notify(Sender<()>);

impl Wake for Notify {
    fn wake(self: Arc<Self>) {
        // One pending notice is enough: the waiter polls the future again either way.
        let _ = self.0.try_send(());
    }
}

/// A future driven from a blocking thread: poll it, and when it is pending, wait on
/// [`Driven::woken`] (alone or in a `select!` with other channels) before polling again.
pub struct Driven<F> {
    future: F,
    waker: Waker,
    woken: Receiver<()>,
}

impl<F: Future + Unpin> Driven<F> {
    /// Wraps `future`; nothing runs until the first `poll`.
    pub fn new(future: F) -> Driven<F> {
        let (tx, woken) = crossbeam_channel::bounded(1);
        Driven {
            future,
            waker: Waker::from(Arc::new(Notify(tx))),
            woken,
        }
    }

    /// Polls the future once.
    pub fn poll(&mut self) -> Poll<F::Output> {
        let mut cx = Context::from_waker(&self.waker);
        Pin::new(&mut self.future).poll(&mut cx)
    }

    /// Receives a notice whenever the future wants to be polled again.
    pub fn woken(&self) -> &Receiver<()> {
        &self.woken
    }

    /// The future itself, e.g. to cancel the call behind it.
    pub fn inner(&mut self) -> &mut F {
        &mut self.future
    }

    /// Drives the future on this thread until it completes or `deadline` passes; the future
    /// keeps running (on gRPC's side) if the deadline passes first.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<F::Output> {
        loop {
            if let Poll::Ready(output) = self.poll() {
                return Some(output);
            }
            if self.woken.recv_deadline(deadline).is_err() {
                return None;
            }
        }
    }
}

/// Hands a unary answer to the sink without waiting for it to be written (handlers run on the
/// completion-queue thread, which must never block).
pub fn reply<T: Send + 'static>(
    ctx: &RpcContext<'_>,
    sink: UnarySink<T>,
    method: &'static str,
    answer: Result<T, RpcStatus>,
) {
    let written = match answer {
        Ok(value) => sink.success(value),
        Err(status) => {
            debug!("{method}: {}", status.message());
            sink.fail(status)
        }
    };
    ctx.spawn(written.map(move |result| {
        if let Err(e) = result {
            debug!("{method}: could not send the answer: {e}");
        }
    }));
}

/// How a server stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// We ended it: the broadcast closed (the server stopping, the process ending).
    Ours,
    /// The client ended it, or its connection broke.
    Client,
}

/// Writes every value `subscription` yields to a server stream, as `render` makes it a message,
/// until the client leaves or the broadcast closes; `sent` runs after each write. Sleeps between
/// values: no timer, no thread, and a client that goes away wakes it at once. `what` names the
/// stream in the log ("ListAndWatch stream for ..."). Says who ended it.
pub async fn stream_latest<T, M>(
    mut sink: ServerStreamingSink<M>,
    subscription: Subscription<T>,
    what: String,
    mut render: impl FnMut(T) -> M,
    mut sent: impl FnMut(),
) -> StreamEnd {
    // A call cancelled while we stop the server looks like a client that left; the broadcast,
    // closed before any server stops, tells the two apart.
    let ended = |subscription: &Subscription<T>| {
        if subscription.closed() {
            StreamEnd::Ours
        } else {
            StreamEnd::Client
        }
    };
    loop {
        let next = poll_fn(|cx| {
            // Polling the sink also registers for the call's end, so a client that goes away
            // wakes us even when nothing new is due.
            if let Poll::Ready(Err(e)) = Pin::new(&mut sink).poll_ready(cx) {
                return Poll::Ready(Err(e));
            }
            subscription.poll_next(cx).map(Ok)
        })
        .await;
        match next {
            Ok(Some(value)) => {
                if let Err(e) = sink.send((render(value), WriteFlags::default())).await {
                    info!("{what} ended: {e}");
                    return ended(&subscription);
                }
                sent();
            }
            Ok(None) => {
                // Ending the stream with OK tells the kubelet we stopped on purpose.
                let _ = sink.close().await;
                info!("{what} closed by the plugin");
                return StreamEnd::Ours;
            }
            Err(e) => {
                info!("{what} ended: {e}");
                return ended(&subscription);
            }
        }
    }
}

/// How long shutdown waits for the completion-queue thread to finish.
const CQ_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// gRPC's environment, with the one completion-queue thread ("grpc-0") every server of the
/// process shares, and what tells when that thread has ended.
pub fn environment() -> (Arc<grpcio::Environment>, CqExit) {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let env = grpcio::EnvBuilder::new()
        // One completion-queue thread serves every resource: the kubelet holds one connection
        // per resource and gRPC serialises each connection's work anyway, and two threads
        // measured slower on Allocate, alone and concurrent (BENCHMARKS.md, "What was tried").
        .cq_count(1)
        .name_prefix("grpc")
        .before_stop(move || {
            let _ = done_tx.try_send(());
        })
        .build();
    (Arc::new(env), CqExit(done))
}

/// The end of the completion-queue thread, which comes when the last reference to its
/// environment goes.
pub struct CqExit(Receiver<()>);

impl CqExit {
    /// Drops `env` (the caller's last reference) and waits, boundedly, for the thread to end.
    pub fn wait(self, env: Arc<grpcio::Environment>) {
        drop(env);
        if self.0.recv_timeout(CQ_EXIT_TIMEOUT).is_err() {
            log::warn!("the gRPC completion-queue thread did not stop within {CQ_EXIT_TIMEOUT:?}");
        }
    }
}

/// A started server for `service` on the Unix socket `socket`, for unit tests that need a real
/// gRPC peer (a kubelet, a client of ours).
#[cfg(test)]
pub fn test_server(
    env: &Arc<grpcio::Environment>,
    service: grpcio::Service,
    socket: &std::path::Path,
) -> grpcio::Server {
    let mut server = grpcio::ServerBuilder::new(Arc::clone(env))
        .register_service(service)
        .build()
        .unwrap();
    server
        .add_listening_port(
            format!("unix:{}", socket.display()),
            grpcio::ServerCredentials::insecure(),
        )
        .unwrap();
    server.start();
    server
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pending_future_is_polled_again_once_woken() {
        let (tx, rx) = futures_channel_like();
        let mut driven = Driven::new(Box::pin(async move { rx.await_value().await }));
        assert!(driven.poll().is_pending());
        assert!(driven.woken().try_recv().is_err(), "nothing woke it yet");
        tx.send(7);
        driven
            .woken()
            .recv_timeout(Duration::from_secs(10))
            .expect("woken by the send");
        assert_eq!(driven.poll(), Poll::Ready(7));
    }

    #[test]
    fn waiting_gives_up_at_the_deadline() {
        let mut driven = Driven::new(std::future::pending::<()>());
        assert_eq!(driven.wait_until(Instant::now()), None);
        let mut ready = Driven::new(std::future::ready(3));
        assert_eq!(ready.wait_until(Instant::now()), Some(3));
    }

    /// A one-shot value whose arrival wakes the task waiting for it, from another thread.
    fn futures_channel_like() -> (OneShotTx, OneShotRx) {
        let shared = Arc::new(std::sync::Mutex::new((None, None::<Waker>)));
        (OneShotTx(Arc::clone(&shared)), OneShotRx(shared))
    }

    type Slot = Arc<std::sync::Mutex<(Option<i32>, Option<Waker>)>>;
    struct OneShotTx(Slot);
    struct OneShotRx(Slot);

    impl OneShotTx {
        fn send(self, value: i32) {
            let waker = {
                let mut slot = self.0.lock().unwrap();
                slot.0 = Some(value);
                slot.1.take()
            };
            std::thread::spawn(move || waker.into_iter().for_each(Waker::wake))
                .join()
                .unwrap();
        }
    }

    impl OneShotRx {
        async fn await_value(self) -> i32 {
            std::future::poll_fn(|cx| {
                let mut slot = self.0.lock().unwrap();
                match slot.0 {
                    Some(v) => Poll::Ready(v),
                    None => {
                        slot.1 = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await
        }
    }
}
