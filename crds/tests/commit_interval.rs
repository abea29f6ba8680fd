//! `spec.commitInterval` against Kafka's transaction timeout: a transactional
//! pipeline's interval must fit in a transaction the broker keeps open, and the
//! runtime's producer asks for a timeout that covers it.

use std::time::Duration;

use keystone_crds::plan::{MAX_TRANSACTIONAL_COMMIT_INTERVAL, transaction_timeout};
use keystone_crds::{ErrorKind, compile, parse_manifests};

fn pipeline(delivery: &str, commit_interval: &str, source: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: orders, namespace: shop}}
spec:
  source:
    topic: orders.cdc
    key: [id]
{source}    schema:
      fields:
        - {{name: id, type: integer}}
  sinks:
    - name: out
      kafka: {{topic: orders.out}}
  delivery: {delivery}
  commitInterval: {commit_interval}
"#
    )
}

const CAPTURE: &str = r#"    postgres:
      host: db.shop.svc
      database: shop
      credentialsSecret: shop-db
      tables: [public.orders]
"#;

fn errors(text: &str) -> Vec<(ErrorKind, String)> {
    let manifests = parse_manifests("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    match compile(&manifests.pipelines[0], &[]) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .0
            .into_iter()
            .map(|e| (e.kind, e.to_string()))
            .collect(),
    }
}

#[test]
fn an_exactly_once_interval_longer_than_a_transaction_may_stay_open_is_refused() {
    assert_eq!(
        errors(&pipeline("ExactlyOnce", "5m1s", "")),
        vec![(
            ErrorKind::InvalidSetting,
            "spec.commitInterval: 5m1s is longer than 5m, the most a pipeline whose commits \
             are Kafka transactions (delivery: ExactlyOnce) may wait between commits: a \
             transaction stays open for a whole interval, and brokers refuse to keep one open \
             longer than 15 minutes by default (transaction.max.timeout.ms)"
                .to_owned()
        )]
    );
    assert_eq!(errors(&pipeline("ExactlyOnce", "5m", "")), vec![]);
    // Without transactions the interval is only how often offsets are committed.
    assert_eq!(errors(&pipeline("AtLeastOnce", "1h", "")), vec![]);
}

#[test]
fn a_capture_commits_in_transactions_whatever_the_delivery() {
    let refused = errors(&pipeline("AtLeastOnce", "10m", CAPTURE));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, ErrorKind::InvalidSetting);
    assert!(
        refused[0].1.contains("(a postgres source's capture)"),
        "{}",
        refused[0].1
    );
}

#[test]
fn the_transaction_timeout_covers_three_intervals_and_at_least_ten_seconds() {
    assert_eq!(
        transaction_timeout(Duration::from_secs(1)),
        Duration::from_secs(10)
    );
    assert_eq!(
        transaction_timeout(Duration::from_secs(30)),
        Duration::from_secs(90)
    );
    // The longest interval accepted asks for what brokers allow by default.
    assert_eq!(
        transaction_timeout(MAX_TRANSACTIONAL_COMMIT_INTERVAL.as_std()),
        Duration::from_secs(15 * 60)
    );
}
