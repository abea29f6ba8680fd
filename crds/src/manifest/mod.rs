//! Reading Pipeline and Processor manifests from YAML. Every problem is reported,
//! not only the first, each located in its file (line, column and field path):
//! YAML syntax, the CRD schema, values that do not read as their type, and, in
//! [`check`], the processing contracts.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use crate::check::{
    ContractError, PipelineId, SourceFacts, check_processor, compile_with_facts, topic_cycles,
};
use crate::diagnostic::{Diagnostic, contract_kind, kinds};
use crate::pipeline::Pipeline;
use crate::plan::Plan;
use crate::processor::Processor;
use crate::validate::validate;

mod hints;
mod locate;

pub use locate::{Locations, Position};

/// Everything read from one or more manifest files.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub pipelines: Vec<Pipeline>,
    pub processors: Vec<Processor>,
}

impl Manifests {
    pub fn extend(&mut self, other: Manifests) {
        self.pipelines.extend(other.pipelines);
        self.processors.extend(other.processors);
    }
}

/// Every problem found in some manifests (never empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<Diagnostic>);

impl ManifestErrors {
    /// 2 when a file could not be read as manifests, 1 otherwise.
    pub fn exit_status(&self) -> i32 {
        Diagnostic::exit_status(&self.0)
    }
}

/// One diagnostic per line (a hint on a line of its own).
impl std::fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

/// Where a manifest came from: its file and the positions of its fields, to
/// locate what is later found wrong in it.
#[derive(Clone, Debug)]
pub struct Origin {
    pub file: String,
    locations: Arc<Locations>,
}

impl Origin {
    /// The position of the field at `path` (or of its nearest existing parent).
    pub fn locate(&self, path: &str) -> Position {
        self.locations.locate(path)
    }

    /// A contract error of this manifest, located.
    pub fn contract_diagnostic(&self, error: &ContractError) -> Diagnostic {
        let at = self.locate(&error.path);
        Diagnostic {
            file: self.file.clone(),
            line: at.line,
            column: at.column,
            path: (!error.path.is_empty()).then(|| error.path.clone()),
            step: error.subject.clone(),
            kind: contract_kind(error.kind),
            message: error.message.clone(),
            hint: None,
        }
    }
}

/// What reading manifest files found: the manifests that could be read, where
/// each came from, and a diagnostic for each problem. A document with a problem
/// is left out of `manifests`; the other documents and files are still read.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub manifests: Manifests,
    /// Index-aligned with `manifests.pipelines`.
    pub pipeline_origins: Vec<Origin>,
    /// Index-aligned with `manifests.processors`.
    pub processor_origins: Vec<Origin>,
    pub diagnostics: Vec<Diagnostic>,
    /// The files in the order read, to sort diagnostics by.
    files: Vec<String>,
}

/// What [`check`] found: the plans of the pipelines without errors, and every
/// diagnostic (the reading's too), sorted by file (in the order read), line and column.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    pub plans: Vec<Plan>,
    pub diagnostics: Vec<Diagnostic>,
}

const API_VERSION: &str = "keystone.dev/v1alpha1";

/// The largest manifest file read, in bytes; a larger one is refused before it
/// is parsed (parsing takes time and memory in its size). The API server
/// refuses a request body over 3 MiB, so no object a cluster holds comes from
/// a larger document, and files of Pipelines and Processors are a few KiB.
pub const MAX_MANIFEST_BYTES: usize = 3 << 20;

/// The largest document, in bytes of JSON: etcd refuses to store a larger
/// object (its default `--max-request-bytes`), which `kubectl apply` reports as
/// "etcdserver: request is too large".
pub const MAX_OBJECT_BYTES: usize = 1536 << 10;

/// How deeply the YAML reader nests collections (serde_yaml_ng's limit; the
/// event parser stops at twice that): Keystone manifests nest about ten deep.
const MAX_YAML_NESTING: usize = 128;

