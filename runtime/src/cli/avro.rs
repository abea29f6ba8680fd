//! `check` and `plan` of pipelines that read Avro (`spec.source.format:
//! avro`): the source's reader schema, from `--schema-file` or a schema
//! registry, is what the steps are checked against, as the operator does.
//! An Avro source whose schema cannot be had is a diagnostic, never checked
//! against its declared schema instead.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use keystone_avro::plan::{
    AvroPlanError, ReaderSchema, reader_from_registry, reader_from_text, reader_inline,
};
use keystone_avro::registry::Registry;
use keystone_crds::check::{PipelineId, SourceFacts};
use keystone_crds::diagnostic::kinds;
use keystone_crds::pipeline::Format;
use keystone_crds::pipeline::avro::SchemaRegistrySpec;
use keystone_crds::{Diagnostic, Origin, Pipeline, Plan, Reading};
use tokio::runtime::Runtime;

/// The kind of a diagnostic about an Avro source's reader schema: it cannot
/// be had (no `--schema-file`, no registry, the registry unreachable or
/// without the subject) or Keystone cannot read it as a contract.
pub const SOURCE_SCHEMA: &str = "source-schema";

/// Where the reader schemas of Avro sources come from.
#[derive(Clone, Debug, Default, Args)]
pub struct SchemaArgs {
    /// The reader schema (an Avro schema, `.avsc` JSON) of the Avro sources
    /// (`spec.source.format: avro`), instead of asking a registry. `FILE`
    /// applies to every such pipeline in the files; `PIPELINE=FILE` to the
    /// one named PIPELINE, and wins over a plain `FILE` (repeatable; write a
    /// file whose name holds `=` as `./NAME`). Messages name it as version
    /// `--schema-version` of the source's subject, from `file FILE`.
    #[arg(long = "schema-file", value_name = "[PIPELINE=]FILE", value_parser = parse_schema_file)]
    pub schema_files: Vec<(Option<String>, PathBuf)>,
    /// The version of the source's subject the `--schema-file` schema is taken as.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        requires = "schema_files",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub schema_version: u32,
    /// Ask this schema registry for the reader schema of Avro sources without
    /// a `--schema-file` (the source's pinned version, else its latest),
    /// instead of the manifest's `spec.schemaRegistry.url` (often a name only
    /// the cluster resolves). Credentials come from the environment, as in a
    /// pod: KEYSTONE_REGISTRY_USERNAME with KEYSTONE_REGISTRY_PASSWORD (or
    /// _PASSWORD_FILE), or KEYSTONE_REGISTRY_TOKEN (or _TOKEN_FILE); a CA from
    /// KEYSTONE_REGISTRY_CA_FILE.
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,
}

/// `[PIPELINE=]FILE`: a pipeline name (a Kubernetes name: no `/`) before `=`.
fn parse_schema_file(text: &str) -> Result<(Option<String>, PathBuf), String> {
    let named = text.split_once('=').filter(|(name, _)| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    });
    let (name, file) = match named {
        Some((name, file)) => (Some(name.to_owned()), file),
        None => (None, text),
    };
    if file.is_empty() {
        return Err(format!("expected FILE or PIPELINE=FILE, got {text:?}"));
    }
    Ok((name, PathBuf::from(file)))
}

/// What is known of each pipeline's source, index-aligned with
/// `reading.manifests.pipelines`.
pub struct Sources {
    by_index: Vec<Source>,
}

enum Source {
    /// Not an Avro source, or not asked about.
    None,
    Read(ReaderSchema),
    Failed(Vec<Diagnostic>),
}

