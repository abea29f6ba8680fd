//! The HTTP ingest endpoint (`keystone-runtime ingest`) under load and under
//! faults, on the testbed's real Kafka, with clients that retry what got no
//! answer or a 5xx (with the same `Idempotency-Key`):
//!
//! - vegeta at 64 connections while the ingest process is SIGKILLed twice:
//!   every record of every batch reaches the source topic, and the
//!   pipeline's dedup on the stamped key leaves each once at the sink;
//! - the broker stopped for 20 s under steady posting: 503 with
//!   `Retry-After` meanwhile (never a 2xx, never a hang, never another 5xx),
//!   2xx again after, and nothing lost or doubled.
//!
//! Each test prints a summary row. The second stops the shared broker, so
//! the tests here take turns.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`)
//! and a running testbed (`e2e/testbed up` also builds vegeta).

mod ingest_support;
mod runtime_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ingest_support::*;
use keystone_e2e::{Stopped, Testbed};
use runtime_support::*;
use serde_json::Value;

/// One test at a time: a broker stop would break the other's load.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: i32 = 3;

async fn testbed() -> Testbed {
    Testbed::from_env().await.expect("testbed")
}

/// The pipeline's harness. The dedup keys on `rid`, not on the source's
/// key: the plan's first stage repartitions by it, the second dedups.
async fn harness(name: &str) -> Harness {
    let h = Harness::new(name, &manifest(name, PARTITIONS), PARTITIONS).await;
    assert_eq!(h.plan.stages.len(), 2, "{:#?}", h.plan.stages);
    assert!(h.plan.ingest.is_some(), "the plan serves no endpoint");
    h
}

/// Starts one instance of each stage: `a` repartitions, `b` dedups.
fn start_pipeline(h: &mut Harness) {
    h.start_stage("a", "s0", &[]);
    h.start_stage("b", "s1", &[]);
    h.wait_for_partitions(&["a", "b"]);
}