impl Reading {
    /// Reads every YAML document in `text` (named `file` in diagnostics).
    /// Documents of other kinds are an error: a manifest given to Keystone should
    /// hold only its kinds.
    pub fn parse(file: &str, text: &str) -> Reading {
        if text.len() > MAX_MANIFEST_BYTES {
            return Reading::too_large(file, text.len() as u64);
        }
        // YAML ends a line at a lone carriage return too, and documents are cut
        // from the text by lines; as a newline it means the same and keeps
        // every line, column and offset.
        let normalized;
        let text = if text.contains('\r') {
            normalized = lone_carriage_returns_as_newlines(text);
            normalized.as_str()
        } else {
            text
        };
        let mut reading = Reading {
            files: vec![file.to_owned()],
            ..Reading::default()
        };
        for document in locate::documents(text) {
            let document_text = document.text(text);
            match document.outcome {
                Err(error) => reading.diagnostics.push(Diagnostic {
                    file: file.to_owned(),
                    line: error.at.line,
                    column: error.at.column,
                    path: None,
                    step: None,
                    kind: kinds::SYNTAX.to_owned(),
                    message: syntax_message(error.message),
                    hint: None,
                }),
                Ok(locations) => {
                    let origin = Origin {
                        file: file.to_owned(),
                        locations: Arc::new(locations),
                    };
                    reading.read_document(document_text, document.first_line, origin);
                }
            }
        }
        reading
    }

    /// A file of `size` bytes, over [`MAX_MANIFEST_BYTES`]: not read.
    pub fn too_large(file: &str, size: u64) -> Reading {
        Reading::unreadable(
            file,
            format!(
                "the file is {size} bytes, over the limit of {MAX_MANIFEST_BYTES} (3 MiB, the largest request the API server accepts); Pipelines and Processors are a few KiB: split the documents across several files"
            ),
        )
    }

    /// A file that could not be read at all.
    pub fn unreadable(file: &str, message: impl Into<String>) -> Reading {
        Reading {
            files: vec![file.to_owned()],
            diagnostics: vec![Diagnostic::file(file, kinds::IO, message)],
            ..Reading::default()
        }
    }

    pub fn extend(&mut self, other: Reading) {
        self.manifests.extend(other.manifests);
        self.pipeline_origins.extend(other.pipeline_origins);
        self.processor_origins.extend(other.processor_origins);
        self.diagnostics.extend(other.diagnostics);
        self.files.extend(other.files);
    }

    /// The manifests, or every problem found reading them.
    pub fn into_manifests(self) -> Result<Manifests, ManifestErrors> {
        if self.diagnostics.is_empty() {
            Ok(self.manifests)
        } else {
            Err(ManifestErrors(self.sorted(self.diagnostics.clone())))
        }
    }

