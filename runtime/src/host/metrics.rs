//! Prometheus metrics of a running stage. Names follow
//! `keystone_<noun>_<verb>_total`; labels are bounded (steps and partitions of
//! one stage).

use std::collections::HashMap;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::task::StepMetrics;

pub struct Metrics {
    registry: Registry,
    events_in: IntCounterVec,
    events_out: IntCounterVec,
    events_dropped: IntCounterVec,
    events_dead_lettered: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub commit_duration: Histogram,
    pub commit_failures: IntCounterVec,
    pub state_entries: IntGaugeVec,
    pub changelog_bytes: IntCounterVec,
    pub restore_records: IntCounter,
    pub restoring_partitions: IntGauge,
    pub assigned_partitions: IntGauge,
    pub rebalances: IntCounterVec,
    /// 1 while processing is stopped after `POST /checkpoint?stop=true`.
    pub stopped: IntGauge,
    /// 1 while intake is paused because a sink is behind (backpressure, or
    /// writes not yet durable at a commit).
    pub sink_held: IntGauge,
    /// 1 while intake is paused because held-back events reached the limit.
    pub buffer_held: IntGauge,
    /// 1 while intake waits for the schema registry to answer (Avro sources).
    pub registry_waiting: IntGauge,
    /// Bytes of events the instance's steps hold back.
    pub buffered_bytes: IntGauge,
    /// Partitions to which this process applied a `--restore` plan.
    pub restores_applied: IntCounter,
    /// Changelog records written to undo state changes after a restore position.
    pub restore_compensations: IntCounter,
    /// Sink records not written again because the sink already holds them (replay suppression).
    pub suppressed_records: IntCounterVec,
    /// Seconds since the engine loop last made progress (0 before it runs).
    engine_since_progress: prometheus::Gauge,
    /// 1 while the watchdog finds the engine stuck (then `/healthz` fails).
    engine_stalled: IntGauge,
    /// The totals already added to the counters, per step, so that cumulative
    /// task counters can be turned into increments.
    reported: HashMap<String, StepMetrics>,
}

pub(crate) fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("unique metric");
    counter
}

pub(crate) fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("unique metric");
    counter
}

pub(crate) fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("unique metric");
    gauge
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let gauge = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("unique metric");
    gauge
}

