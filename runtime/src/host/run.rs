//! The consume-process-commit loop of one stage instance.
//!
//! One task ([`StageTask`](crate::task::StageTask)) per assigned input
//! partition, each with its own state. Under exactly-once, everything one commit
//! interval produces — sink or repartition records, dead letters, changelog
//! records — and the consumed offsets go into one Kafka transaction
//! (`send_offsets_to_transaction` with the group's metadata, as Kafka Streams'
//! EOS v2 does). Under at-least-once the offsets of each interval are committed
//! once the outputs sent before them are acknowledged, while consumption goes on
//! (see `kafka::outbox`); rebalances, checkpoints and shutdown flush the producer
//! and commit synchronously. Sinks outside Kafka are prepared before every
//! commit and hold intake while they are behind (see `commit` and `checkpoint`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use keystone_crds::checkpoint::{InputRestore, ReplaySuppression, RestorePlan};
use keystone_crds::ops::Operator as Op;
use keystone_crds::pipeline::Delivery;
use keystone_crds::plan::{Plan, PlanStage, StageOutput};
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::Producer;

use crate::connectors::kafka::{AvroWriters, KafkaSink, load_delivered};
use crate::connectors::{self, Prepared, Sink, SinkContext};
use crate::event::{FieldPath, Provenance};
use crate::host::commit::COMMIT_RETRIES;
use crate::host::http::Control;
use crate::host::process::{Core, Records, Route, StateSource};
use crate::host::rebalance::ConsumerCtx;
use crate::host::registry::{SchemaFetcher, sink_writer};
use crate::host::restore::{ActiveRestore, restore_applied_everywhere};
use crate::host::sinks::Sinks;
use crate::host::tables::Tables;
use crate::host::{ServeArgs, ServeError, Shared};
use crate::kafka::outbox::Outbox;
use crate::kafka::records::provenance_of;
use crate::kafka::{KAFKA_TIMEOUT, config};
use crate::task::SourceCheck;

/// Records taken from `poll` before they are processed together.
const MAX_BATCH: usize = 2048;
/// Under exactly-once, how soon after the last commit a stage that has read
/// all its input commits, without waiting out the interval: its outputs are
/// invisible to `read_committed` readers until then. Kafka Streams' default
/// commit interval under exactly-once, so quiet inputs cost at most as many
/// transactions as they do there.
const CAUGHT_UP_COMMIT_AFTER: Duration = Duration::from_millis(100);