    /// Where the pipeline named `name` came from.
    pub fn pipeline_origin(&self, name: &str) -> Option<&Origin> {
        self.manifests
            .pipelines
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some(name))
            .map(|i| &self.pipeline_origins[i])
    }

    /// Compiles the pipeline at `index` of `manifests.pipelines`, locating its errors.
    pub fn compile(&self, index: usize) -> Result<Plan, Vec<Diagnostic>> {
        self.compile_with(index, &SourceFacts::default())
    }

    /// [`Reading::compile`], with what is known of the source beyond the
    /// manifest (an Avro source's reader schema: see [`compile_with_facts`]).
    pub fn compile_with(
        &self,
        index: usize,
        facts: &SourceFacts<'_>,
    ) -> Result<Plan, Vec<Diagnostic>> {
        compile_with_facts(
            &self.manifests.pipelines[index],
            &self.manifests.processors,
            facts,
        )
        .map_err(|errors| {
            let origin = &self.pipeline_origins[index];
            errors
                .0
                .iter()
                .map(|e| origin.contract_diagnostic(e))
                .collect()
        })
    }

    /// `diagnostics` by file (in the order read), line and column, without repeats.
    pub fn sorted(&self, mut diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
        let rank = |file: &str| {
            self.files
                .iter()
                .position(|f| f == file)
                .unwrap_or(usize::MAX)
        };
        // Stable: problems at one place keep the order they were found in.
        diagnostics.sort_by(|a, b| {
            (rank(&a.file), a.line, a.column).cmp(&(rank(&b.file), b.line, b.column))
        });
        let mut unique: Vec<Diagnostic> = Vec::with_capacity(diagnostics.len());
        for diagnostic in diagnostics {
            if !unique.contains(&diagnostic) {
                unique.push(diagnostic);
            }
        }
        unique
    }

    fn diagnostic(
        &mut self,
        origin: &Origin,
        at: Position,
        kind: &str,
        path: Option<&str>,
        message: String,
        hint: Option<String>,
    ) {
        self.diagnostics.push(Diagnostic {
            file: origin.file.clone(),
            line: at.line,
            column: at.column,
            path: path.filter(|p| !p.is_empty()).map(str::to_owned),
            step: None,
            kind: kind.to_owned(),
            message,
            hint,
        });
    }

    /// Reads one document: `text` is its lines, starting at the file's line `first_line`.
    fn read_document(&mut self, text: &str, first_line: usize, origin: Origin) {
        // The event parser located every node; the values are read by
        // serde_yaml_ng, as everywhere else in Keystone, so that they mean the same.
        let value: serde_yaml_ng::Value = match serde_yaml_ng::from_str(text) {
            Ok(value) => value,
            Err(error) => {
                let at = match error.location() {
                    Some(location) => Position {
                        line: location.line() + first_line - 1,
                        column: location.column(),
                    },
                    None => origin.locate(""),
                };
                let message = syntax_message(strip_location(&error.to_string()));
                self.diagnostic(&origin, at, kinds::SYNTAX, None, message, None);
                return;
            }
        };
        if value.is_null() {
            return;
        }
        let json: Json = match serde_json::to_value(&value) {
            Ok(json) => json,
            Err(error) => {
                let at = origin.locate("");
                let message = format!("not a JSON-compatible document: {error}");
                self.diagnostic(&origin, at, kinds::TYPE, None, message, None);
                return;
            }
        };
        let stored = serde_json::to_vec(&json).map_or(0, |bytes| bytes.len());
        if stored > MAX_OBJECT_BYTES {
            let at = origin.locate("");
            let message = format!(
                "the document is {stored} bytes as JSON, over the {MAX_OBJECT_BYTES} (1.5 MiB) the API server can store for one object"
            );
            self.diagnostic(&origin, at, kinds::SCHEMA, None, message, None);
            return;
        }
        let kind = json.get("kind").and_then(Json::as_str).unwrap_or_default();
        let api_version = json
            .get("apiVersion")
            .and_then(Json::as_str)
            .unwrap_or_default();
        if kind != "Pipeline" && kind != "Processor" {
            let message =
                format!("kind {kind:?} is not a Keystone kind: expected Pipeline or Processor");
            let at = origin.locate("kind");
            self.diagnostic(&origin, at, kinds::SCHEMA, Some("kind"), message, None);
            return;
        }
        if api_version != API_VERSION {
            let message =
                format!("apiVersion is {api_version:?}, expected {API_VERSION:?} (kind {kind:?})");
            let at = origin.locate("apiVersion");
            let hint = Some(format!("apiVersion: {API_VERSION}"));
            self.diagnostic(
                &origin,
                at,
                kinds::SCHEMA,
                Some("apiVersion"),
                message,
                hint,
            );
            return;
        }
        let violations = validate(kind, &json);
        let mut located = Vec::new();
        for violation in &violations {
            let path = violation.path.as_str();
            let (at, hint) = if hints::is_unknown_field(kind, path) {
                (
                    origin.locations.locate_key(path),
                    hints::unknown_field(kind, path),
                )
            } else {
                let text = value_text(&json, path);
                let hint = if violation.message.contains("should match") {
                    hints::pattern(kind, path)
                } else {
                    hints::value(kind, path, text.as_deref())
                };
                (origin.locate(path), hint)
            };
            located.push((violation, at, hint));
        }
        // One problem per field: the API server may refuse one value on several
        // counts (too short and not matching its pattern); the count with a hint
        // says best what to write instead.
        let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
        for (index, (violation, _, hint)) in located.iter().enumerate() {
            match shown.get(violation.path.as_str()) {
                Some(&kept) if located[kept].2.is_some() || hint.is_none() => {}
                _ => {
                    shown.insert(violation.path.as_str(), index);
                }
            }
        }
        for (index, (violation, at, hint)) in located.iter().enumerate() {
            let path = violation.path.as_str();
            if shown.get(path) != Some(&index) {
                continue;
            }
            self.diagnostic(
                &origin,
                *at,
                kinds::SCHEMA,
                Some(path),
                // The API server's wording repeats the path the diagnostic shows.
                violation
                    .message
                    .replace(&format!("unknown field {path}"), "unknown field")
                    .replace(&format!("{path} in body "), ""),
                hint.clone(),
            );
        }
        // Deserialized even after schema violations, for a type error they do not
        // already report; the document is left out either way.
        let reported: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
        match kind {
            "Pipeline" => {
                if let Some(pipeline) =
                    self.deserialize::<Pipeline>(&value, &json, kind, &origin, &reported)
                    && violations.is_empty()
                {
                    self.manifests.pipelines.push(pipeline);
                    self.pipeline_origins.push(origin);
                }
            }
            _ => {
                if let Some(processor) =
                    self.deserialize::<Processor>(&value, &json, kind, &origin, &reported)
                    && violations.is_empty()
                {
                    self.manifests.processors.push(processor);
                    self.processor_origins.push(origin);
                }
            }
        }
    }

    /// Deserializes the document; on failure, a diagnostic at the field that
    /// failed, unless the schema already reported a problem there.
    fn deserialize<T: DeserializeOwned>(
        &mut self,
        value: &serde_yaml_ng::Value,
        json: &Json,
        kind: &str,
        origin: &Origin,
        reported: &[&str],
    ) -> Option<T> {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(manifest) => return Some(manifest),
            Err(error) => error,
        };
        let message = strip_location(&error.inner().to_string());
        // serde_path_to_error writes the root as `.`.
        let path = refine_path(
            json,
            error.path().to_string().trim_start_matches('.'),
            &message,
        );
        let path = path.as_str();
        let overlaps = |other: &str| {
            path == other
                || path.starts_with(&format!("{other}."))
                || path.starts_with(&format!("{other}["))
                || other.starts_with(&format!("{path}."))
                || other.starts_with(&format!("{path}["))
        };
        if reported.iter().any(|other| overlaps(other)) {
            return None;
        }
        let text = value_text(json, path);
        let hint = hints::value(kind, path, text.as_deref());
        let at = origin.locate(path);
        self.diagnostic(origin, at, kinds::TYPE, Some(path), message, hint);
        None
    }
}

