//! The kubelet's DRAPlugin service, both versions (completion-queue threads): each call becomes a
//! batch for the "prepare" thread, which answers it; a handler itself never waits, so the API
//! server's latency never holds a completion-queue thread.

use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, UnarySink};
use log::debug;

use super::claims::{Answered, ClaimRef, Job, Jobs, Outcome, Prepared, Refused};
use crate::metrics::{ClaimResult, Metrics};
use crate::proto::dra::{v1, v1beta1};

/// The DRAPlugin service for one driver.
#[derive(Clone)]
pub struct DraService {
    jobs: Jobs,
    /// Where refused calls are counted; the "prepare" thread counts the rest.
    metrics: Arc<Metrics>,
}

impl DraService {
    /// Handlers that hand their batches to `jobs`.
    pub fn new(jobs: Jobs, metrics: Arc<Metrics>) -> DraService {
        DraService { jobs, metrics }
    }

    fn submit<T: Send + 'static>(
        &self,
        ctx: &RpcContext<'_>,
        method: &'static str,
        prepare: bool,
        claims: Vec<ClaimRef>,
        sink: UnarySink<T>,
        to_response: fn(Outcome) -> T,
    ) {
        let answer = Box::new(move |outcome: Result<Outcome, RpcStatus>| -> Answered {
            match outcome {
                Ok(outcome) => sink.success(to_response(outcome)).boxed(),
                Err(status) => sink.fail(status).boxed(),
            }
        });
        let job = Job {
            prepare,
            received: Instant::now(),
            claims,
            answer,
        };
        if let Err((refused, job)) = self.jobs.submit(job) {
            let why = match refused {
                Refused::Busy => "too many batches are waiting; try again",
                Refused::Stopping => "the plugin is stopping",
            };
            debug!("{method}: {why}");
            for _ in &job.claims {
                self.metrics.claim_call(prepare, ClaimResult::Unavailable);
            }
            let status = RpcStatus::with_message(RpcStatusCode::UNAVAILABLE, why.to_owned());
            // The write starts now; the completion-queue thread only polls for its end.
            ctx.spawn((job.answer)(Err(status)).map(move |result| {
                if let Err(e) = result {
                    debug!("{method}: could not send the answer: {e}");
                }
            }));
        }
    }
}

/// The glue between one version's generated types and ours: both versions carry the same
/// fields under different packages (the wire path), so one body serves both.
macro_rules! version {
    // `share_id` only where the version's Device has it (v1; v1beta1 predates shared devices).
    ($v:ident $(, $share_id:ident)?) => {
        impl $v::DraPlugin for DraService {
            fn node_prepare_resources(
                &mut self,
                ctx: RpcContext<'_>,
                req: $v::NodePrepareResourcesRequest,
                sink: UnarySink<$v::NodePrepareResourcesResponse>,
            ) {
                let claims = claims!(req);
                self.submit(
                    &ctx,
                    "NodePrepareResources",
                    true,
                    claims,
                    sink,
                    |outcome| {
                        let mut response = $v::NodePrepareResourcesResponse::new();
                        for (uid, result) in outcome {
                            let mut one = $v::NodePrepareResourceResponse::new();
                            match result {
                                Ok(devices) => {
                                    one.devices = devices
                                        .into_iter()
                                        .map(|p: Prepared| {
                                            let mut d = $v::Device::new();
                                            d.request_names = p.requests;
                                            d.pool_name = p.pool;
                                            d.device_name = p.device;
                                            d.cdi_device_ids = p.cdi_ids;
                                            $(d.$share_id = p.share_id;)?
                                            d
                                        })
                                        .collect();
                                }
                                Err(e) => one.error = e,
                            }
                            response.claims.insert(uid, one);
                        }
                        response
                    },
                );
            }

            fn node_unprepare_resources(
                &mut self,
                ctx: RpcContext<'_>,
                req: $v::NodeUnprepareResourcesRequest,
                sink: UnarySink<$v::NodeUnprepareResourcesResponse>,
            ) {
                let claims = claims!(req);
                self.submit(
                    &ctx,
                    "NodeUnprepareResources",
                    false,
                    claims,
                    sink,
                    |outcome| {
                        let mut response = $v::NodeUnprepareResourcesResponse::new();
                        for (uid, result) in outcome {
                            let mut one = $v::NodeUnprepareResourceResponse::new();
                            if let Err(e) = result {
                                one.error = e;
                            }
                            response.claims.insert(uid, one);
                        }
                        response
                    },
                );
            }
        }
    };
}

/// The claims of a request, as ours.
macro_rules! claims {
    ($req:expr) => {
        $req.claims
            .iter()
            .map(|c| ClaimRef {
                uid: c.uid.clone(),
                namespace: c.namespace.clone(),
                name: c.name.clone(),
            })
            .collect()
    };
}

version!(v1, share_id);
version!(v1beta1);