/// Every record of the source topic, duplicates included: it is written
/// without transactions, so its end offsets count its records.
fn read_source(h: &Harness) -> Vec<(String, String, std::collections::BTreeMap<String, String>)> {
    let topic = &h.plan.source.topic;
    let total: i64 = end_offsets(h, topic, PARTITIONS).values().sum();
    let records = read_committed(
        &h.bootstrap,
        topic,
        total as usize,
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_eq!(records.len() as i64, total, "{topic} not read to its end");
    records
}

/// Waits until the pipeline took in all `source_records`, then checks the
/// sink holds every record of `batches` exactly once.
fn check_sink(h: &mut Harness, batches: &[&Batch], source_records: usize, logs: &str) {
    // The first stage committed the end of the source...
    wait_caught_up(h, PARTITIONS, logs);
    // ...and every record it passed on reached the second stage's dedup.
    let deadline = Instant::now() + CATCH_UP;
    while (h.metric("b", "keystone_step_events_in_total") as usize) < source_records {
        assert_running(h, logs);
        assert!(
            Instant::now() < deadline,
            "the dedup stage did not take in the {source_records} records within {CATCH_UP:?}; logs: {logs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let expected: usize = batches.iter().map(|b| b.records.len()).sum();
    let sink = h.sink_topic();
    // Past the expected count, a little longer for any duplicate (several
    // commit intervals).
    let out = read_committed(
        &h.bootstrap,
        &sink,
        expected,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    check_topic(&sink, &out, batches, true, logs);
}

// ---------------------------------------------------------------------------
// Load with SIGKILLs
// ---------------------------------------------------------------------------

const BATCHES: usize = 3000;
const CONNECTIONS: usize = 64;
const KILLS: usize = 2;

#[tokio::test(flavor = "multi_thread")]
async fn vegeta_load_through_two_sigkills_of_the_ingest_keeps_every_record_once() {
    let _turn = TURN.lock().await;
    let took = Instant::now();
    let tb = testbed().await;
    let name = unique("ingest-load");
    let mut h = harness(&name).await;
    let vegeta = Vegeta::new(&tb, &h.dir);
    let mut rng = Lcg(seed("ingest_load"));
    let batches = batches(&name, BATCHES, 20, 100, &mut rng);
    let records: usize = batches.iter().map(|b| b.records.len()).sum();
    let mut ingest = IngestProcess::start(&h, &[]);
    // The pipeline reads while the load and the kills go on.
    start_pipeline(&mut h);
    let logs = format!("{} {}", ingest.log.display(), logs(&h, &["a", "b"]));

    // One kill in each pass, once the process answered 30% of it: mid-pass,
    // with every connection busy, until KILLS kills have each cut requests in
    // flight (sent before the kill, ended after it). A kill fails what the
    // pass sends until the restart, so the next kill goes in the retry pass,
    // which holds at least the requests the kill failed. A short retry pass
    // can end between the answer counted and the kill; such a kill cut
    // nothing in flight, does not count, and the next pass is killed too.
    let mut cut: Vec<usize> = Vec::new();
    let mut kills_cutting_nothing = 0;
    let mut pending: Vec<&Batch> = batches.iter().collect();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut passes = 0;
    while !pending.is_empty() {
        passes += 1;
        assert!(passes <= 20, "batches still without a 2xx after 20 passes");
        let baseline = ingest.answered();
        let kill_after = (pending.len() * 3 / 10).max(1) as f64;
        let mut attack = vegeta.attack(
            &format!("pass{passes}"),
            &ingest.url(),
            &pending,
            CONNECTIONS,
            Duration::from_secs(20),
        );
        let mut kill = None;
        while cut.len() < KILLS && !attack.is_finished() {
            if ingest.answered() - baseline >= kill_after {
                kill = Some(SystemTime::now());
                ingest.sigkill_and_restart();
                eprintln!(
                    "SIGKILL {} of the ingest at {:.1} s, in pass {passes} of {} batches; restarted",
                    cut.len() + kills_cutting_nothing + 1,
                    took.elapsed().as_secs_f64(),
                    pending.len()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let answers = vegeta.finish(attack);
        assert_eq!(
            answers.len(),
            pending.len(),
            "vegeta pass {passes}: not one request per batch"
        );
        if let Some(kill) = kill {
            let in_flight = answers
                .iter()
                .filter(|o| o.code == 0 && o.started <= kill && o.ended() >= kill)
                .count();
            if in_flight > 0 {
                cut.push(in_flight);
            } else {
                kills_cutting_nothing += 1;
                eprintln!("that SIGKILL cut no request in flight: it does not count");
            }
        }
        let mut retry = Vec::new();
        for outcome in &answers {
            let batch = &batches[outcome.batch];
            match outcome.code {
                200 => {
                    let body: Value = serde_json::from_slice(&outcome.body).unwrap();
                    assert_eq!(
                        body["accepted"].as_u64(),
                        Some(batch.records.len() as u64),
                        "batch {}: {body}",
                        batch.id
                    );
                }
                // No answer, or the endpoint could not store it now: again.
                0 => retry.push(batch),
                503 => {
                    assert_retry_after(outcome, &logs);
                    retry.push(batch);
                }
                code => panic!(
                    "batch {} got {code} {}: {}; logs: {logs}",
                    batch.id,
                    outcome.error,
                    String::from_utf8_lossy(&outcome.body)
                ),
            }
        }
        eprintln!(
            "pass {passes}: {} requests, {} to retry",
            answers.len(),
            retry.len()
        );
        outcomes.extend(answers);
        pending = retry;
    }
    ingest.assert_running();
    assert_eq!(
        cut.len(),
        KILLS,
        "the load ended before {KILLS} SIGKILLs cut requests in flight ({kills_cutting_nothing} cut none)"
    );
    let retried = outcomes.len() - BATCHES;
    assert!(retried > 0, "no request failed: the kills changed nothing");

    let all: Vec<&Batch> = batches.iter().collect();
    let source = read_source(&h);
    let duplicates = check_topic(&h.plan.source.topic, &source, &all, false, &logs);
    check_sink(&mut h, &all, source.len(), &logs);
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    eprintln!(
        "| ingest under vegeta load, {CONNECTIONS} connections, {KILLS} SIGKILLs | {BATCHES} batches, {records} records | {} requests | {} 2xx | {} no answer | {} 503 | {retried} retried over {passes} passes | requests in flight failed by each kill {cut:?} | {duplicates} duplicates in the source, none at the sink | {:.0} s |",
        outcomes.len(),
        count(&|o| o.code == 200),
        count(&|o| o.code == 0),
        count(&|o| o.code == 503),
        took.elapsed().as_secs_f64()
    );
}

fn assert_retry_after(outcome: &Outcome, logs: &str) {
    let seconds = outcome
        .retry_after
        .as_deref()
        .and_then(|s| s.parse::<u64>().ok());
    assert!(
        seconds.is_some_and(|s| s >= 1),
        "batch {}: 503 with Retry-After {:?}: {}; logs: {logs}",
        outcome.batch,
        outcome.retry_after,
        String::from_utf8_lossy(&outcome.body)
    );
}

// ---------------------------------------------------------------------------
// The broker stopped for 20 s
// ---------------------------------------------------------------------------

/// Longer than the ingest's delivery timeout (10 s by default, as the
/// operator runs it): an answer that does not come by then is a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
const OUTAGE: Duration = Duration::from_secs(20);

/// One request of the steady client.
struct Try {
    batch: usize,
    sent: Instant,
    answered: Instant,
    /// (status, Retry-After, body), or why no answer came.
    answer: Result<(u16, Option<String>, String), String>,
}

async fn post(client: &reqwest::Client, url: &str, batch: &Batch) -> Try {
    let sent = Instant::now();
    let answer = async {
        let response = client
            .post(url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/x-ndjson")
            .header("idempotency-key", &batch.key)
            .body(batch.body())
            .send()
            .await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
        Ok::<_, reqwest::Error>((status, retry_after, response.text().await?))
    }
    .await
    .map_err(|e| format!("{e:?}"));
    Try {
        batch: batch.id,
        sent,
        answered: Instant::now(),
        answer,
    }
}

/// Posts a new batch every 100 ms, whatever the answers to earlier ones,
/// until `stop`; sends each try's outcome to `tries`.
fn post_steadily(
    client: reqwest::Client,
    url: String,
    batches: Arc<Vec<Batch>>,
    stop: Arc<AtomicBool>,
    tries: tokio::sync::mpsc::UnboundedSender<Try>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut posting = tokio::task::JoinSet::new();
        let mut next = 0;
        while !stop.load(Ordering::Relaxed) && next < batches.len() {
            tick.tick().await;
            let (client, url, batches, tries) =
                (client.clone(), url.clone(), batches.clone(), tries.clone());
            posting.spawn(async move {
                let _ = tries.send(post(&client, &url, &batches[next]).await);
            });
            next += 1;
        }
        // Every request ends by the client's timeout.
        while posting.join_next().await.is_some() {}
        next
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_stopped_for_20s_gets_503_with_retry_after_and_loses_nothing() {
    let _turn = TURN.lock().await;
    let took = Instant::now();
    let tb = testbed().await;
    let name = unique("ingest-outage");
    let mut h = harness(&name).await;
    // Enough for the whole scenario at 10 a second; only those posted count.
    let batches: Arc<Vec<Batch>> = Arc::new(
        (0..2000)
            .map(|id| Batch::new(&name, id, 5 + id % 16))
            .collect(),
    );
    let mut ingest = IngestProcess::start(&h, &[]);
    let logs = format!("{} {}", ingest.log.display(), logs(&h, &["a", "b"]));
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let poster = post_steadily(
        client.clone(),
        ingest.url(),
        batches.clone(),
        stop.clone(),
        sender,
    );
    let mut tries: Vec<Try> = Vec::new();
    // Waits until `done` holds for the tries so far, or fails after `within`.
    macro_rules! wait_for {
        ($what:expr, $within:expr, $done:expr) => {{
            let deadline = tokio::time::Instant::now() + $within;
            while !$done(&tries) {
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(one)) => tries.push(one),
                    _ => panic!("{} not within {:?}; logs: {logs}", $what, $within),
                }
            }
        }};
    }
    let ok = |t: &Try| matches!(t.answer, Ok((200, _, _)));
    wait_for!(
        "10 answers 2xx before the outage",
        Duration::from_secs(30),
        |t: &Vec<Try>| t.iter().filter(|t| ok(t)).count() >= 10
    );

    let fault_at = Instant::now();
    let broker = Stopped::stop(&tb, "kafka").await;
    let stopped = Instant::now();
    eprintln!(
        "broker stopped in {:.1} s",
        (stopped - fault_at).as_secs_f64()
    );
    // The outage itself: the client keeps posting meanwhile.
    let until = tokio::time::Instant::from_std(fault_at + OUTAGE);
    while let Ok(Some(one)) = tokio::time::timeout_at(until, receiver.recv()).await {
        tries.push(one);
    }
    let restarting = Instant::now();
    broker.start(&tb).await;
    let restarted = Instant::now();
    eprintln!(
        "broker started again in {:.1} s",
        (restarted - restarting).as_secs_f64()
    );
    wait_for!(
        "a 2xx for a request sent after the restart",
        Duration::from_secs(40),
        |t: &Vec<Try>| t.iter().any(|t| ok(t) && t.sent >= restarted)
    );
    let recovered = tries
        .iter()
        .filter(|t| ok(t) && t.sent >= restarted)
        .map(|t| t.answered)
        .min()
        .unwrap();
    // Some more steady posting with the broker back.
    wait_for!(
        "20 answers 2xx after the first one",
        Duration::from_secs(30),
        |t: &Vec<Try>| t.iter().filter(|t| ok(t) && t.sent > recovered).count() >= 20
    );
    stop.store(true, Ordering::Relaxed);
    let posted = poster.await.unwrap();
    while let Some(one) = receiver.recv().await {
        tries.push(one);
    }
    assert_eq!(tries.len(), posted, "a request left no outcome");
    ingest.assert_running();

    // Every request answered in time, 2xx or 503 with Retry-After.
    let mut to_retry = Vec::new();
    let (mut in_outage, mut outage_503) = (0, 0);
    for t in &tries {
        let batch = &batches[t.batch];
        let (status, retry_after, body) = t.answer.as_ref().unwrap_or_else(|e| {
            panic!(
                "batch {} sent {:.1} s into the test got no answer within {CLIENT_TIMEOUT:?}: {e}; logs: {logs}",
                t.batch,
                (t.sent - took).as_secs_f64()
            )
        });
        let during = t.sent >= stopped && t.answered <= restarting;
        in_outage += usize::from(during);
        match status {
            200 => {
                assert!(
                    !during,
                    "batch {} got a 2xx with the broker stopped: {body}",
                    t.batch
                );
                let body: Value = serde_json::from_str(body).unwrap();
                assert_eq!(
                    body["accepted"].as_u64(),
                    Some(batch.records.len() as u64),
                    "batch {}: {body}",
                    t.batch
                );
            }
            503 => {
                let seconds = retry_after.as_deref().and_then(|s| s.parse::<u64>().ok());
                assert!(
                    seconds.is_some_and(|s| s >= 1),
                    "batch {}: 503 with Retry-After {retry_after:?}: {body}",
                    t.batch
                );
                assert!(
                    t.sent < recovered,
                    "batch {} got a 503 though sent after 2xx came back: {body}; logs: {logs}",
                    t.batch
                );
                outage_503 += usize::from(during);
                to_retry.push(batch);
            }
            other => panic!(
                "batch {} got {other} (only 2xx or 503 may come): {body}; logs: {logs}",
                t.batch
            ),
        }
    }
    assert!(
        in_outage > 0 && outage_503 == in_outage,
        "{in_outage} requests in the outage, {outage_503} answered 503"
    );

    // The client retries each 503'd batch, unchanged, after its Retry-After.
    let first_503s = to_retry.len();
    let (mut retries, mut retry_503s) = (0, 0);
    let url = ingest.url();
    for round in 1.. {
        if to_retry.is_empty() {
            break;
        }
        assert!(
            round <= 10,
            "batches still refused after 10 rounds of retries"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let answers =
            futures::future::join_all(to_retry.iter().map(|b| post(&client, &url, b))).await;
        retries += answers.len();
        retry_503s += answers
            .iter()
            .filter(|t| matches!(t.answer, Ok((503, _, _))))
            .count();
        to_retry.retain(|b| {
            let t = answers.iter().find(|t| t.batch == b.id).unwrap();
            match &t.answer {
                Ok((200, _, _)) => false,
                Ok((503, _, _)) => true,
                other => panic!("retrying batch {}: {other:?}; logs: {logs}", b.id),
            }
        });
    }

    let sent: Vec<&Batch> = batches[..posted].iter().collect();
    let source = read_source(&h);
    let duplicates = check_topic(&h.plan.source.topic, &source, &sent, false, &logs);
    start_pipeline(&mut h);
    check_sink(&mut h, &sent, source.len(), &logs);
    let records: usize = sent.iter().map(|b| b.records.len()).sum();
    eprintln!(
        "| ingest, broker stopped {} s under steady posting (10 requests/s) | {posted} batches, {records} records | {} requests | {} 2xx | {} 503 ({outage_503} of the {in_outage} in the outage) | {first_503s} batches retried, {retries} retries | 2xx again {:.1} s after the broker was back | {duplicates} duplicates in the source, none at the sink | {:.0} s |",
        OUTAGE.as_secs(),
        posted + retries,
        posted,
        first_503s + retry_503s,
        (recovered - restarted).as_secs_f64(),
        took.elapsed().as_secs_f64()
    );
}
