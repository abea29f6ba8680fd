//! Hints from the CRDs' schema: the field meant by a misspelt one, the values an
//! enum allows, the range of a number.

use serde_json::Value as Json;

use crate::validate::crd_schema as schema;

/// The schema of the field at `path` (`spec.steps[2].dedup`): properties,
/// additional properties and items followed; `None` where the schema does not say.
fn schema_at(kind: &str, path: &str) -> Option<&'static Json> {
    let mut node = schema(kind)?;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indexes) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            node = match node.get("properties").and_then(|p| p.get(key)) {
                Some(child) => child,
                None => node.get("additionalProperties").filter(|a| a.is_object())?,
            };
        }
        for _ in indexes.matches('[') {
            node = node.get("items")?;
        }
    }
    Some(node)
}

/// The last field name of `path` and the path of its parent.
fn split_last(path: &str) -> Option<(&str, &str)> {
    let (parent, last) = path.rsplit_once('.').unwrap_or(("", path));
    (!last.is_empty() && !last.contains('[')).then_some((parent, last))
}

/// The fields the schema defines where `path` names one it does not; `None` when
/// the field is known there (or the schema allows any field).
fn known_fields_around_unknown(kind: &str, path: &str) -> Option<Vec<&'static str>> {
    let (parent, last) = split_last(path)?;
    let properties = schema_at(kind, parent)?.get("properties")?.as_object()?;
    if properties.contains_key(last) {
        return None;
    }
    Some(properties.keys().map(String::as_str).collect())
}

/// The candidate closest to `word` when close enough to be a likely typo: an edit
/// distance of at most a third of the word (and at least 2 for short words), or
/// the same letters in another case.
fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|candidate| {
            let distance = if candidate.eq_ignore_ascii_case(word) {
                0
            } else {
                strsim::damerau_levenshtein(word, candidate)
            };
            (distance, candidate)
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// The hint for a field at `path` that the schema does not define: the known
/// field it is likely a typo of, or the fields there when there are few.
pub fn unknown_field(kind: &str, path: &str) -> Option<String> {
    let known = known_fields_around_unknown(kind, path)?;
    let (_, last) = split_last(path)?;
    if let Some(meant) = closest(last, known.iter().copied()) {
        return Some(format!("did you mean `{meant}`?"));
    }
    (known.len() <= 12).then(|| format!("the fields here are {}", quoted(&known)))
}

/// Whether `path` names a field the schema does not define.
pub fn is_unknown_field(kind: &str, path: &str) -> bool {
    known_fields_around_unknown(kind, path).is_some()
}

/// The hint for a wrong value at `path`: the allowed values of an enum (the
/// closest first when `value` is near one), the range of a number.
pub fn value(kind: &str, path: &str, value: Option<&str>) -> Option<String> {
    let schema = schema_at(kind, path)?;
    if let Some(allowed) = schema.get("enum").and_then(Json::as_array) {
        let allowed: Vec<&str> = allowed.iter().filter_map(Json::as_str).collect();
        if allowed.is_empty() {
            return None;
        }
        let list = format!("allowed values: {}", quoted(&allowed));
        return Some(
            match value.and_then(|v| closest(v, allowed.iter().copied())) {
                Some(meant) if Some(meant) != value => format!("did you mean `{meant}`? ({list})"),
                _ => list,
            },
        );
    }
    let bound = |name: &str| schema.get(name).and_then(Json::as_f64);
    let number = if schema.get("type").and_then(Json::as_str) == Some("integer") {
        "an integer"
    } else {
        "a number"
    };
    match (bound("minimum"), bound("maximum")) {
        (Some(min), Some(max)) => Some(format!("{number} from {min} to {max}")),
        (Some(min), None) => Some(format!("{number} of at least {min}")),
        (None, Some(max)) => Some(format!("{number} of at most {max}")),
        (None, None) => None,
    }
}

/// What a value that does not match the pattern at `path` should look like.
pub fn pattern(kind: &str, path: &str) -> Option<String> {
    let pattern = schema_at(kind, path)?.get("pattern")?.as_str()?.to_owned();
    Some(pattern_hint(&pattern))
}

/// The CRDs' patterns in words: a regular expression is not a fix a user can apply.
fn pattern_hint(pattern: &str) -> String {
    match pattern {
        "^([0-9]+(ms|s|m|h|d))+$" => {
            "a duration: a number and a unit (ms, s, m, h, d), for example 500ms, 30s, 10m or 1h30m".to_owned()
        }
        r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$" => {
            "a field name: letters, digits, `_` and `-`, not starting with a digit; `.` between the names of nested fields (customer.id)".to_owned()
        }
        r"^[A-Za-z0-9._\-]+$" => {
            "a Kafka topic name: letters, digits, `.`, `_` and `-`".to_owned()
        }
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" => {
            "a lowercase name: letters, digits and `-`, starting and ending with a letter or digit".to_owned()
        }
        r"^[a-z0-9][a-z0-9_.\-]*$" => {
            "a lowercase index name: letters, digits, `_`, `.` and `-`, starting with a letter or digit".to_owned()
        }
        "^/.+" => {
            "a JSON pointer to a field of the event, for example /payload/id (`/` alone, the whole event, cannot be copied into one field)".to_owned()
        }
        "^https?://" => "an http:// or https:// URL".to_owned(),
        other => format!("it must match the regular expression {other}"),
    }
}

fn quoted(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| format!("`{w}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_get_the_closest_known_one() {
        assert_eq!(
            unknown_field("Pipeline", "spec.sinks[0].kafka.partitons").as_deref(),
            Some("did you mean `partitions`?")
        );
        assert_eq!(
            unknown_field("Pipeline", "spec.steps[0].enrich.lookup_key").as_deref(),
            Some("did you mean `lookupKey`?")
        );
        // Known: no hint.
        assert_eq!(unknown_field("Pipeline", "spec.source.topic"), None);
        assert!(!is_unknown_field("Pipeline", "spec.source.topic"));
        assert!(is_unknown_field("Pipeline", "spec.source.topik"));
    }

    #[test]
    fn far_from_anything_lists_the_fields_when_few() {
        let hint = unknown_field("Pipeline", "spec.steps[0].dedup.zzzzzzzz").unwrap();
        assert!(
            hint.starts_with("the fields here are ") && hint.contains("`window`"),
            "{hint}"
        );
    }

    #[test]
    fn enum_values_are_listed() {
        let hint = value("Pipeline", "spec.delivery", Some("ExactlyOnse")).unwrap();
        assert_eq!(
            hint,
            "did you mean `ExactlyOnce`? (allowed values: `ExactlyOnce`, `AtLeastOnce`)"
        );
        let hint = value("Pipeline", "spec.delivery", Some("whatever")).unwrap();
        assert_eq!(hint, "allowed values: `ExactlyOnce`, `AtLeastOnce`");
    }

    #[test]
    fn number_ranges() {
        assert_eq!(
            value("Pipeline", "spec.parallelism", None).as_deref(),
            Some("an integer from 1 to 1024")
        );
        assert_eq!(value("Pipeline", "spec.source.topic", None), None);
    }

    #[test]
    fn patterns_in_words() {
        assert_eq!(
            pattern("Pipeline", "spec.commitInterval").as_deref(),
            Some(
                "a duration: a number and a unit (ms, s, m, h, d), for example 500ms, 30s, 10m or 1h30m"
            )
        );
        assert_eq!(
            pattern("Pipeline", "spec.source.topic").as_deref(),
            Some("a Kafka topic name: letters, digits, `.`, `_` and `-`")
        );
        assert_eq!(pattern("Pipeline", "spec.parallelism"), None);
    }
}