/// `text` with every `\r` not followed by `\n` replaced by `\n`.
fn lone_carriage_returns_as_newlines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' && chars.peek() != Some(&'\n') {
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    out
}

/// A YAML syntax error in words: the readers' "recursion limit exceeded" is
/// collections nested too deeply.
fn syntax_message(message: String) -> String {
    if message.starts_with("recursion limit exceeded") {
        format!(
            "collections nest too deeply (recursion limit exceeded): Keystone reads YAML nested at most {MAX_YAML_NESTING} levels deep, and its manifests nest about ten"
        )
    } else {
        message
    }
}

/// serde_yaml_ng ends messages with the position, relative to the document's
/// text; the diagnostic carries the position in the file instead.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(end) => message[..end].to_owned(),
        None => message.to_owned(),
    }
}

/// serde_path_to_error cannot follow a field into a `#[serde(flatten)]` struct
/// (a step's operator): its path stops at the step. serde quotes the offending
/// value in its message (`invalid duration "soon"`, ``unknown variant `Drop2` ``),
/// so when exactly one value under `path` is quoted there, that is the field.
fn refine_path(json: &Json, path: &str, message: &str) -> String {
    let Some(node) = json_at(json, path) else {
        return path.to_owned();
    };
    if !node.is_object() && !node.is_array() {
        return path.to_owned();
    }
    let mut leaves = Vec::new();
    collect_leaves(node, path.to_owned(), &mut leaves);
    let quoted = |text: &str| {
        message.contains(&format!("\"{text}\"")) || message.contains(&format!("`{text}`"))
    };
    let mut matching = leaves.into_iter().filter(|(_, text)| quoted(text));
    match (matching.next(), matching.next()) {
        (Some((leaf, _)), None) => leaf,
        _ => path.to_owned(),
    }
}