pub(super) fn run(
    args: &ServeArgs,
    plan: Arc<Plan>,
    stage: PlanStage,
    shared: Arc<Shared>,
    restore: Option<RestorePlan>,
    controls: mpsc::Receiver<Control>,
) -> Result<(), ServeError> {
    let exactly_once = plan.delivery == Delivery::ExactlyOnce;
    let state_sources: Vec<StateSource> = stage
        .steps
        .iter()
        .filter_map(|step| {
            let state = step.state.as_ref();
            match step.operator.single() {
                Some(Op::Join(join)) => Some(StateSource {
                    step: step.name.clone(),
                    topic: join.table.topic.clone(),
                    table: Some(join.table.clone()),
                }),
                Some(Op::Enrich(enrich)) => Some(StateSource {
                    step: step.name.clone(),
                    topic: enrich.table.topic.clone(),
                    table: Some(enrich.table.clone()),
                }),
                _ => state.map(|state| StateSource {
                    step: step.name.clone(),
                    topic: state.changelog_topic.clone(),
                    table: None,
                }),
            }
        })
        .collect();

    // One transactional id per stage instance: a restarted instance fences its
    // previous incarnation (a zombie) when it initializes transactions.
    let transactional_id = format!("{}.{}", stage.consumer_group, args.kafka.instance_id);
    let commit_interval = Duration::from_millis(plan.commit_interval_ms.max(10));
    let producer_config = config::producer(
        &args.kafka,
        exactly_once.then_some(config::Transactions {
            id: &transactional_id,
            commit_interval,
        }),
    );
    let transaction_timeout = config::transaction_timeout(&producer_config);
    let outbox = Arc::new(Outbox::create(&producer_config)?);
    if exactly_once {
        outbox
            .producer
            .init_transactions(KAFKA_TIMEOUT)
            .map_err(|source| ServeError::Kafka {
                what: "initializing transactions",
                source,
            })?;
    }

    let table_reader = if state_sources
        .iter()
        .any(|s: &StateSource| s.table.is_some())
    {
        Some(
            config::restore_reader(&args.kafka, &stage.consumer_group)
                .create::<BaseConsumer>()
                .map_err(|source| ServeError::Kafka {
                    what: "creating the table reader",
                    source,
                })?,
        )
    } else {
        None
    };
    let start_from_earliest = plan.source.start_from
        == keystone_crds::pipeline::StartPosition::Earliest
        || !stage.input.topic.eq(&plan.source.topic);
    // Before anything is processed: what the sinks already hold past the checkpoint.
    let replay = match restore.as_ref() {
        Some(wanted)
            if wanted.suppress.is_some() && !restore_applied_everywhere(args, &stage, wanted)? =>
        {
            wanted
                .suppress
                .as_ref()
                .map(|suppress| (suppress, wanted.stages.get(&stage.name).map(|s| &s.input)))
        }
        _ => None,
    };
    let route = match &stage.output {
        StageOutput::Repartition { topic, key } => Route::Repartition {
            topic: topic.clone(),
            key: key.iter().map(|k| FieldPath::new(k)).collect(),
        },
        StageOutput::Sinks => {
            Route::Sinks(build_sinks(args, &plan, &stage, &shared, &outbox, replay)?)
        }
    };
    let reads_source = stage.input.topic == plan.source.topic;
    // Only the source is Avro: later stages read what earlier ones wrote (JSON).
    let mut schemas = match (&plan.source.avro, reads_source) {
        (Some(avro), true) => Some(
            SchemaFetcher::new(
                avro,
                |name| std::env::var(name).ok(),
                |path| std::fs::read(path),
            )
            .map_err(ServeError::Registry)?,
        ),
        _ => None,
    };
    let mut checker = SourceCheck::new(reads_source.then_some(&plan.source.schema));
    if let Some(fetcher) = &schemas {
        checker = checker.reading_avro(fetcher.decoder());
    }
    let core = Arc::new(Mutex::new(Core {
        reads_source,
        restore_config: config::restore_reader(&args.kafka, &stage.consumer_group),
        plan: plan.clone(),
        stage: stage.clone(),
        exactly_once,
        outbox,
        sealed: VecDeque::new(),
        route,
        state_sources,
        tasks: BTreeMap::new(),
        checker: Arc::new(checker),
        tables: Tables {
            reader: table_reader,
            assignment: BTreeSet::new(),
        },
        live: BTreeSet::new(),
        positions: BTreeMap::new(),
        committed: BTreeMap::new(),
        in_transaction: false,
        transaction_began: None,
        transaction_timeout,
        retired: BTreeMap::new(),
        shared: shared.clone(),
        fatal: None,
        instance_id: args.kafka.instance_id.clone(),
        plan_hash: plan.hash(),
        start_from_earliest,
        restore: restore.as_ref().map(|r| ActiveRestore::new(r, &stage.name)),
        pending_restores: BTreeMap::new(),
        uncommitted_restores: Vec::new(),
        changelog_ends: BTreeMap::new(),
        stopped: false,
        sinks_pending: false,
        held: false,
        buffers: crate::buffers::IntakeGate::new(args.max_buffered_bytes),
    }));
    let consumer: BaseConsumer<ConsumerCtx> = config::consumer(
        &args.kafka,
        &stage.consumer_group,
        exactly_once,
        start_from_earliest,
    )
    .create_with_context(ConsumerCtx {
        core: core.clone(),
        shared: shared.clone(),
    })
    .map_err(|source| ServeError::Kafka {
        what: "creating the consumer",
        source,
    })?;
    consumer
        .subscribe(&[&stage.input.topic])
        .map_err(|source| ServeError::Kafka {
            what: "subscribing to the input topic",
            source,
        })?;
    shared.running.store(true, Ordering::SeqCst);
    tracing::info!(
        stage = stage.name,
        topic = stage.input.topic,
        exactly_once,
        "consuming"
    );

    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    let mut lag_reported = false;
    let mut consecutive_failures = 0u32;
    loop {
        // One beat per turn: a turn that never ends (a hung expression, a blocked
        // client call) is what the watchdog behind `/healthz` looks for.
        shared.watchdog.beat();
        if let Some(error) = core.lock().unwrap_or_else(|p| p.into_inner()).fatal.take() {
            return Err(error);
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        // Poll a batch, grouped by partition in arrival (offset) order: what is
        // fetched already, without waiting for more once there is something (a
        // batch waits for nothing, so latency is not traded for batch size). The
        // lock is not held while polling: rebalance callbacks take it inside `poll`.
        let mut batch: BTreeMap<i32, Records> = BTreeMap::new();
        let mut polled = 0;
        while polled < MAX_BATCH {
            match consumer.poll(if polled == 0 {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            }) {
                Some(Ok(message)) => {
                    // The first stage's events come from the source itself; later
                    // stages read it from the repartition record's headers.
                    let source = if reads_source {
                        Some(Provenance {
                            partition: message.partition(),
                            offset: message.offset(),
                        })
                    } else {
                        provenance_of(&message)
                    };
                    batch.entry(message.partition()).or_default().push((
                        message.offset(),
                        message.payload().map(<[u8]>::to_vec),
                        source,
                    ));
                    polled += 1;
                }
                // A fatal consumer error (fenced by a newer member with this
                // instance's id) leaves the consumer unusable: polling on would
                // hang the stage for good. Stop, so the pod restarts and rejoins.
                Some(Err(error @ KafkaError::MessageConsumptionFatal(_))) => {
                    return Err(ServeError::Kafka {
                        what: "consuming (the consumer is no longer usable)",
                        source: error,
                    });
                }
                Some(Err(error)) => {
                    // Transient broker conditions (a leader moving, a broker down) are
                    // retried inside librdkafka; they are only reported here.
                    tracing::warn!(%error, "consumer error");
                    break;
                }
                None => break,
            }
        }

        // Writer schemas first, without the lock: the registry may be slow.
        let waiting_for_registry = match schemas.as_mut() {
            Some(fetcher) if !batch.is_empty() => {
                wait_for_registry(fetcher, &consumer, &stage.input.topic, &mut batch, &shared)
            }
            _ => false,
        };

        let mut guard = core.lock().unwrap_or_else(|p| p.into_inner());
        let core = &mut *guard;
        // A rebalance inside this poll may have failed (a partition's restore):
        // nothing polled after it may be processed.
        if let Some(error) = core.fatal.take() {
            return Err(error);
        }
        // Table rows first, so that events see every row that arrived before them.
        let mut step_result = core.poll_tables();
        if core.stopped {
            // Records fetched before the pause took effect: dropped, and read
            // again from the committed offsets on resume.
            batch.clear();
        }
        if step_result.is_ok() {
            step_result = core.process(batch);
        }
        // Timers wait while intake is stopped or held: a held-back event released
        // now would go ahead of its predecessor, still unread in the topic.
        if step_result.is_ok() && !core.stopped && !core.held && !waiting_for_registry {
            step_result = core.tick();
        }
        let control = controls.try_recv().ok();
        if step_result.is_ok() && !exactly_once && !core.sealed.is_empty() {
            step_result = core.commit_settled(&consumer);
        }
        let mut retry_commit = false;
        let since_commit = last_commit.elapsed();
        let commit_due = since_commit >= commit_interval
            || (polled == 0
                && since_commit >= CAUGHT_UP_COMMIT_AFTER
                && core.commits_when_caught_up());
        if step_result.is_ok() && (commit_due || control.is_some()) {
            step_result = match control {
                Some(Control::Checkpoint { stop, reply }) => {
                    let result = core.checkpoint(&consumer, stop);
                    let _ =
                        reply.send(result.as_ref().map(Clone::clone).map_err(|e| e.to_string()));
                    result.map(|_| ())
                }
                Some(Control::Resume { reply }) => {
                    let result = core
                        .commit(&consumer, "resume")
                        .and_then(|()| core.resume(&consumer));
                    let _ = reply.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    result
                }
                None => core.commit_interval(&consumer).map(|prepared| {
                    // Not prepared: the sinks are asked again on the next turn.
                    if prepared == Prepared::Pending {
                        retry_commit = true;
                    }
                }),
            };
            if !retry_commit {
                last_commit = Instant::now();
            }
        }
        match step_result {
            Ok(()) => consecutive_failures = 0,
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                consecutive_failures += 1;
                tracing::error!(%error, consecutive_failures, "processing or commit failed; going back to the last commit");
                core.abort_open_transaction();
                if consecutive_failures > COMMIT_RETRIES {
                    return Err(error);
                }
                std::thread::sleep(Duration::from_millis(200 << consecutive_failures.min(5)));
                core.rewind(&consumer)?;
            }
        }
        if polled == 0 {
            core.mark_idle_partitions_live(&consumer);
        }
        core.hold_intake(&consumer);
        // Lag needs a broker round trip per partition: every 5 s, and once as soon
        // as there is a first commit to measure from.
        if last_lag.elapsed() >= Duration::from_secs(5)
            || (!lag_reported && !core.committed.is_empty())
        {
            update_lag(&consumer, core);
            lag_reported = !core.committed.is_empty();
            last_lag = Instant::now();
        }
        core.publish_metrics();
    }

    // Shutdown: commit what was processed, then leave.
    shared.watchdog.disarm();
    let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
    core.commit(&consumer, "shutdown")?;
    core.finish_sinks();
    core.publish_metrics();
    shared.running.store(false, Ordering::SeqCst);
    tracing::info!("stopped after a final commit");
    Ok(())
}

