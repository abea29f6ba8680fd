//! Where rows go: Hive-style partition folders from `partitionBy`, and the
//! names of staged and published files.
//!
//! ```text
//! <base>/country=NL/date=2026-12-03/hour=17/part-<instance>-<epoch>-<n>.zstd.parquet
//! <base>/country=NL/date=2026-12-03/hour=17/_SUCCESS
//! <base>/_staging/<instance>/<epoch>/country=NL/date=2026-12-03/hour=17/part-...
//! ```

use chrono::{DateTime, Datelike, Timelike, Utc};
use keystone_crds::pipeline::partitioning::{PartitionTerm, Transform};
use sonic_rs::{JsonValueTrait, Value};

use crate::connectors::lake::LakeError;
use crate::connectors::lake::rows::timestamp_micros;

/// Hive's folder value for a missing (null) partition value.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";
/// The folder files are staged under before they are published; readers
/// skip names starting with `_`.
pub const STAGING: &str = "_staging";
/// The marker of a complete time partition.
pub const SUCCESS: &str = "_SUCCESS";

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// The partition terms of a Parquet sink.
#[derive(Clone, Debug)]
pub struct Layout {
    terms: Vec<PartitionTerm>,
}

/// The folder of one row, and when its time partition ends (if it has one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Folder {
    /// Relative to the base, without a trailing `/`; empty when unpartitioned.
    pub path: String,
    /// The end of the finest time term's span, in epoch microseconds.
    pub ends_at: Option<i64>,
}

impl Layout {
    pub fn new(partition_by: &[String]) -> Result<Layout, LakeError> {
        let terms = partition_by
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let term = PartitionTerm::parse(text).map_err(|message| LakeError::Partition {
                    index,
                    term: text.clone(),
                    message,
                })?;
                match term.transform {
                    Transform::Identity if !term.field.contains('.') => Ok(term),
                    Transform::Day | Transform::Hour => Ok(term),
                    _ => Err(LakeError::Partition {
                        index,
                        term: text.clone(),
                        message: "Parquet folders are a top-level field, day(field) or hour(field)"
                            .to_owned(),
                    }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Layout { terms })
    }

    /// The top-level fields whose values live in folder names (left out of
    /// the files, as Hive has them).
    pub fn folder_fields(&self) -> Vec<&str> {
        self.terms
            .iter()
            .filter(|t| t.transform == Transform::Identity)
            .map(|t| t.field.as_str())
            .collect()
    }

    /// The field that time folders read, if any.
    pub fn time_field(&self) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| t.transform.is_time())
            .map(|t| t.field.as_str())
    }

    /// The event time of `event` (epoch microseconds), when the layout has
    /// time folders and the event a timestamp there.
    pub fn event_time(&self, event: &Value) -> Option<i64> {
        lookup(event, self.time_field()?).and_then(timestamp_micros)
    }

    /// The folder of `event`, or why it has none (a time field that is not a
    /// timestamp, an identity value that is an object or array).
    pub fn folder_of(&self, event: &Value) -> Result<Folder, String> {
        let mut segments = Vec::with_capacity(self.terms.len());
        let mut ends_at = None;
        for term in &self.terms {
            let value = lookup(event, &term.field).filter(|v| !v.is_null());
            match term.transform {
                Transform::Identity => {
                    let text = match value {
                        None => NULL_PARTITION.to_owned(),
                        Some(v) => escape(&scalar_text(v).ok_or_else(|| {
                            format!(
                                "partition field {} is an {}, which cannot name a folder",
                                term.field,
                                crate::event::type_name(v)
                            )
                        })?),
                    };
                    segments.push(format!("{}={text}", term.field));
                }
                Transform::Day | Transform::Hour => {
                    let micros = value.and_then(timestamp_micros).ok_or_else(|| {
                        format!(
                            "partition term {term} needs {} to be a timestamp (RFC 3339 text or epoch milliseconds)",
                            term.field
                        )
                    })?;
                    let at = DateTime::<Utc>::from_timestamp_micros(micros)
                        .ok_or_else(|| format!("{} is a timestamp out of range", term.field))?;
                    if term.transform == Transform::Day {
                        segments.push(format!(
                            "date={:04}-{:02}-{:02}",
                            at.year(),
                            at.month(),
                            at.day()
                        ));
                        let end =
                            micros.div_euclid(MICROS_PER_DAY) * MICROS_PER_DAY + MICROS_PER_DAY;
                        ends_at = Some(ends_at.map_or(end, |e: i64| e.min(end)));
                    } else {
                        segments.push(format!("hour={:02}", at.hour()));
                        let end =
                            micros.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR + MICROS_PER_HOUR;
                        ends_at = Some(ends_at.map_or(end, |e: i64| e.min(end)));
                    }
                }
                _ => return Err(format!("partition term {term} is not a Parquet folder")),
            }
        }
        Ok(Folder {
            path: segments.join("/"),
            ends_at,
        })
    }
}

