//! `metadata` as the API server validates a custom resource's ObjectMeta on
//! create (name, generateName, namespace, labels, annotations, unknown fields),
//! and Keystone's own rule for Pipeline names.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Map, Value as Json};

use super::{Origin, Violation};

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const QUALIFIED_NAME: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
/// Longest annotations (keys and values together) the API server stores.
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// Longest Pipeline name: its stage Services are `<name>-s<N>`, DNS-1035 labels
/// of at most 63 characters, for up to 1000 stages.
pub const MAX_PIPELINE_NAME: usize = 57;

/// The fields of ObjectMeta; any other field under `metadata` is unknown.
const OBJECT_META_FIELDS: [&str; 15] = [
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

fn anchored(cell: &'static OnceLock<Regex>, pattern: impl FnOnce() -> String) -> &'static Regex {
    cell.get_or_init(|| Regex::new(&format!("^(?:{})$", pattern())).expect("valid pattern"))
}

fn dns1123_subdomain() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    anchored(&RE, || format!(r"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"))
}

fn dns1123_label() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    anchored(&RE, || DNS1123_LABEL.to_owned())
}

fn dns1035_label() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    anchored(&RE, || "[a-z]([-a-z0-9]*[a-z0-9])?".to_owned())
}

fn qualified_name_part() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    anchored(&RE, || QUALIFIED_NAME.to_owned())
}

fn label_value() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    anchored(&RE, || format!("({QUALIFIED_NAME})?"))
}

/// Why `value` is not a DNS-1123 subdomain (the API server's rule for a custom
/// resource's name), if it is not.
fn subdomain_problem(value: &str) -> Option<String> {
    if value.len() > 253 {
        Some("must be no more than 253 characters".to_owned())
    } else if !dns1123_subdomain().is_match(value) {
        Some(format!(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{DNS1123_LABEL}(\\.{DNS1123_LABEL})*')"
        ))
    } else {
        None
    }
}

/// Why `key` is not a qualified name (`[prefix/]name`, the rule for label and
/// annotation keys), if it is not.
fn qualified_name_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Some("prefix part must be non-empty".to_owned());
        }
        if let Some(problem) = subdomain_problem(prefix) {
            return Some(format!("prefix part {problem}"));
        }
    }
    if name.is_empty() {
        Some("name part must be non-empty".to_owned())
    } else if name.len() > 63 {
        Some("name part must be no more than 63 characters".to_owned())
    } else if !qualified_name_part().is_match(name) {
        Some(format!(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc', regex used for validation is '{QUALIFIED_NAME}')"
        ))
    } else {
        None
    }
}

/// Why a Pipeline cannot be named `name` although the API server accepts it, if
/// it cannot. This is Keystone's rule, not the API server's: the operator names
/// each stage's Service `<name>-s<N>`, and a Service name is a DNS-1035 label
/// (a lowercase letter first, no dots, at most 63 characters).
pub fn pipeline_name_problem(name: &str) -> Option<String> {
    if name.len() > MAX_PIPELINE_NAME {
        Some(format!(
            "a Pipeline name is at most {MAX_PIPELINE_NAME} characters (this one has {}): it prefixes its stage Services (`<name>-s<N>`), whose names are DNS-1035 labels of at most 63 characters",
            name.len()
        ))
    } else if !dns1035_label().is_match(name) {
        Some(
            "a Pipeline name must start with a lowercase letter and consist of lowercase letters, digits and '-' (no '.'), ending with a letter or digit: it prefixes its stage Services (`<name>-s<N>`), whose names are DNS-1035 labels".to_owned(),
        )
    } else {
        None
    }
}