impl Metrics {
    pub fn new(pipeline: &str, stage: &str) -> Self {
        let mut labels = HashMap::new();
        labels.insert("pipeline".to_owned(), pipeline.to_owned());
        labels.insert("stage".to_owned(), stage.to_owned());
        let registry = Registry::new_custom(None, Some(labels)).expect("valid registry");
        let step = &["step"];
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keystone_commit_duration_seconds",
                "Time to commit outputs, changelog writes and offsets together",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(commit_duration.clone()))
            .expect("unique metric");
        let restore_records = counter(
            &registry,
            "keystone_restore_records_total",
            "Changelog and table records read to restore state",
        );
        let restoring_partitions = gauge(
            &registry,
            "keystone_restoring_partitions",
            "Input partitions whose state is being restored (not processed yet)",
        );
        let assigned_partitions = gauge(
            &registry,
            "keystone_assigned_partitions",
            "Input partitions this instance processes",
        );
        Self {
            events_in: counter_vec(
                &registry,
                "keystone_step_events_in_total",
                "Events that reached a step",
                step,
            ),
            events_out: counter_vec(
                &registry,
                "keystone_step_events_out_total",
                "Events a step emitted",
                step,
            ),
            events_dropped: counter_vec(
                &registry,
                "keystone_step_events_dropped_total",
                "Events a step discarded on purpose (filtered, duplicate, stale, no join match)",
                step,
            ),
            events_dead_lettered: counter_vec(
                &registry,
                "keystone_step_events_dead_lettered_total",
                "Events a step sent to the dead-letter topic",
                step,
            ),
            consumer_lag: gauge_vec(
                &registry,
                "keystone_consumer_lag",
                "Records between the committed position and the end of an input partition",
                &["partition"],
            ),
            commit_duration,
            commit_failures: counter_vec(
                &registry,
                "keystone_commit_failures_total",
                "Commits that failed, by reason",
                &["reason"],
            ),
            state_entries: gauge_vec(
                &registry,
                "keystone_state_entries",
                "Live keys in a step's state",
                step,
            ),
            changelog_bytes: counter_vec(
                &registry,
                "keystone_state_changelog_bytes_total",
                "Bytes of state changes written to a step's changelog topic",
                step,
            ),
            restore_records,
            restoring_partitions,
            assigned_partitions,
            rebalances: counter_vec(
                &registry,
                "keystone_rebalances_total",
                "Partition assignments and revocations",
                &["kind"],
            ),
            stopped: gauge(
                &registry,
                "keystone_runtime_stopped",
                "1 while processing is stopped after a checkpoint with stop=true",
            ),
            sink_held: gauge(
                &registry,
                "keystone_sink_intake_held",
                "1 while intake is paused because a sink is behind (backpressure, or writes not yet durable)",
            ),
            buffer_held: gauge(
                &registry,
                "keystone_buffer_intake_held",
                "1 while intake is paused because the events steps hold back reached the instance's limit (--max-buffered-bytes)",
            ),
            registry_waiting: gauge(
                &registry,
                "keystone_schema_registry_waiting",
                "1 while intake waits for the schema registry to answer for a writer schema (the batch is read again; nothing is dead-lettered)",
            ),
            buffered_bytes: gauge(
                &registry,
                "keystone_buffered_bytes",
                "Bytes of events the instance's steps hold back (order steps waiting for predecessors)",
            ),
            restores_applied: counter(
                &registry,
                "keystone_restore_applied_partitions_total",
                "Input partitions to which this process applied the --restore plan",
            ),
            restore_compensations: counter(
                &registry,
                "keystone_restore_compensation_records_total",
                "Changelog records written to bring state back to a restore position",
            ),
            suppressed_records: counter_vec(
                &registry,
                "keystone_replay_suppressed_records_total",
                "Sink records skipped on replay because the sink already holds them (per topic of a Kafka sink, per sink name of the others)",
                &["topic"],
            ),
            engine_since_progress: {
                let gauge = prometheus::Gauge::new(
                    "keystone_engine_seconds_since_progress",
                    "Seconds since the engine loop last made progress (0 before it runs)",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(gauge.clone()))
                    .expect("unique metric");
                gauge
            },
            engine_stalled: gauge(
                &registry,
                "keystone_engine_stalled",
                "1 while the engine made no progress for longer than the watchdog limit (/healthz fails)",
            ),
            registry,
            reported: HashMap::new(),
        }
    }

    /// The registry, where connectors register metrics of their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Brings the step counters up to the given cumulative totals.
    pub fn record_steps(&mut self, totals: &[StepMetrics]) {
        for total in totals {
            let last = self.reported.entry(total.name.clone()).or_default();
            let labels = [total.name.as_str()];
            self.events_in
                .with_label_values(&labels)
                .inc_by(total.events_in.saturating_sub(last.events_in));
            self.events_out
                .with_label_values(&labels)
                .inc_by(total.events_out.saturating_sub(last.events_out));
            self.events_dropped
                .with_label_values(&labels)
                .inc_by(total.dropped.saturating_sub(last.dropped));
            self.events_dead_lettered
                .with_label_values(&labels)
                .inc_by(total.dead_lettered.saturating_sub(last.dead_lettered));
            *last = total.clone();
        }
    }

    /// The watchdog as of a scrape: set by the endpoint, not the engine, which
    /// cannot report that it is stuck.
    pub fn set_watchdog(&self, since_beat: Option<std::time::Duration>, stalled: bool) {
        self.engine_since_progress
            .set(since_beat.map_or(0.0, |d| d.as_secs_f64()));
        self.engine_stalled.set(i64::from(stalled));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        buffer
    }
}
