//! Rebalances: they run inside `poll`. Before partitions are revoked the
//! current work is committed; when partitions are assigned their state is
//! restored from the changelogs before any of their records is processed (the
//! pod reports not ready meanwhile).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::host::Shared;
use crate::host::process::{Core, add_task_metrics};

/// The consumer's context: rebalance callbacks reach the engine's core.
pub(super) struct ConsumerCtx {
    pub(super) core: Arc<Mutex<Core>>,
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for ConsumerCtx {}

impl ConsumerContext for ConsumerCtx {
    /// Results of asynchronous commits (at-least-once intervals). Only counted:
    /// the next commit covers a failed one. The core is not locked here, as
    /// librdkafka may call this from inside a synchronous commit.
    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(%error, "an offset commit failed; the next one covers it");
            if let Ok(metrics) = self.shared.metrics.lock() {
                metrics.commit_failures.with_label_values(&["kafka"]).inc();
            }
        }
    }

    /// The default rebalance, except that restored partitions get their start
    /// offsets in the assignment itself (so nothing is ever fetched from the
    /// committed offset first), and that partitions assigned while stopped are
    /// paused at once.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                {
                    let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(error) = core.prepare_restores(consumer, tpl) {
                        tracing::error!(%error, "reading where restored partitions start failed");
                        core.fatal = Some(error);
                    }
                }
                if let Err(error) = assign(consumer, tpl) {
                    tracing::error!(%error, "assigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                if let Err(error) = unassign(consumer, tpl) {
                    tracing::error!(%error, "unassigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let code: rdkafka::types::RDKafkaErrorCode = other.into();
                tracing::warn!(%code, "rebalance error");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
            core.shared
                .metrics
                .lock()
                .map(|m| m.rebalances.with_label_values(&["revoke"]).inc())
                .ok();
            // Lost partitions (the session expired) may already belong to another
            // instance: their work must not be committed, only thrown away.
            if consumer.assignment_lost() {
                core.abort_open_transaction();
            } else if let Err(error) = core.commit(consumer, "rebalance") {
                tracing::error!(%error, "commit before revocation failed; the work since the last commit is redone by the new owner");
                core.abort_open_transaction();
            }
            core.drop_tasks(&partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                core.shared
                    .metrics
                    .lock()
                    .map(|m| m.rebalances.with_label_values(&["assign"]).inc())
                    .ok();
                if let Err(error) = core
                    .add_tasks(consumer, &partitions)
                    .and_then(|()| core.commit_restores(consumer))
                {
                    // Without its state a partition cannot be processed correctly:
                    // stop, and let the restart (and a new rebalance) try again.
                    tracing::error!(%error, "restoring assigned partitions failed");
                    core.fatal = Some(error);
                }
                if core.stopped
                    && let Err(error) = consumer.pause(tpl)
                {
                    tracing::error!(%error, "pausing partitions assigned while stopped failed");
                }
                core.shared.joined.store(true, Ordering::SeqCst);
                core.update_assignment_metrics();
            }
            Rebalance::Revoke(_) => {
                let core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                core.update_assignment_metrics();
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

impl Core {
    pub(super) fn drop_tasks(&mut self, partitions: &[i32]) {
        for partition in partitions {
            if let Some(task) = self.tasks.remove(partition) {
                add_task_metrics(&mut self.retired, &task);
            }
            self.positions.remove(partition);
            self.committed.remove(partition);
            for sealed in &mut self.sealed {
                sealed.positions.remove(partition);
            }
            self.live.remove(partition);
            self.unfollow_table_partition(*partition);
        }
    }

    /// Counts the tasks, one per assigned partition, rather than asking the
    /// consumer: these run inside rebalance callbacks, and `assignment()` there
    /// can block for good while the consumer closes (seen at shutdown).
    pub(super) fn update_assignment_metrics(&self) {
        let assigned = self.tasks.len();
        self.shared
            .metrics
            .lock()
            .map(|m| {
                m.assigned_partitions.set(assigned as i64);
                m.restoring_partitions
                    .set(self.shared.restoring.load(Ordering::SeqCst) as i64);
            })
            .ok();
    }
}

fn assign(consumer: &BaseConsumer<ConsumerCtx>, tpl: &TopicPartitionList) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
        _ => consumer.assign(tpl),
    }
}

fn unassign(consumer: &BaseConsumer<ConsumerCtx>, tpl: &TopicPartitionList) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
        _ => consumer.unassign(),
    }
}