/// Fetches the writer schemas `batch` names; `true` when the registry did not
/// answer: then the batch is emptied, its partitions are sought back to its
/// first records (read again on a later turn), and the stage sleeps the
/// backoff, beating the watchdog: waiting is not being stuck.
fn wait_for_registry(
    fetcher: &mut SchemaFetcher,
    consumer: &BaseConsumer<ConsumerCtx>,
    topic: &str,
    batch: &mut BTreeMap<i32, Records>,
    shared: &Shared,
) -> bool {
    let set_waiting = |waiting: bool| {
        if let Ok(metrics) = shared.metrics.lock() {
            metrics.registry_waiting.set(i64::from(waiting));
        }
    };
    let Err(waiting) = fetcher.prepare(batch) else {
        set_waiting(false);
        return false;
    };
    set_waiting(true);
    tracing::warn!(error = %waiting.error, retry_in = ?waiting.retry_in, "waiting for the schema registry; the batch is read again, nothing is dead-lettered");
    for (partition, records) in std::mem::take(batch) {
        let Some((first, _, _)) = records.first() else {
            continue;
        };
        // A partition revoked in this poll is read by its new owner from the
        // committed offset: nothing to seek.
        if let Err(error) = consumer.seek(topic, partition, Offset::Offset(*first), KAFKA_TIMEOUT) {
            tracing::warn!(partition, %error, "seeking back to the batch's first record");
        }
    }
    let until = Instant::now() + waiting.retry_in;
    while Instant::now() < until && !shared.shutdown.load(Ordering::SeqCst) {
        shared.watchdog.beat();
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(500)));
    }
    true
}

