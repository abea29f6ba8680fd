//! `serve` itself: its arguments, the state the engine shares with the
//! operations endpoints, its errors, and the thread that runs the loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use keystone_crds::checkpoint::RestorePlan;
use keystone_crds::{PLAN_VERSION, Plan};
use rdkafka::error::KafkaError;

use crate::clock::SystemClock;
use crate::connectors::SinkError;
use crate::kafka::{KafkaSettings, TransportError};

use crate::error::RuntimeError;
use crate::host::{ControlToken, Metrics, Watchdog, http, run};

/// What `serve` needs to know; the CLI fills it from flags and the pod's environment.
#[derive(Clone, Debug)]
pub struct ServeArgs {
    /// The compiled plan (JSON, as the operator writes it into the ConfigMap).
    pub plan: PathBuf,
    /// The stage to run (`s0`, `s1`, ...).
    pub stage: String,
    /// The brokers and this instance's stable identity (the pod name): static
    /// group membership and the transactional id derive from it.
    pub kafka: KafkaSettings,
    /// Where the operations endpoints listen.
    pub http_addr: SocketAddr,
    /// A restore to apply once per partition (`--restore`, a `RestorePlan` as JSON).
    pub restore: Option<PathBuf>,
    /// The credential `POST /checkpoint` and `POST /resume` require; without
    /// one they refuse every request.
    pub control_token: Option<ControlToken>,
    /// How long the engine may go without progress before `/healthz` fails.
    pub watchdog_timeout: std::time::Duration,
    /// Bytes of held-back events past which intake pauses ([`crate::buffers`]).
    pub max_buffered_bytes: u64,
}

/// State shared between the engine thread and the operations endpoints.
pub struct Shared {
    pub metrics: Mutex<Metrics>,
    /// The consumer is subscribed and the loop runs.
    pub running: AtomicBool,
    /// The group assigned this instance its partitions (possibly none) at least once.
    pub joined: AtomicBool,
    /// Partitions whose state is being restored.
    pub restoring: AtomicUsize,
    /// The engine stopped on an error.
    pub failed: AtomicBool,
    /// Shutdown was requested (SIGTERM).
    pub shutdown: AtomicBool,
    /// Processing is stopped after a checkpoint (`POST /checkpoint?stop=true`).
    pub stopped: AtomicBool,
    /// The engine loop's progress heartbeat.
    pub watchdog: Watchdog,
}