impl Sources {
    /// The reader schemas of the Avro sources of `reading` (only of the
    /// pipeline at `only`, when given): from their `--schema-file`, else
    /// from the registry. `Err`: the flags are wrong (exit status 2).
    pub fn resolve(
        reading: &Reading,
        args: &SchemaArgs,
        only: Option<usize>,
    ) -> Result<Self, String> {
        let pipelines = &reading.manifests.pipelines;
        let mut named: BTreeMap<&str, &PathBuf> = BTreeMap::new();
        let mut unnamed: Option<&PathBuf> = None;
        for (name, file) in &args.schema_files {
            match name {
                None if unnamed.is_some() => {
                    return Err(
                        "--schema-file FILE is given twice: name the pipeline each is for, as PIPELINE=FILE"
                            .to_owned(),
                    );
                }
                None => unnamed = Some(file),
                Some(name) => {
                    let Some(pipeline) = pipelines
                        .iter()
                        .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                    else {
                        return Err(format!(
                            "--schema-file {name}={}: no Pipeline named {name:?} in the given files",
                            file.display()
                        ));
                    };
                    if pipeline.spec.source.format != Format::Avro {
                        return Err(format!(
                            "--schema-file {name}={}: pipeline {name} does not read Avro (its spec.source.format is not avro)",
                            file.display()
                        ));
                    }
                    if named.insert(name, file).is_some() {
                        return Err(format!("--schema-file {name}=... is given twice"));
                    }
                }
            }
        }
        let mut texts: BTreeMap<&PathBuf, Result<String, String>> = BTreeMap::new();
        // One client per registry, each with the runtime its connections belong to.
        let mut registries: BTreeMap<String, Result<(Runtime, Registry), String>> = BTreeMap::new();
        let mut by_index = Vec::with_capacity(pipelines.len());
        for (index, pipeline) in pipelines.iter().enumerate() {
            if only.is_some_and(|only| only != index) || pipeline.spec.source.format != Format::Avro
            {
                by_index.push(Source::None);
                continue;
            }
            let origin = &reading.pipeline_origins[index];
            let at = |path: &str, message: String| located(origin, path, message, Some(HINT));
            let failed = |error: AvroPlanError| match error {
                AvroPlanError::Registry(error) => at(
                    "spec.source.format",
                    format!("format: avro: cannot get {}: {error}", wanted(pipeline)),
                ),
                schema => diagnostic(origin, &schema),
            };
            let file = pipeline
                .metadata
                .name
                .as_deref()
                .and_then(|name| named.get(name).copied())
                .or(unnamed);
            // The manifest's own reader schema is the one that runs: it
            // wins over files and registries.
            let source = if let Some(inline) = reader_inline(pipeline) {
                match inline {
                    Ok(reader) => Source::Read(reader),
                    Err(error) => Source::Failed(vec![failed(error)]),
                }
            } else if let Some(file) = file {
                let text = texts
                    .entry(file)
                    .or_insert_with(|| std::fs::read_to_string(file).map_err(|e| e.to_string()));
                match text {
                    Ok(text) => match reader_from_text(
                        pipeline,
                        text,
                        args.schema_version,
                        format!("file {}", file.display()),
                    ) {
                        Ok(reader) => Source::Read(reader),
                        Err(error) => Source::Failed(vec![failed(error)]),
                    },
                    Err(error) => Source::Failed(vec![Diagnostic::file(
                        file.display().to_string(),
                        kinds::IO,
                        format!("cannot read the --schema-file: {error}"),
                    )]),
                }
            } else if let Some(url) = args.registry.clone().or_else(|| {
                pipeline
                    .spec
                    .schema_registry
                    .as_ref()
                    .map(|r| r.url.clone())
            }) {
                let client = registries.entry(url.clone()).or_insert_with(|| {
                    crate::registry::client(&url, &|name| std::env::var(name).ok(), &|path| {
                        std::fs::read(path)
                    })
                });
                match client {
                    Ok((runtime, registry)) => {
                        match runtime.block_on(reader_from_registry(registry, pipeline)) {
                            Ok(Some(reader)) => Source::Read(reader),
                            Ok(None) => Source::None,
                            Err(error) => Source::Failed(vec![failed(error)]),
                        }
                    }
                    Err(error) => Source::Failed(vec![at(
                        "spec.source.format",
                        format!("format: avro: cannot ask the schema registry at {url}: {error}"),
                    )]),
                }
            } else {
                Source::Failed(vec![at(
                    "spec.source.format",
                    format!(
                        "format: avro: the steps are checked against the source's reader schema, {}, which cannot be had: no --schema-file is given, and neither --registry nor spec.schemaRegistry names a registry to ask",
                        wanted(pipeline)
                    ),
                )])
            };
            by_index.push(source);
        }
        Ok(Self { by_index })
    }