fn collect_leaves(node: &Json, path: String, leaves: &mut Vec<(String, String)>) {
    match node {
        Json::Object(map) => {
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                collect_leaves(child, child_path, leaves);
            }
        }
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_leaves(item, format!("{path}[{i}]"), leaves);
            }
        }
        Json::String(text) => leaves.push((path, text.clone())),
        Json::Number(number) => leaves.push((path, number.to_string())),
        Json::Bool(flag) => leaves.push((path, flag.to_string())),
        Json::Null => {}
    }
}

/// The value at `path` in `json`, as text when it is a string or a number.
fn value_text(json: &Json, path: &str) -> Option<String> {
    match json_at(json, path)? {
        Json::String(text) => Some(text.clone()),
        Json::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn json_at<'a>(json: &'a Json, path: &str) -> Option<&'a Json> {
    let mut node = json;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut indexes) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            node = node.get(key)?;
        }
        while let Some(inner) = indexes.strip_prefix('[') {
            let close = inner.find(']')?;
            node = node.get(inner[..close].parse::<usize>().ok()?)?;
            indexes = &inner[close + 1..];
        }
    }
    Some(node)
}

/// Checks every Processor and compiles every Pipeline of `reading`, and locates
/// every error. Pipelines that compile give their plans even when others fail.
pub fn check(reading: &Reading) -> Checked {
    check_with(reading, |_| Ok(SourceFacts::default()))
}

/// [`check`], with what is known of each pipeline's source beyond its
/// manifest: `facts(index)` for the pipeline at `index` of
/// `manifests.pipelines`. A pipeline whose facts cannot be had (`Err`, its
/// diagnostics) is not compiled: checked without them, its steps would be
/// checked against a schema that is not the one its events have.
pub fn check_with<'a>(
    reading: &Reading,
    mut facts: impl FnMut(usize) -> Result<SourceFacts<'a>, Vec<Diagnostic>>,
) -> Checked {
    let mut diagnostics = reading.diagnostics.clone();
    for (processor, origin) in reading
        .manifests
        .processors
        .iter()
        .zip(&reading.processor_origins)
    {
        if let Err(errors) = check_processor(processor) {
            diagnostics.extend(errors.0.iter().map(|e| origin.contract_diagnostic(e)));
        }
    }
    let mut plans = Vec::new();
    for index in 0..reading.manifests.pipelines.len() {
        match facts(index).and_then(|facts| reading.compile_with(index, &facts)) {
            Ok(plan) => plans.push(plan),
            Err(errors) => diagnostics.extend(errors),
        }
    }
    // Pipelines that feed each other through their topics, across files.
    let pipelines: Vec<&Pipeline> = reading.manifests.pipelines.iter().collect();
    for cycle in topic_cycles(&pipelines, None) {
        if let Some(index) = pipelines
            .iter()
            .position(|p| PipelineId::of(p) == cycle.pipeline)
        {
            diagnostics.push(reading.pipeline_origins[index].contract_diagnostic(&cycle.error));
        }
    }
    Checked {
        plans,
        diagnostics: reading.sorted(diagnostics),
    }
}

