//! Join and enrich tables: each materialized from its compacted topic per
//! stream partition (or whole, when replicated), restored at assignment and then
//! followed while the stage runs, so events see every row that arrived before them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keystone_crds::ops::TableSpec;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::host::ServeError;
use crate::host::process::Core;
use crate::kafka::restore::RawRecord;
use crate::ops::Table;
use crate::state::StateChange;

/// The reader of the stage's tables and what it is assigned.
#[derive(Default)]
pub(super) struct Tables {
    /// Reads rows that join and enrich tables receive while the stage runs, from
    /// where each table partition's restore stopped.
    pub(super) reader: Option<BaseConsumer>,
    /// Table partitions the reader is assigned.
    pub(super) assignment: BTreeSet<(String, i32)>,
}

impl Core {
    /// Keeps reading the table partitions just restored, from where the restore stopped.
    pub(super) fn follow_tables(
        &mut self,
        read_up_to: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), ServeError> {
        let Some(reader) = &self.tables.reader else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in read_up_to {
            let is_table = self
                .state_sources
                .iter()
                .any(|s| s.table.is_some() && &s.topic == topic);
            if is_table && self.tables.assignment.insert((topic.clone(), *partition)) {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(|source| ServeError::Kafka {
                        what: "following a table partition",
                        source,
                    })?;
            }
        }
        if tpl.count() > 0 {
            reader
                .incremental_assign(&tpl)
                .map_err(|source| ServeError::Kafka {
                    what: "following table partitions",
                    source,
                })?;
        }
        Ok(())
    }

    /// Stops reading a partitioned table's partition when its stream partition goes.
    pub(super) fn unfollow_table_partition(&mut self, partition: i32) {
        let Some(reader) = &self.tables.reader else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for source in &self.state_sources {
            if let Some(table) = &source.table
                && !table.replicated
                && self
                    .tables
                    .assignment
                    .remove(&(source.topic.clone(), partition))
            {
                let _ = tpl.add_partition(&source.topic, partition);
            }
        }
        if tpl.count() > 0
            && let Err(error) = reader.incremental_unassign(&tpl)
        {
            tracing::warn!(%error, "unassigning table partitions");
        }
    }

    /// Applies table rows that arrived since the last call to the tasks that use
    /// them: the task of the same partition, or every task for a replicated table.
    pub(super) fn poll_tables(&mut self) -> Result<(), ServeError> {
        let Some(reader) = &self.tables.reader else {
            return Ok(());
        };
        let mut arrived: BTreeMap<(String, i32), Vec<RawRecord>> = BTreeMap::new();
        for _ in 0..10_000 {
            match reader.poll(Duration::ZERO) {
                Some(Ok(message)) => arrived
                    .entry((message.topic().to_owned(), message.partition()))
                    .or_default()
                    .push((
                        message.key().map(<[u8]>::to_vec),
                        message.payload().map(<[u8]>::to_vec),
                    )),
                Some(Err(error)) => {
                    tracing::warn!(%error, "reading table updates");
                    break;
                }
                None => break,
            }
        }
        for ((topic, partition), records) in arrived {
            for source in self.state_sources.iter().filter(|s| s.topic == topic) {
                let Some(spec) = &source.table else { continue };
                let changes = table_changes(spec, records.clone());
                let targets: Vec<i32> = if spec.replicated {
                    self.tasks.keys().copied().collect()
                } else {
                    vec![partition]
                };
                for target in targets {
                    if let Some(task) = self.tasks.get_mut(&target) {
                        task.update_table(&source.step, changes.clone())
                            .map_err(ServeError::Runtime)?;
                    }
                }
            }
        }
        Ok(())
    }
}

pub(super) fn table_changes(spec: &TableSpec, records: Vec<RawRecord>) -> Vec<StateChange> {
    let table = Table::new(spec);
    let mut changes = Vec::with_capacity(records.len());
    for (key, value) in records {
        match value {
            Some(bytes) => match crate::event::parse_value(&bytes) {
                Ok(row) => match table.row_key(&row) {
                    Ok(row_key) => changes.push(StateChange::upsert(row_key, bytes)),
                    Err(reason) => {
                        tracing::warn!(table = spec.name, reason, "skipping a table row")
                    }
                },
                Err(error) => {
                    tracing::warn!(table = spec.name, %error, "skipping a table row that is not a valid document")
                }
            },
            None => {
                let Some(key) = key else { continue };
                let Some(row) = key_row(spec, &key) else {
                    continue;
                };
                if let Ok(row_key) = table.row_key(&row) {
                    changes.push(StateChange::delete(row_key));
                }
            }
        }
    }
    changes
}

fn key_row(spec: &TableSpec, key: &[u8]) -> Option<sonic_rs::Value> {
    let values: Vec<sonic_rs::Value> = if spec.key.len() == 1 {
        let text = std::str::from_utf8(key).ok()?;
        vec![crate::event::parse_value(key).unwrap_or_else(|_| sonic_rs::Value::from(text))]
    } else {
        use sonic_rs::JsonContainerTrait as _;
        let parsed = crate::event::parse_value(key).ok()?;
        parsed.as_array()?.iter().cloned().collect()
    };
    let mut row = sonic_rs::Object::new();
    for (field, value) in spec.key.iter().zip(values) {
        row.insert(field, value);
    }
    Some(row.into_value())
}
