//! Live numbers of a pipeline, from its runtime pods' `/metrics`: the pods are
//! listed as the user (so RBAC decides whose numbers one sees) and scraped on
//! their pod IP. Rates are the difference between this scrape and the
//! previous one of the same pod, so the first view has totals and no rates
//! yet; the pages poll.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use keystone_crds::Pipeline;
use kube::api::ListParams;

/// The runtime's metrics port (the operator's `HTTP_PORT`).
const METRICS_PORT: u16 = 8080;
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(1500);
const PIPELINE_LABEL: &str = "keystone.dev/pipeline";

const EVENTS_IN: &str = "keystone_step_events_in_total";
const EVENTS_OUT: &str = "keystone_step_events_out_total";
const DROPPED: &str = "keystone_step_events_dropped_total";
const DEAD_LETTERED: &str = "keystone_step_events_dead_lettered_total";
const LAG: &str = "keystone_consumer_lag";

/// Counters of one step, summed over a pod's series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepCounts {
    pub events_in: f64,
    pub events_out: f64,
    pub dropped: f64,
    pub dead_lettered: f64,
}

impl StepCounts {
    fn minus(&self, earlier: &StepCounts) -> StepCounts {
        // A counter that went down was reset (a restarted container).
        let delta = |now: f64, then: f64| if now >= then { now - then } else { now };
        StepCounts {
            events_in: delta(self.events_in, earlier.events_in),
            events_out: delta(self.events_out, earlier.events_out),
            dropped: delta(self.dropped, earlier.dropped),
            dead_lettered: delta(self.dead_lettered, earlier.dead_lettered),
        }
    }

    fn add(&mut self, other: &StepCounts) {
        self.events_in += other.events_in;
        self.events_out += other.events_out;
        self.dropped += other.dropped;
        self.dead_lettered += other.dead_lettered;
    }

    fn per_second(&self, seconds: f64) -> StepCounts {
        StepCounts {
            events_in: self.events_in / seconds,
            events_out: self.events_out / seconds,
            dropped: self.dropped / seconds,
            dead_lettered: self.dead_lettered / seconds,
        }
    }
}

/// What one scrape of one pod found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSample {
    /// By (stage, step).
    pub steps: HashMap<(String, String), StepCounts>,
    pub lag: f64,
}

/// Reads a runtime pod's metrics text.
pub fn parse_sample(text: &str) -> PodSample {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        return PodSample::default();
    };
    let mut sample = PodSample::default();
    for s in scrape.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        if s.metric == LAG {
            sample.lag += value;
            continue;
        }
        let key = (
            s.labels.get("stage").unwrap_or_default().to_owned(),
            s.labels.get("step").unwrap_or_default().to_owned(),
        );
        let field: fn(&mut StepCounts) -> &mut f64 = match s.metric.as_str() {
            EVENTS_IN => |c| &mut c.events_in,
            EVENTS_OUT => |c| &mut c.events_out,
            DROPPED => |c| &mut c.dropped,
            DEAD_LETTERED => |c| &mut c.dead_lettered,
            _ => continue,
        };
        *field(sample.steps.entry(key).or_default()) += value;
    }
    sample
}

/// The previous scrape of each pod, by pod UID, and the one HTTP client
/// every scrape shares (its connection pool lives as long as the console).
pub struct Rates {
    previous: Mutex<HashMap<String, (Instant, PodSample)>>,
    http: reqwest::Client,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            previous: Mutex::default(),
            http: reqwest::Client::builder()
                .timeout(SCRAPE_TIMEOUT)
                .build()
                .expect("an HTTP client without TLS settings"),
        }
    }
}

/// A pipeline's live numbers.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// Pods scraped, and pods that could not be.
    pub scraped: usize,
    pub unreachable: usize,
    pub lag: Option<f64>,
    /// Events per second into the first step and out of the last one.
    pub in_per_second: Option<f64>,
    pub out_per_second: Option<f64>,
    pub dead_letters_per_minute: Option<f64>,
    /// Per step, in the plan's order: per-second rates when two scrapes exist.
    pub steps: Vec<(String, String, Option<StepCounts>)>,
}

