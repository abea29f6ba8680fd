//! The search sink's metrics. The sink's name is a constant label, so that
//! several search sinks of one stage register side by side in one registry;
//! the other labels are small closed sets.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, core::Collector,
};

use super::SearchError;

/// Why a request or an item is sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryReason {
    /// The connection failed (refused, reset, TLS, DNS).
    Connect,
    Timeout,
    Status429,
    Status5xx,
    /// Any other non-2xx answer, or a 2xx whose body cannot be used.
    StatusOther,
    /// Items the cluster asked to send again (429, 5xx, full write queue).
    Item,
}

impl RetryReason {
    pub(crate) const ALL: [RetryReason; 6] = [
        RetryReason::Connect,
        RetryReason::Timeout,
        RetryReason::Status429,
        RetryReason::Status5xx,
        RetryReason::StatusOther,
        RetryReason::Item,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
            RetryReason::Status429 => "status_429",
            RetryReason::Status5xx => "status_5xx",
            RetryReason::StatusOther => "status_other",
            RetryReason::Item => "item",
        }
    }

    pub(crate) fn of_status(status: u16) -> RetryReason {
        match status {
            429 => RetryReason::Status429,
            500..=599 => RetryReason::Status5xx,
            _ => RetryReason::StatusOther,
        }
    }
}

/// The final result of one bulk item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ItemResult {
    Created,
    Updated,
    Deleted,
    VersionConflict,
    Failed,
}

impl ItemResult {
    const ALL: [ItemResult; 5] = [
        ItemResult::Created,
        ItemResult::Updated,
        ItemResult::Deleted,
        ItemResult::VersionConflict,
        ItemResult::Failed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ItemResult::Created => "created",
            ItemResult::Updated => "updated",
            ItemResult::Deleted => "deleted",
            ItemResult::VersionConflict => "version_conflict",
            ItemResult::Failed => "failed",
        }
    }
}

pub(crate) struct SinkMetrics {
    pub bulk_requests: IntCounter,
    items: IntCounterVec,
    pub request_duration: Histogram,
    retries: IntCounterVec,
    pub in_flight_bytes: IntGauge,
}

impl SinkMetrics {
    /// Registers the metrics of sink `sink`. A sink built again on the same
    /// registry (the host rebuilt it) replaces its earlier metrics.
    pub(crate) fn register(registry: &Registry, sink: &str) -> Result<SinkMetrics, SearchError> {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("sink", sink);
        let bulk_requests = IntCounter::with_opts(opts(
            "keystone_sink_bulk_requests_total",
            "Bulk requests sent to the search cluster, retries included",
        ))?;
        let items = IntCounterVec::new(
            opts(
                "keystone_sink_items_total",
                "Bulk items by their final result (version_conflict: the index already held this or a newer version)",
            ),
            &["result"],
        )?;
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keystone_sink_request_duration_seconds",
                "Time from sending a bulk request to its answer",
            )
            .const_label("sink", sink)
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )?;
        let retries = IntCounterVec::new(
            opts(
                "keystone_sink_retries_total",
                "Bulk requests or items sent again, by reason",
            ),
            &["reason"],
        )?;
        let in_flight_bytes = IntGauge::with_opts(opts(
            "keystone_sink_in_flight_bytes",
            "Bytes of bulk requests sent and not yet answered, retries included",
        ))?;
        // Every label value exists from the start, so dashboards and alerts see zeros.
        for result in ItemResult::ALL {
            items.with_label_values(&[result.as_str()]);
        }
        for reason in RetryReason::ALL {
            retries.with_label_values(&[reason.as_str()]);
        }
        register_or_replace(registry, &bulk_requests)?;
        register_or_replace(registry, &items)?;
        register_or_replace(registry, &request_duration)?;
        register_or_replace(registry, &retries)?;
        register_or_replace(registry, &in_flight_bytes)?;
        Ok(SinkMetrics {
            bulk_requests,
            items,
            request_duration,
            retries,
            in_flight_bytes,
        })
    }

    pub(crate) fn item(&self, result: ItemResult) {
        self.items.with_label_values(&[result.as_str()]).inc();
    }

    pub(crate) fn retry(&self, reason: RetryReason, count: u64) {
        self.retries
            .with_label_values(&[reason.as_str()])
            .inc_by(count);
    }

    #[cfg(test)]
    pub(crate) fn items_of(&self, result: ItemResult) -> u64 {
        self.items.with_label_values(&[result.as_str()]).get()
    }

    #[cfg(test)]
    pub(crate) fn retries_of(&self, reason: RetryReason) -> u64 {
        self.retries.with_label_values(&[reason.as_str()]).get()
    }
}

fn register_or_replace<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: &C,
) -> Result<(), SearchError> {
    match registry.register(Box::new(collector.clone())) {
        Err(prometheus::Error::AlreadyReg) => {
            // Unregistering goes by descriptor (name and constant labels), which
            // the new collector shares with the one registered before.
            registry.unregister(Box::new(collector.clone()))?;
            registry.register(Box::new(collector.clone()))?;
            Ok(())
        }
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sinks_share_a_registry_and_a_rebuilt_sink_replaces_its_metrics() {
        let registry = Registry::new();
        let a = SinkMetrics::register(&registry, "a").unwrap();
        let b = SinkMetrics::register(&registry, "b").unwrap();
        a.item(ItemResult::Created);
        b.retry(RetryReason::Timeout, 2);
        let again = SinkMetrics::register(&registry, "a").unwrap();
        again.item(ItemResult::Deleted);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains(r#"keystone_sink_items_total{result="deleted",sink="a"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"keystone_sink_retries_total{reason="timeout",sink="b"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"keystone_sink_items_total{result="version_conflict",sink="b"} 0"#),
            "{text}"
        );
        assert!(
            text.contains("keystone_sink_in_flight_bytes{sink=\"a\"} 0"),
            "{text}"
        );
    }
}