/// Parses every YAML document in `text` (named `file` in errors): the manifests,
/// or every problem found in them.
pub fn parse_manifests(file: &str, text: &str) -> Result<Manifests, ManifestErrors> {
    Reading::parse(file, text).into_manifests()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: p
spec:
  source:
    topic: in
    schema:
      fields:
        - {name: id, type: string}
  steps:
    - name: once
      dedup: {key: [id], window: 1m}
  sinks:
    - name: out
      kafka: {topic: out}
"#;

    fn errors(file: &str, text: &str) -> Vec<Diagnostic> {
        parse_manifests(file, text).unwrap_err().0
    }

    #[test]
    fn reads_a_pipeline() {
        let manifests = parse_manifests("p.yaml", PIPELINE).unwrap();
        assert_eq!(manifests.pipelines.len(), 1);
        assert_eq!(manifests.pipelines[0].spec.sinks[0].name, "out");
    }

    #[test]
    fn empty_and_comment_only_documents_are_skipped() {
        let text = format!("# nothing\n---\n---\n# still nothing\n{PIPELINE}---\n");
        assert_eq!(parse_manifests("p.yaml", &text).unwrap().pipelines.len(), 1);
        assert_eq!(parse_manifests("e.yaml", "").unwrap().pipelines.len(), 0);
    }

    #[test]
    fn syntax_errors_have_line_and_column_and_do_not_hide_later_documents() {
        let text = format!(
            "apiVersion: keystone.dev/v1alpha1\nkind: [Pipeline\n---{}",
            PIPELINE.replace("window: 1m", "window: 1x")
        );
        let errors = errors("bad.yaml", &text);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].kind, kinds::SYNTAX);
        assert!(
            errors[0].line >= 2 && errors[0].line <= 3,
            "{:?}",
            errors[0]
        );
        // The document after the broken one is read: its duration is wrong
        // (the CRD's pattern for durations refuses it).
        assert_eq!(errors[1].kind, kinds::SCHEMA);
        assert_eq!(
            errors[1].path.as_deref(),
            Some("spec.steps[0].dedup.window")
        );
        assert_eq!((errors[1].line, errors[1].column), (16, 34));
    }

    #[test]
    fn errors_only_serde_yaml_ng_finds_are_placed_in_the_file() {
        // The event parser accepts a repeated key; serde_yaml_ng does not, and
        // places it (at the mapping holding it) within the document's text: the
        // line given is the file's.
        let text = format!("{PIPELINE}---\nkind: Pipeline\nkind: Processor\n");
        let errors = errors("dup.yaml", &text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].kind, kinds::SYNTAX);
        assert_eq!(
            (errors[0].line, errors[0].column),
            (19, 1),
            "{:?}",
            errors[0]
        );
        assert!(!errors[0].message.contains(" at line "), "{:?}", errors[0]);
    }

    #[test]
    fn unknown_fields_are_located_at_their_key_with_a_hint() {
        let text = PIPELINE.replace("kafka: {topic: out}", "kafka: {topic: out, partitons: 3}");
        let errors = errors("p.yaml", &text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let error = &errors[0];
        assert_eq!(error.kind, kinds::SCHEMA);
        assert_eq!(error.path.as_deref(), Some("spec.sinks[0].kafka.partitons"));
        assert_eq!((error.line, error.column), (17, 27));
        assert_eq!(error.hint.as_deref(), Some("did you mean `partitions`?"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let text = PIPELINE.replace(
            "kafka: {topic: out}",
            "kafka: {topic: out, partitions: many}",
        );
        let errors = errors("p.yaml", &text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].path.as_deref(),
            Some("spec.sinks[0].kafka.partitions")
        );
        assert!(
            errors[0].message.contains("must be of type integer"),
            "{:?}",
            errors[0]
        );
        assert!(!errors[0].message.contains(" at line "), "{:?}", errors[0]);
        assert_eq!((errors[0].line, errors[0].column), (17, 39));
    }

    #[test]
    fn unknown_enum_values_list_the_allowed_ones() {
        let text = PIPELINE.replace("spec:\n", "spec:\n  delivery: ExactlyOnse\n");
        let errors = errors("p.yaml", &text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path.as_deref(), Some("spec.delivery"));
        assert_eq!((errors[0].line, errors[0].column), (7, 13));
        assert_eq!(
            errors[0].hint.as_deref(),
            Some("did you mean `ExactlyOnce`? (allowed values: `ExactlyOnce`, `AtLeastOnce`)")
        );
    }

    #[test]
    fn every_document_is_reported() {
        let text = format!(
            "{}---{}",
            PIPELINE.replace("topic: in", "topik: in"),
            PIPELINE.replace("window: 1m", "window: soon")
        );
        let errors = errors("p.yaml", &text);
        let paths: Vec<_> = errors
            .iter()
            .map(|e| e.path.as_deref().unwrap_or(""))
            .collect();
        assert!(paths.contains(&"spec.source.topik"), "{errors:?}");
        assert!(paths.contains(&"spec.steps[0].dedup.window"), "{errors:?}");
        let window = errors
            .iter()
            .find(|e| e.path.as_deref() == Some("spec.steps[0].dedup.window"))
            .unwrap();
        assert_eq!((window.line, window.column), (31, 34), "{window:?}");
    }

    #[test]
    fn other_kinds_are_rejected() {
        let kind = errors("x.yaml", "apiVersion: v1\nkind: ConfigMap\n");
        assert_eq!(kind.len(), 1);
        assert_eq!(
            kind[0].to_string(),
            "x.yaml:2:7: kind: kind \"ConfigMap\" is not a Keystone kind: expected Pipeline or Processor"
        );
        let version = errors("y.yaml", "apiVersion: keystone.dev/v1\nkind: Pipeline\n");
        assert_eq!(version[0].path.as_deref(), Some("apiVersion"));
        assert_eq!((version[0].line, version[0].column), (1, 13));
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_unread() {
        // 24 MB, one expression: parsing it took seconds and gigabytes.
        let text = format!(
            "{}\n        expression: '{}'\n",
            PIPELINE,
            "seq == 0 || ".repeat(2 << 20)
        );
        let errors = errors("big.yaml", &text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].kind, kinds::IO);
        assert_eq!((errors[0].line, errors[0].column), (1, 1));
        assert_eq!(
            errors[0].message,
            format!(
                "the file is {} bytes, over the limit of 3145728 (3 MiB, the largest request the API server accepts); Pipelines and Processors are a few KiB: split the documents across several files",
                text.len()
            )
        );
        assert_eq!(ManifestErrors(errors).exit_status(), 2);
    }

    #[test]
    fn a_document_over_the_object_limit_is_refused() {
        // Under the file limit, over what etcd stores: a long list of labels.
        let labels: String = (0..40_000)
            .map(|i| format!("    label-{i}: value-of-label-number-{i}\n"))
            .collect();
        let text = PIPELINE.replace("  name: p\n", &format!("  name: p\n  labels:\n{labels}"));
        assert!(text.len() < MAX_MANIFEST_BYTES);
        let errors = errors("labels.yaml", &text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].kind, kinds::SCHEMA);
        assert!(
            errors[0].message.ends_with(
                "bytes as JSON, over the 1572864 (1.5 MiB) the API server can store for one object"
            ),
            "{:?}",
            errors[0]
        );
    }

    #[test]
    fn deep_yaml_is_refused_with_its_position() {
        let deep = |text: String, line: usize| {
            let errors = errors("deep.yaml", &text);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].kind, kinds::SYNTAX);
            assert_eq!(errors[0].line, line, "{:?}", errors[0]);
            assert!(
                errors[0].message.starts_with("collections nest too deeply"),
                "{:?}",
                errors[0]
            );
        };
        // 200 KB of `[`: refused by the event parser at its limit.
        deep("[".repeat(200_000), 1);
        deep("{a: ".repeat(50_000), 1);
        // Block collections, one level a line.
        let block: String = (0..1000)
            .map(|i| format!("{}a:\n", " ".repeat(i)))
            .collect();
        deep(block, 256);
        let dashes: String = (0..1000)
            .map(|i| format!("{}- \n", "  ".repeat(i)))
            .collect();
        deep(dashes, 256);
        // Deeper than serde_yaml_ng reads, within what the event parser does.
        let text = format!(
            "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nspec: {}{}\n",
            "[".repeat(200),
            "]".repeat(200)
        );
        deep(text, 3);
    }

    #[test]
    fn lone_carriage_returns_end_lines_as_in_yaml() {
        // Found by fuzzing: `\r\r\0` was reported on line 3 of a file whose
        // documents were cut as if it had one line.
        let errors = errors("cr.yaml", "\r\r\0");
        assert_eq!((errors[0].line, errors[0].column), (3, 1), "{errors:?}");
        // Old Mac line endings read as any other.
        let text = PIPELINE.replace('\n', "\r");
        let manifests = parse_manifests("p.yaml", &format!("{text}---\r{text}")).unwrap();
        assert_eq!(manifests.pipelines.len(), 2);
        let windows = PIPELINE.replace('\n', "\r\n");
        assert_eq!(
            parse_manifests("w.yaml", &windows).unwrap().pipelines.len(),
            1
        );
    }

    #[test]
    fn check_with_checks_against_the_facts_and_skips_pipelines_without_them() {
        use crate::check::RegisteredSource;
        use crate::schema::{FieldSpec, FieldType, SchemaSpec};
        let text = PIPELINE.replace("    topic: in\n", "    topic: in\n    format: avro\n");
        let text = format!("{text}---{}", text.replace("name: p\n", "name: q\n"));
        let reading = Reading::parse("p.yaml", &text);
        assert!(reading.diagnostics.is_empty(), "{:?}", reading.diagnostics);
        let registered = RegisteredSource {
            subject: "in-value".into(),
            version: 2,
            contract: SchemaSpec {
                fields: vec![FieldSpec {
                    name: "other".into(),
                    field_type: FieldType::String,
                    optional: false,
                    description: None,
                }],
                open: false,
            },
            origin: "file in.avsc".into(),
        };
        let unavailable = Diagnostic::file("p.yaml", "source-schema", "no schema");
        let checked = check_with(&reading, |index| match index {
            0 => Ok(SourceFacts {
                table: None,
                registered: Some(&registered),
            }),
            _ => Err(vec![unavailable.clone()]),
        });
        assert!(checked.plans.is_empty(), "{:?}", checked.plans);
        assert!(
            checked.diagnostics.contains(&unavailable),
            "{:?}",
            checked.diagnostics
        );
        assert!(
            checked.diagnostics.iter().any(|d| d.message.ends_with(
                "; the source schema is the Avro schema in-value version 2 (from file in.avsc)"
            ) && d.message.contains("\"id\"")),
            "{:?}",
            checked.diagnostics
        );
    }

    #[test]
    fn contract_errors_are_located_by_path() {
        let text = PIPELINE.replace("key: [id]", "key: [event_id]");
        let reading = Reading::parse("p.yaml", &text);
        assert!(reading.diagnostics.is_empty(), "{:?}", reading.diagnostics);
        let checked = check(&reading);
        assert!(checked.plans.is_empty());
        let error = &checked.diagnostics[0];
        assert_eq!(error.path.as_deref(), Some("spec.steps[0]"));
        assert_eq!(error.step.as_deref(), Some("once"));
        assert_eq!(error.kind, "missing-field");
        assert_eq!((error.line, error.column), (13, 7));
    }
}
