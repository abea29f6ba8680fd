//! The terms of a lake sink's `partitionBy`: a field (identity), or a
//! transform of one, written as Iceberg's partition transforms are named.

use std::fmt;

/// How a partition value is derived from a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// The field's value itself.
    Identity,
    Year,
    Month,
    /// The UTC date of a timestamp.
    Day,
    /// The UTC hour of a timestamp.
    Hour,
    /// A hash of the value into N buckets (Iceberg's murmur3 bucket).
    Bucket(u32),
}

impl Transform {
    pub fn is_time(self) -> bool {
        matches!(
            self,
            Transform::Year | Transform::Month | Transform::Day | Transform::Hour
        )
    }
}

/// One term of `partitionBy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTerm {
    pub transform: Transform,
    /// The dotted field path the term reads.
    pub field: String,
}

/// The largest bucket count accepted (Iceberg allows any positive int).
pub const MAX_BUCKETS: u32 = 1 << 20;

impl PartitionTerm {
    /// Reads `field`, `year(field)`, `month(field)`, `day(field)`,
    /// `hour(field)` or `bucket(N, field)`.
    pub fn parse(text: &str) -> Result<PartitionTerm, String> {
        let text = text.trim();
        let Some((name, rest)) = text.split_once('(') else {
            return field_path(text).map(|field| PartitionTerm {
                transform: Transform::Identity,
                field,
            });
        };
        let Some(args) = rest.strip_suffix(')') else {
            return Err(format!("{text:?} opens a parenthesis it does not close"));
        };
        let (transform, field) = match name.trim() {
            "year" => (Transform::Year, args),
            "month" => (Transform::Month, args),
            "day" => (Transform::Day, args),
            "hour" => (Transform::Hour, args),
            "identity" => (Transform::Identity, args),
            "bucket" => {
                let Some((count, field)) = args.split_once(',') else {
                    return Err(format!(
                        "{text:?}: bucket takes a count and a field, as in bucket(16, id)"
                    ));
                };
                let count: u32 = count.trim().parse().map_err(|_| {
                    format!(
                        "{text:?}: the bucket count {:?} is not a positive integer",
                        count.trim()
                    )
                })?;
                if count == 0 || count > MAX_BUCKETS {
                    return Err(format!(
                        "{text:?}: the bucket count must be between 1 and {MAX_BUCKETS}"
                    ));
                }
                (Transform::Bucket(count), field)
            }
            other => {
                return Err(format!(
                    "{text:?}: unknown transform {other:?}; use a field, year(field), month(field), day(field), hour(field) or bucket(N, field)"
                ));
            }
        };
        field_path(field.trim()).map(|field| PartitionTerm { transform, field })
    }
}

fn field_path(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.split('.').all(|segment| {
            let mut chars = segment.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a field path (letters, digits, '_', '-', segments joined by '.')"
        ))
    }
}

impl fmt::Display for PartitionTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = &self.field;
        match self.transform {
            Transform::Identity => write!(f, "{field}"),
            Transform::Year => write!(f, "year({field})"),
            Transform::Month => write!(f, "month({field})"),
            Transform::Day => write!(f, "day({field})"),
            Transform::Hour => write!(f, "hour({field})"),
            Transform::Bucket(n) => write!(f, "bucket({n}, {field})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_read_as_iceberg_names_them() {
        let read = |t: &str| PartitionTerm::parse(t).unwrap();
        assert_eq!(read("country").transform, Transform::Identity);
        assert_eq!(
            read("day(at)"),
            PartitionTerm {
                transform: Transform::Day,
                field: "at".into()
            }
        );
        assert_eq!(read("hour( ts )").field, "ts");
        assert_eq!(read("bucket(16, user.id)").transform, Transform::Bucket(16));
        assert_eq!(read("bucket(16, user.id)").field, "user.id");
        assert_eq!(
            read("bucket(16, user.id)").to_string(),
            "bucket(16, user.id)"
        );
    }

    #[test]
    fn malformed_terms_say_what_is_wrong() {
        let error = |t: &str| PartitionTerm::parse(t).unwrap_err();
        assert!(error("week(at)").contains("unknown transform \"week\""));
        assert!(error("bucket(at)").contains("bucket takes a count and a field"));
        assert!(error("bucket(0, id)").contains("between 1 and"));
        assert!(error("bucket(x, id)").contains("not a positive integer"));
        assert!(error("day(at").contains("does not close"));
        assert!(error("a b").contains("is not a field path"));
        assert!(error("day()").contains("is not a field path"));
    }
}