pub(super) fn validate_metadata(kind: &str, metadata: Option<&Json>) -> Vec<Violation> {
    let mut out = Vec::new();
    let empty = Map::new();
    let meta = match metadata {
        None | Some(Json::Null) => &empty,
        Some(Json::Object(map)) => map,
        Some(other) => {
            out.push(Violation::new(
                "metadata",
                format!(
                    "Invalid value: {other}: metadata must be an object (ObjectMeta), not {}",
                    super::schema::json_type_name(other)
                ),
            ));
            return out;
        }
    };
    for key in meta.keys() {
        if !OBJECT_META_FIELDS.contains(&key.as_str()) {
            let path = format!("metadata.{key}");
            out.push(Violation::new(&path, format!("unknown field {path}")));
        }
    }
    let string = |key: &str, out: &mut Vec<Violation>| -> Option<String> {
        match meta.get(key) {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(other) => {
                out.push(Violation::new(
                    &format!("metadata.{key}"),
                    format!("Invalid value: {other}: must be a string"),
                ));
                None
            }
        }
    };
    let name = string("name", &mut out);
    let generate_name = string("generateName", &mut out);
    match (&name, &generate_name) {
        (Some(name), _) if !name.is_empty() => {
            if let Some(problem) = subdomain_problem(name) {
                out.push(Violation::new(
                    "metadata.name",
                    format!("Invalid value: {}: {problem}", Json::from(name.as_str())),
                ));
            } else if kind == "Pipeline"
                && let Some(problem) = pipeline_name_problem(name)
            {
                out.push(Violation {
                    path: "metadata.name".to_owned(),
                    message: format!("Invalid value: {}: {problem}", Json::from(name.as_str())),
                    origin: Origin::Keystone,
                });
            }
        }
        (_, Some(prefix)) if !prefix.is_empty() => {
            // A prefix may end in '-': the server appends random characters.
            let masked = prefix
                .strip_suffix('-')
                .map_or(prefix.clone(), |p| format!("{p}a"));
            if let Some(problem) = subdomain_problem(&masked) {
                out.push(Violation::new(
                    "metadata.generateName",
                    format!("Invalid value: {}: {problem}", Json::from(prefix.as_str())),
                ));
            }
        }
        _ => out.push(Violation::new(
            "metadata.name",
            "Required value: name or generateName is required",
        )),
    }
    if let Some(namespace) = string("namespace", &mut out)
        && !namespace.is_empty()
        && (namespace.len() > 63 || !dns1123_label().is_match(&namespace))
    {
        out.push(Violation::new(
            "metadata.namespace",
            format!(
                "Invalid value: {}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', start and end with an alphanumeric character, and have at most 63 characters",
                Json::from(namespace.as_str())
            ),
        ));
    }
    validate_string_map(meta, "labels", &mut out, |path, key, value, out| {
        if let Some(problem) = qualified_name_problem(key) {
            out.push(Violation::new(
                path,
                format!("Invalid value: {}: {problem}", Json::from(key)),
            ));
        }
        if value.len() > 63 {
            out.push(Violation::new(
                path,
                format!(
                    "Invalid value: {}: must be no more than 63 characters",
                    Json::from(value)
                ),
            ));
        } else if !label_value().is_match(value) {
            out.push(Violation::new(
                path,
                format!(
                    "Invalid value: {}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                    Json::from(value)
                ),
            ));
        }
    });
    let mut annotation_bytes = 0;
    validate_string_map(meta, "annotations", &mut out, |path, key, value, out| {
        annotation_bytes += key.len() + value.len();
        if let Some(problem) = qualified_name_problem(&key.to_lowercase()) {
            out.push(Violation::new(
                path,
                format!("Invalid value: {}: {problem}", Json::from(key)),
            ));
        }
    });
    if annotation_bytes > MAX_ANNOTATIONS_BYTES {
        out.push(Violation::new(
            "metadata.annotations",
            format!(
                "Too long: may not be more than {MAX_ANNOTATIONS_BYTES} bytes (they have {annotation_bytes})"
            ),
        ));
    }
    out
}

/// Checks `metadata.<field>`, a map of strings, entry by entry.
fn validate_string_map(
    meta: &Map<String, Json>,
    field: &str,
    out: &mut Vec<Violation>,
    mut check: impl FnMut(&str, &str, &str, &mut Vec<Violation>),
) {
    match meta.get(field) {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for (key, value) in map {
                let path = format!("metadata.{field}");
                match value {
                    Json::String(value) => check(&path, key, value, out),
                    other => out.push(Violation::new(
                        &format!("metadata.{field}.{key}"),
                        format!("Invalid value: {other}: must be a string"),
                    )),
                }
            }
        }
        Some(other) => out.push(Violation::new(
            &format!("metadata.{field}"),
            format!("Invalid value: {other}: must be a map of strings"),
        )),
    }
}