fn lookup<'v>(event: &'v Value, dotted: &str) -> Option<&'v Value> {
    dotted
        .split('.')
        .try_fold(event, |value, segment| value.get(segment))
}

fn scalar_text(value: &Value) -> Option<String> {
    if let Some(text) = value.as_str() {
        Some(text.to_owned())
    } else if let Some(flag) = value.as_bool() {
        Some(flag.to_string())
    } else if value.is_number() {
        Some(value.to_string())
    } else {
        None
    }
}

/// Escapes a folder value as Hive does: `%XX` for the characters a path or
/// the `field=value` form cannot hold.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let special = c.is_control()
            || matches!(
                c,
                '"' | '#' | '%' | '\'' | '*' | '/' | ':' | '=' | '?' | '\\' | '{' | '[' | ']' | '^'
            );
        if special {
            let mut buffer = [0u8; 4];
            for byte in c.encode_utf8(&mut buffer).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    match out.as_str() {
        // Hive writes an empty value as its null folder.
        "" => NULL_PARTITION.to_owned(),
        // A dot folder would vanish from the path.
        "." | ".." => out.replace('.', "%2E"),
        _ => out,
    }
}

/// The name of the `n`th file of one folder in one epoch of one instance:
/// the same staged and published, so a publish done twice overwrites.
pub fn file_name(instance: &str, epoch: u64, n: usize) -> String {
    format!("part-{instance}-{epoch:08}-{n:04}.zstd.parquet")
}

/// The staging prefix of one epoch of one instance, relative to the base.
pub fn staging_prefix(instance: &str, epoch: u64) -> String {
    format!("{STAGING}/{instance}/{epoch:08}")
}

/// `folder/name`, or `name` when unpartitioned.
pub fn join(folder: &str, name: &str) -> String {
    if folder.is_empty() {
        name.to_owned()
    } else {
        format!("{folder}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(terms: &[&str]) -> Layout {
        Layout::new(&terms.iter().map(|t| t.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn folders_follow_the_terms_in_order() {
        let layout = layout(&["country", "day(at)", "hour(at)"]);
        let event: Value =
            sonic_rs::from_str(r#"{"country":"NL","at":"2026-12-03T17:45:10Z"}"#).unwrap();
        let folder = layout.folder_of(&event).unwrap();
        assert_eq!(folder.path, "country=NL/date=2026-12-03/hour=17");
        let end = DateTime::parse_from_rfc3339("2026-12-03T18:00:00Z").unwrap();
        assert_eq!(folder.ends_at, Some(end.timestamp_micros()));
        assert_eq!(layout.folder_fields(), ["country"]);
        assert_eq!(layout.time_field(), Some("at"));
    }

    #[test]
    fn odd_values_are_escaped_and_nulls_get_hives_default() {
        let layout = layout(&["name"]);
        let event: Value = sonic_rs::from_str(r#"{"name":"a/b=c%"}"#).unwrap();
        assert_eq!(layout.folder_of(&event).unwrap().path, "name=a%2Fb%3Dc%25");
        let event: Value = sonic_rs::from_str(r#"{"name":null}"#).unwrap();
        assert_eq!(
            layout.folder_of(&event).unwrap().path,
            format!("name={NULL_PARTITION}")
        );
        let event: Value = sonic_rs::from_str(r#"{"name":{"x":1}}"#).unwrap();
        assert!(
            layout
                .folder_of(&event)
                .unwrap_err()
                .contains("cannot name a folder")
        );
        let event: Value = sonic_rs::from_str(r#"{"name":".."}"#).unwrap();
        assert_eq!(layout.folder_of(&event).unwrap().path, "name=%2E%2E");
    }

    #[test]
    fn a_time_folder_needs_a_timestamp() {
        let layout = layout(&["day(at)"]);
        let event: Value = sonic_rs::from_str(r#"{"at":"yesterday"}"#).unwrap();
        assert!(
            layout
                .folder_of(&event)
                .unwrap_err()
                .contains("needs at to be a timestamp")
        );
        let event: Value = sonic_rs::from_str(r#"{"at":1764783910000}"#).unwrap();
        assert_eq!(layout.folder_of(&event).unwrap().path, "date=2025-12-03");
    }

    #[test]
    fn terms_parquet_cannot_write_are_refused() {
        for term in ["bucket(4, id)", "month(at)", "customer.id"] {
            assert!(Layout::new(&[term.to_owned()]).is_err(), "{term}");
        }
    }
}