fn update_lag(consumer: &BaseConsumer<ConsumerCtx>, core: &Core) {
    let Ok(metrics) = core.shared.metrics.lock() else {
        return;
    };
    for (&partition, &position) in &core.committed {
        if let Ok((_, high)) =
            consumer.fetch_watermarks(&core.stage.input.topic, partition, Duration::from_secs(1))
        {
            metrics
                .consumer_lag
                .with_label_values(&[&partition.to_string()])
                .set((high - position).max(0));
        }
    }
}

/// The connectors of the plan's sinks. Kafka sinks write through the stage's
/// producer; after a rollback every sink skips what it already holds.
fn build_sinks(
    args: &ServeArgs,
    plan: &Plan,
    stage: &PlanStage,
    shared: &Arc<Shared>,
    outbox: &Arc<Outbox>,
    replay: Option<(&ReplaySuppression, Option<&InputRestore>)>,
) -> Result<Sinks, ServeError> {
    let suppress = replay.map(|(suppress, _)| suppress);
    let kafka_topics: Vec<&str> = plan
        .sinks
        .iter()
        .filter_map(|sink| sink.spec.kafka.as_ref().map(|k| k.topic.as_str()))
        .collect();
    let mut delivered: HashMap<String, std::collections::HashSet<Provenance>> = match suppress {
        Some(suppress) => load_delivered(
            &config::restore_reader(&args.kafka, &stage.consumer_group),
            suppress,
            &kafka_topics,
        )?,
        None => HashMap::new(),
    };
    // Avro sinks' schemas, registered (or looked up) before anything is written.
    let mut writers: HashMap<String, AvroWriters> = HashMap::new();
    for sink in &plan.sinks {
        let writer = |avro| {
            sink_writer(
                &sink.name,
                avro,
                |name| std::env::var(name).ok(),
                |path| std::fs::read(path),
            )
            .map_err(ServeError::Registry)
        };
        let value = sink.avro.as_ref().map(writer).transpose()?;
        let key = sink.avro_key.as_ref().map(writer).transpose()?;
        writers.insert(sink.name.clone(), AvroWriters { value, key });
    }
    let metrics = shared.metrics.lock().unwrap_or_else(|p| p.into_inner());
    let context = SinkContext {
        registry: metrics.registry(),
        pipeline: &plan.pipeline,
    };
    let mut sinks: Vec<Box<dyn Sink>> = Vec::with_capacity(plan.sinks.len());
    for sink in &plan.sinks {
        sinks.push(connectors::build(sink, &context, |sink| {
            let topic = sink
                .spec
                .kafka
                .as_ref()
                .map(|k| k.topic.as_str())
                .unwrap_or_default();
            let suppressed = metrics.suppressed_records.with_label_values(&[topic]);
            let held = delivered.remove(topic).unwrap_or_default();
            KafkaSink::new(
                sink,
                outbox.clone(),
                held,
                suppressed,
                writers.remove(&sink.name).unwrap_or_default(),
            )
            .map(|sink| Box::new(sink) as Box<dyn Sink>)
            .ok_or_else(|| connectors::SinkError::NoKind {
                sink: sink.name.clone(),
            })
        })?);
    }
    // Other sinks find what they hold themselves, from where the input replays.
    let replayed_from = match replay {
        Some((_, Some(InputRestore::Offsets(offsets)))) => Some(Some(offsets)),
        Some((_, Some(InputRestore::Earliest))) => Some(None),
        _ => None,
    };
    if let Some(from) = replayed_from {
        for (sink, spec) in sinks.iter_mut().zip(&plan.sinks) {
            if spec.spec.kafka.is_none() {
                let suppressed = metrics.suppressed_records.with_label_values(&[&spec.name]);
                sink.suppress_replay(from, suppressed)?;
            }
        }
    }
    Ok(Sinks::new(sinks))
}