impl Shared {
    pub fn new(metrics: Metrics, watchdog: Watchdog) -> Self {
        Self {
            metrics: Mutex::new(metrics),
            running: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            restoring: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            watchdog,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the plan {path}: {message}")]
    Plan { path: PathBuf, message: String },
    #[error("reading the restore plan {path}: {message}")]
    Restore { path: PathBuf, message: String },
    #[error("the plan has no stage {0:?}")]
    NoStage(String),
    #[error("{what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("{count} record(s) could not be delivered, first: {first}")]
    Delivery { count: usize, first: String },
    #[error("the consumer has no group metadata (not in a group yet)")]
    NoGroupMetadata,
    #[error(transparent)]
    Transport(TransportError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(
        "sinks {sinks:?} did not make their writes durable within {waited:?}; nothing was committed"
    )]
    SinkPending {
        sinks: Vec<String>,
        waited: std::time::Duration,
    },
    #[error(transparent)]
    Runtime(RuntimeError),
    #[error("the schema registry: {0}")]
    Registry(String),
    #[error("operations endpoints: {0}")]
    Http(#[source] std::io::Error),
    #[error("the final commit did not finish within {0:?} of SIGTERM; exited without it")]
    ShutdownTimeout(std::time::Duration),
}

impl ServeError {
    /// Errors after which this instance must stop (and be restarted): it was
    /// fenced by a newer instance, or librdkafka says the producer is unusable.
    pub fn is_fatal(&self) -> bool {
        match self {
            ServeError::Kafka {
                source: KafkaError::Transaction(error),
                ..
            } => error.is_fatal() || !error.txn_requires_abort() && !error.is_retriable(),
            ServeError::Kafka { .. }
            | ServeError::Delivery { .. }
            | ServeError::SinkPending { .. } => false,
            ServeError::Sink(error) => error.is_permanent(),
            _ => true,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            ServeError::Plan { .. } => "plan",
            ServeError::Restore { .. } => "restore",
            ServeError::NoStage(_) => "no_stage",
            ServeError::Kafka { .. } => "kafka",
            ServeError::Delivery { .. } => "delivery",
            ServeError::NoGroupMetadata => "group_metadata",
            ServeError::Transport(TransportError::MissingTopic(_)) => "missing_topic",
            ServeError::Transport(TransportError::RestoreTimeout { .. }) => "restore_timeout",
            ServeError::Transport(TransportError::Kafka { .. }) => "kafka",
            ServeError::SinkPending { .. } => "sink_pending",
            ServeError::Sink(error) => error.metric_label(),
            ServeError::Runtime(_) => "runtime",
            ServeError::Registry(_) => "schema_registry",
            ServeError::Http(_) => "http",
            ServeError::ShutdownTimeout(_) => "shutdown_timeout",
        }
    }
}

impl From<TransportError> for ServeError {
    fn from(error: TransportError) -> Self {
        match error {
            // Kept apart: `is_fatal` looks into librdkafka's transaction errors.
            TransportError::Kafka { what, source } => ServeError::Kafka { what, source },
            other => ServeError::Transport(other),
        }
    }
}

/// Reads and checks the plan and finds the stage.
pub fn load_plan(
    path: &PathBuf,
    stage: &str,
) -> Result<(Plan, keystone_crds::plan::PlanStage), ServeError> {
    let text = std::fs::read_to_string(path).map_err(|e| ServeError::Plan {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| ServeError::Plan {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if plan.version != PLAN_VERSION {
        return Err(ServeError::Runtime(RuntimeError::PlanVersion {
            found: plan.version,
            expected: PLAN_VERSION,
        }));
    }
    let stage = plan
        .stage(stage)
        .cloned()
        .ok_or_else(|| ServeError::NoStage(stage.to_owned()))?;
    Ok((plan, stage))
}

/// Reads a restore plan (`--restore`).
fn load_restore(path: &PathBuf) -> Result<RestorePlan, ServeError> {
    let restore_error = |message: String| ServeError::Restore {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| restore_error(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| restore_error(e.to_string()))
}

/// How long the final commit after SIGTERM may take: less than the 30 s
/// `terminationGracePeriodSeconds` the operator gives stage pods, so the
/// process leaves on its own (and says why) instead of being SIGKILLed.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(25);

/// Runs one stage until SIGTERM (or SIGINT), then commits and returns; if the
/// commit cannot finish within [`SHUTDOWN_GRACE`], returns without it.
pub fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let (plan, stage) = load_plan(&args.plan, &args.stage)?;
    let shared = Arc::new(Shared::new(
        Metrics::new(&plan.pipeline, &stage.name),
        Watchdog::new(Arc::new(SystemClock), args.watchdog_timeout),
    ));
    let restore = args.restore.as_ref().map(load_restore).transpose()?;
    let (control_tx, control_rx) = mpsc::channel();

    // The engine is blocking (librdkafka calls, rebalance callbacks inside poll):
    // it runs on its own thread; the endpoints and signals run on a small runtime.
    let engine_shared = shared.clone();
    let engine_args = args.clone();
    let plan = Arc::new(plan);
    let engine = std::thread::Builder::new()
        .name("keystone-engine".into())
        .spawn(move || {
            let result = run::run(
                &engine_args,
                plan,
                stage,
                engine_shared.clone(),
                restore,
                control_rx,
            );
            if result.is_err() {
                engine_shared.failed.store(true, Ordering::SeqCst);
            }
            engine_shared.running.store(false, Ordering::SeqCst);
            result
        })
        .map_err(ServeError::Http)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Http)?;
    let http_shared = shared.clone();
    runtime.block_on(async move {
        let mut server = tokio::spawn(http::serve(
            args.http_addr,
            http_shared,
            control_tx,
            args.control_token.clone(),
        ));
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(ServeError::Http)?;
        let watch = shared.clone();
        let engine_done = async move {
            while !engine.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            engine
        };
        tokio::pin!(engine_done);
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: finishing the current transaction"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the current transaction"),
            finished = &mut engine_done => {
                server.abort();
                return join(finished);
            }
            result = &mut server => {
                if let Ok(Err(error)) = result {
                    watch.shutdown.store(true, Ordering::SeqCst);
                    return Err(ServeError::Http(error));
                }
            }
        }
        watch.shutdown.store(true, Ordering::SeqCst);
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut engine_done).await {
            Ok(finished) => join(finished),
            // The final commit is stuck (the broker or a sink is away): leave
            // without it rather than be SIGKILLed mid-write. Nothing is lost:
            // the open transaction is aborted by the broker, and the next
            // instance resumes from the last commit.
            Err(_) => {
                tracing::error!(
                    grace = ?SHUTDOWN_GRACE,
                    "the final commit did not finish in time; exiting without it (the next instance resumes from the last commit)"
                );
                Err(ServeError::ShutdownTimeout(SHUTDOWN_GRACE))
            }
        }
    })
}

fn join(engine: std::thread::JoinHandle<Result<(), ServeError>>) -> Result<(), ServeError> {
    engine.join().unwrap_or_else(|_| {
        Err(ServeError::Runtime(RuntimeError::Usage(
            "the engine thread panicked".to_owned(),
        )))
    })
}