    /// What the checker is given of the pipeline at `index`; `Err`: why its
    /// Avro source's schema cannot be had.
    pub fn facts(&self, index: usize) -> Result<SourceFacts<'_>, Vec<Diagnostic>> {
        match self.by_index.get(index) {
            Some(Source::Failed(diagnostics)) => Err(diagnostics.clone()),
            Some(Source::Read(reader)) => Ok(SourceFacts {
                table: None,
                registered: Some(&reader.registered),
            }),
            Some(Source::None) | None => Ok(SourceFacts::default()),
        }
    }

    /// The reader schema of the pipeline at `index`, when it reads Avro and it was had.
    pub fn reader(&self, index: usize) -> Option<&ReaderSchema> {
        match self.by_index.get(index) {
            Some(Source::Read(reader)) => Some(reader),
            _ => None,
        }
    }

    /// `NAME: source schema: the Avro schema SUBJECT version N (from ORIGIN)`,
    /// for a plan of a pipeline of `reading` whose Avro source was checked
    /// against a reader schema.
    pub fn describe(&self, reading: &Reading, plan: &Plan) -> Option<String> {
        let index = reading.manifests.pipelines.iter().position(|p| {
            let id = PipelineId::of(p);
            id.namespace == plan.namespace && id.name == plan.pipeline
        })?;
        let reader = self.reader(index)?;
        Some(format!(
            "{}: source schema: {}",
            plan.pipeline,
            reader.registered.describe()
        ))
    }
}

/// A diagnostic of kind [`SOURCE_SCHEMA`] at `path` of the manifest from `origin`.
fn located(origin: &Origin, path: &str, message: String, hint: Option<&str>) -> Diagnostic {
    let at = origin.locate(path);
    Diagnostic {
        file: origin.file.clone(),
        line: at.line,
        column: at.column,
        path: Some(path.to_owned()),
        step: None,
        kind: SOURCE_SCHEMA.to_owned(),
        message,
        hint: hint.map(str::to_owned),
    }
}

/// Why the Avro parts of the plan of the manifest from `origin` cannot be made, located.
pub fn diagnostic(origin: &Origin, error: &AvroPlanError) -> Diagnostic {
    match error {
        AvroPlanError::Schema { path, message } => located(origin, path, message.clone(), None),
        AvroPlanError::Registry(error) => located(
            origin,
            "spec.source.format",
            format!("format: avro: {error}"),
            Some(HINT),
        ),
    }
}

const HINT: &str = "pass --schema-file FILE (the source's Avro schema, .avsc) or --registry URL (a schema registry this machine reaches)";

/// The schema an Avro source asks for, e.g. `the Avro schema orders-value
/// (the latest version)`.
fn wanted(pipeline: &Pipeline) -> String {
    let source = &pipeline.spec.source;
    let avro = source.avro.clone().unwrap_or_default();
    let subject = avro.subject(&source.topic);
    match avro.pinned_version() {
        Some(version) => format!("the Avro schema {subject} version {version}"),
        None => format!("the Avro schema {subject} (the latest version)"),
    }
}

/// The registry an Avro pipeline's plan names: the manifest's, else
/// `--registry`'s URL. `None` when the pipeline uses no Avro or names none
/// (the operator then takes the Kafka cluster's, which is not known here).
pub fn plan_registry(pipeline: &Pipeline, args: &SchemaArgs) -> Option<SchemaRegistrySpec> {
    if !keystone_avro::plan::uses_avro(pipeline) {
        return None;
    }
    pipeline.spec.schema_registry.clone().or_else(|| {
        args.registry.as_ref().map(|url| SchemaRegistrySpec {
            url: url.clone(),
            credentials_secret: None,
            ca_secret: None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_files_are_named_by_pipeline_or_not() {
        assert_eq!(
            parse_schema_file("orders.avsc"),
            Ok((None, PathBuf::from("orders.avsc")))
        );
        assert_eq!(
            parse_schema_file("orders=v3.avsc"),
            Ok((Some("orders".to_owned()), PathBuf::from("v3.avsc")))
        );
        assert_eq!(
            parse_schema_file("./a=b.avsc"),
            Ok((None, PathBuf::from("./a=b.avsc")))
        );
        assert!(parse_schema_file("orders=").is_err());
    }
}