impl Rates {
    /// Scrapes the pipeline's pods and computes its numbers.
    pub async fn of(
        &self,
        client: &kube::Client,
        pipeline: &Pipeline,
    ) -> Result<Live, kube::Error> {
        let namespace = pipeline.metadata.namespace.as_deref().unwrap_or("default");
        let name = pipeline.metadata.name.as_deref().unwrap_or_default();
        let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
        let pods = pods
            .list(&ListParams::default().labels(&format!("{PIPELINE_LABEL}={name}")))
            .await?;
        let targets: Vec<(String, String)> = pods
            .items
            .iter()
            .filter_map(|pod| {
                let ip = pod.status.as_ref()?.pod_ip.clone()?;
                Some((pod.metadata.uid.clone()?, ip))
            })
            .collect();
        let scrapes = futures::future::join_all(targets.iter().map(|(uid, ip)| {
            let http = &self.http;
            async move {
                let url = format!("http://{}/metrics", host_port(ip, METRICS_PORT));
                let text = async { http.get(url).send().await?.error_for_status()?.text().await };
                (uid.clone(), text.await.ok().map(|t| parse_sample(&t)))
            }
        }))
        .await;
        let now = Instant::now();
        let stages = pipeline
            .status
            .as_ref()
            .map(|s| s.stages.clone())
            .unwrap_or_default();
        let mut live = Live::default();
        let mut rates: HashMap<(String, String), StepCounts> = HashMap::new();
        let mut have_rates = false;
        let mut lag = 0.0;
        {
            let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
            for (uid, sample) in scrapes {
                let Some(sample) = sample else {
                    live.unreachable += 1;
                    continue;
                };
                live.scraped += 1;
                lag += sample.lag;
                if let Some((then, earlier)) = previous.get(&uid) {
                    let seconds = now.duration_since(*then).as_secs_f64();
                    if seconds > 0.2 {
                        have_rates = true;
                        for (key, counts) in &sample.steps {
                            let before = earlier.steps.get(key).copied().unwrap_or_default();
                            rates
                                .entry(key.clone())
                                .or_default()
                                .add(&counts.minus(&before).per_second(seconds));
                        }
                    }
                }
                previous.insert(uid, (now, sample));
            }
            // Pods that are gone leave no sample behind.
            let alive: Vec<&String> = targets.iter().map(|(uid, _)| uid).collect();
            previous.retain(|uid, _| alive.contains(&uid));
        }
        if live.scraped > 0 {
            live.lag = Some(lag);
        }
        for stage in &stages {
            for step in &stage.steps {
                let rate = have_rates.then(|| {
                    rates
                        .get(&(stage.name.clone(), step.clone()))
                        .copied()
                        .unwrap_or_default()
                });
                live.steps.push((stage.name.clone(), step.clone(), rate));
            }
        }
        if have_rates {
            live.in_per_second = live
                .steps
                .first()
                .and_then(|(_, _, r)| r.map(|r| r.events_in));
            live.out_per_second = live
                .steps
                .last()
                .and_then(|(_, _, r)| r.map(|r| r.events_out));
            live.dead_letters_per_minute =
                Some(rates.values().map(|r| r.dead_lettered).sum::<f64>() * 60.0);
        }
        Ok(live)
    }
}

fn host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// A rate for a table cell.
pub fn rate(value: Option<f64>) -> String {
    match value {
        None => "—".to_owned(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# TYPE keystone_step_events_in_total counter
keystone_step_events_in_total{pipeline=\"p\",stage=\"s0\",step=\"big\"} 100
keystone_step_events_in_total{pipeline=\"p\",stage=\"s0\",step=\"once\"} 40
# TYPE keystone_step_events_out_total counter
keystone_step_events_out_total{pipeline=\"p\",stage=\"s0\",step=\"once\"} 30
# TYPE keystone_step_events_dead_lettered_total counter
keystone_step_events_dead_lettered_total{pipeline=\"p\",stage=\"s0\",step=\"big\"} 2
# TYPE keystone_consumer_lag gauge
keystone_consumer_lag{pipeline=\"p\",stage=\"s0\",partition=\"0\"} 5
keystone_consumer_lag{pipeline=\"p\",stage=\"s0\",partition=\"1\"} 7
";

    #[test]
    fn a_scrape_sums_lag_and_keeps_counters_by_step() {
        let sample = parse_sample(METRICS);
        assert_eq!(sample.lag, 12.0);
        let big = sample.steps[&("s0".to_owned(), "big".to_owned())];
        assert_eq!(big.events_in, 100.0);
        assert_eq!(big.dead_lettered, 2.0);
        let once = sample.steps[&("s0".to_owned(), "once".to_owned())];
        assert_eq!((once.events_in, once.events_out), (40.0, 30.0));
    }

    #[test]
    fn a_reset_counter_counts_from_zero() {
        let now = StepCounts {
            events_in: 5.0,
            ..StepCounts::default()
        };
        let then = StepCounts {
            events_in: 100.0,
            ..StepCounts::default()
        };
        assert_eq!(now.minus(&then).events_in, 5.0);
    }

    #[test]
    fn ipv6_pod_addresses_get_brackets() {
        assert_eq!(host_port("10.0.0.1", 8080), "10.0.0.1:8080");
        assert_eq!(host_port("fd00::1", 8080), "[fd00::1]:8080");
    }
}
