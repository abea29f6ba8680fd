//! The Avro parts of a pipeline's plan: the source's reader schema from the
//! registry (or a file), the schema each Avro sink writes with, and the
//! registry's verdict on those schemas. The operator runs this before every
//! deploy and upgrade; `keystone-runtime check` runs it offline.

use apache_avro::Schema;
use keystone_crds::Pipeline;
pub use keystone_crds::check::INLINE_SCHEMA_PATH;
use keystone_crds::check::{INLINE_VERSION, RegisteredSource};
use keystone_crds::pipeline::Format;
use keystone_crds::pipeline::avro::{
    RecordPart, SchemaRegistrySpec, SubjectStrategy, default_record_name, subject_name,
};
use keystone_crds::plan::{Plan, PlanAvroSink, PlanAvroSource, PlanAvroWriter};
use keystone_crds::schema::SchemaSpec;

use crate::contract::{contract_of, schema_for_key, schema_for_output};
use crate::registry::{Registry, RegistryError};

/// The schema an Avro source is read with: its contract for the checker,
/// its text for the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ReaderSchema {
    pub registered: RegisteredSource,
    /// The schema as registered (docs and defaults kept).
    pub text: String,
}

/// Why the Avro parts of a plan cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum AvroPlanError {
    /// The registry did not answer, or refused: transient errors mean waiting.
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// A schema Keystone cannot take as a contract, or a contract that makes
    /// no schema; `path` names the manifest field.
    #[error("{path}: {message}")]
    Schema { path: String, message: String },
}

impl AvroPlanError {
    /// Whether asking again later may succeed without a change to the manifest.
    pub fn is_transient(&self) -> bool {
        matches!(self, AvroPlanError::Registry(e) if e.is_transient())
    }
}

/// Whether the pipeline reads or writes Avro anywhere, so needs a registry.
pub fn uses_avro(pipeline: &Pipeline) -> bool {
    pipeline.spec.source.format == Format::Avro
        || pipeline.spec.sinks.iter().any(|s| {
            s.kafka
                .as_ref()
                .is_some_and(|k| k.format == Format::Avro || k.key_format == Format::Avro)
        })
}

/// The reader schema written in the manifest (`spec.source.avro.schema`),
/// when the source is Avro and has one: no registry is asked for it.
pub fn reader_inline(pipeline: &Pipeline) -> Option<Result<ReaderSchema, AvroPlanError>> {
    let source = &pipeline.spec.source;
    if source.format != Format::Avro {
        return None;
    }
    let text = source.avro.as_ref()?.schema.as_deref()?;
    Some(reader_from_text(
        pipeline,
        text,
        INLINE_VERSION,
        INLINE_SCHEMA_PATH.to_owned(),
    ))
}

/// The source's reader schema: the manifest's own, else the pinned version
/// of its subject, else the latest. `None` when the source is not Avro.
pub async fn reader_from_registry(
    registry: &Registry,
    pipeline: &Pipeline,
) -> Result<Option<ReaderSchema>, AvroPlanError> {
    let source = &pipeline.spec.source;
    if source.format != Format::Avro {
        return Ok(None);
    }
    if let Some(inline) = reader_inline(pipeline) {
        return inline.map(Some);
    }
    let avro = source.avro.clone().unwrap_or_default();
    let subject = avro.subject(&source.topic);
    let registered = match avro.pinned_version() {
        Some(version) => registry.version(&subject, version).await?,
        None => registry.latest(&subject).await?,
    };
    let origin = format!("the registry at {}", registry.base_url());
    reader_of(
        &registered.schema,
        registered.text,
        subject,
        registered.version,
        origin,
    )
    .map(Some)
}

/// The reader schema from a file's text (`check --schema-file`), taken as
/// `version` of the source's subject.
pub fn reader_from_text(
    pipeline: &Pipeline,
    text: &str,
    version: u32,
    origin: String,
) -> Result<ReaderSchema, AvroPlanError> {
    let source = &pipeline.spec.source;
    let subject = source
        .avro
        .clone()
        .unwrap_or_default()
        .subject(&source.topic);
    let schema = Schema::parse_str(text).map_err(|e| AvroPlanError::Schema {
        path: reader_path(version).into(),
        message: format!("{origin} is not an Avro schema: {e}"),
    })?;
    reader_of(&schema, text.to_owned(), subject, version, origin)
}

/// The manifest field a reader schema's problems are reported at.
fn reader_path(version: u32) -> &'static str {
    if version == INLINE_VERSION {
        INLINE_SCHEMA_PATH
    } else {
        "spec.source"
    }
}

fn reader_of(
    schema: &Schema,
    text: String,
    subject: String,
    version: u32,
    origin: String,
) -> Result<ReaderSchema, AvroPlanError> {
    let mut registered = RegisteredSource {
        subject,
        version,
        contract: SchemaSpec::default(),
        origin,
    };
    registered.contract = contract_of(schema).map_err(|e| AvroPlanError::Schema {
        path: reader_path(version).into(),
        message: format!("{}: {e}", registered.describe()),
    })?;
    Ok(ReaderSchema { registered, text })
}

/// Fills the plan's Avro parts: the registry, the source's reader and each
/// Avro sink's writer (the pinned version, else the schema derived from the
/// output contract, to register). No I/O: [`check_sinks`] asks the registry.
pub fn complete_plan(
    plan: &mut Plan,
    registry: &SchemaRegistrySpec,
    reader: Option<&ReaderSchema>,
) -> Result<(), Vec<AvroPlanError>> {
    let mut errors = Vec::new();
    plan.schema_registry = Some(registry.clone());
    if let Some(reader) = reader {
        plan.source.avro = Some(PlanAvroSource {
            registry_url: registry.url.clone(),
            subject: reader.registered.subject.clone(),
            version: reader.registered.version,
            reader_schema: reader.text.clone(),
        });
    }
    let (default_namespace, default_name) = default_record_name(&plan.namespace, &plan.pipeline);
    for (i, sink) in plan.sinks.iter_mut().enumerate() {
        let Some(kafka) = sink.spec.kafka.as_ref() else {
            continue;
        };
        let (avro_value, avro_key) = (
            kafka.format == Format::Avro,
            kafka.key_format == Format::Avro,
        );
        if !avro_value && !avro_key {
            continue;
        }
        let avro = kafka.avro.clone().unwrap_or_default();
        let (namespace, name) = match avro.record_name.as_deref().and_then(|n| n.rsplit_once('.')) {
            Some((namespace, name)) => (namespace.to_owned(), name.to_owned()),
            None => match avro.record_name.as_deref() {
                Some(name) => (String::new(), name.to_owned()),
                None => (default_namespace.clone(), default_name.clone()),
            },
        };
        if avro_key {
            // The sink's key fields, else the stream's key at the sink (as the
            // runtime keys records); keys follow TopicNameStrategy.
            let key = if kafka.key.is_empty() {
                &sink.key
            } else {
                &kafka.key
            };
            match schema_for_key(&sink.schema, key, &namespace, &format!("{name}_key")) {
                Ok(derived) => {
                    sink.avro_key = Some(PlanAvroSink {
                        registry_url: registry.url.clone(),
                        subject: subject_name(
                            SubjectStrategy::TopicName,
                            &kafka.topic,
                            "",
                            RecordPart::Key,
                        ),
                        writer: PlanAvroWriter::Register {
                            schema: derived.text,
                        },
                    });
                }
                Err(e) => errors.push(AvroPlanError::Schema {
                    path: format!("spec.sinks[{i}].kafka.keyFormat"),
                    message: format!("sink {:?}: the key makes no Avro schema: {e}", sink.name),
                }),
            }
        }
        if !avro_value {
            continue;
        }
        let full_name = if namespace.is_empty() {
            name.clone()
        } else {
            format!("{namespace}.{name}")
        };
        let subject = avro.subject(&kafka.topic, &full_name);
        let writer = match avro.pinned_version() {
            Some(version) => PlanAvroWriter::Version { version },
            None => match schema_for_output(&sink.schema, &namespace, &name) {
                Ok(derived) => PlanAvroWriter::Register {
                    schema: derived.text,
                },
                Err(e) => {
                    errors.push(AvroPlanError::Schema {
                        path: format!("spec.sinks[{i}].kafka"),
                        message: format!(
                            "sink {:?}: the output contract makes no Avro schema: {e}",
                            sink.name
                        ),
                    });
                    continue;
                }
            },
        };
        sink.avro = Some(PlanAvroSink {
            registry_url: registry.url.clone(),
            subject,
            writer,
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// What the registry says of one Avro sink's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkVerdict {
    pub sink: String,
    pub subject: String,
    /// Why the schema may not be written, quoting the registry; `None` when it may.
    pub refusal: Option<String>,
}

/// Asks the registry about each Avro sink of a completed plan, values and
/// keys: a derived schema must be allowed by the subject's compatibility rule
/// (or, without `autoRegister`, be registered already: the sink then writes
/// with that version); a pinned version must exist and be able to take the
/// output contract. Registry outages are returned as errors, not verdicts.
pub async fn check_sinks(
    registry: &Registry,
    plan: &mut Plan,
) -> Result<Vec<SinkVerdict>, RegistryError> {
    let mut verdicts = Vec::new();
    for sink in &mut plan.sinks {
        let auto_register = sink
            .spec
            .kafka
            .as_ref()
            .and_then(|k| k.avro.as_ref())
            .is_none_or(|a| a.auto_register);
        let parts = [
            (
                sink.avro.as_mut(),
                "the schema derived from the output contract",
            ),
            (
                sink.avro_key.as_mut(),
                "the key schema derived from the key fields",
            ),
        ];
        for (avro, derived) in parts {
            let Some(avro) = avro else {
                continue;
            };
            let refusal =
                writer_refusal(registry, avro, auto_register, derived, &sink.schema).await?;
            verdicts.push(SinkVerdict {
                sink: sink.name.clone(),
                subject: avro.subject.clone(),
                refusal,
            });
        }
    }
    Ok(verdicts)
}

/// Why the registry will not let a sink write with `avro`'s schema (`derived`
/// says what the schema is, for the message), or `None` when it will.
async fn writer_refusal(
    registry: &Registry,
    avro: &mut PlanAvroSink,
    auto_register: bool,
    derived: &str,
    contract: &keystone_crds::schema::SchemaSpec,
) -> Result<Option<String>, RegistryError> {
    Ok(match &avro.writer {
        PlanAvroWriter::Register { schema } if auto_register => {
            let verdict = registry.compatibility(&avro.subject, schema).await?;
            (!verdict.compatible).then(|| {
                format!(
                    "{derived} is incompatible with subject {} ({})",
                    avro.subject,
                    verdict.messages.join("; ")
                )
            })
        }
        PlanAvroWriter::Register { schema } => {
            match registry.lookup(&avro.subject, schema).await? {
                Some(version) => {
                    avro.writer = PlanAvroWriter::Version { version };
                    None
                }
                None => Some(format!(
                    "autoRegister is false and {derived} is not registered under subject {}: register it there (its text: {schema})",
                    avro.subject
                )),
            }
        }
        PlanAvroWriter::Version { version } => {
            match registry.version(&avro.subject, *version).await {
                Err(RegistryError::NotFound { message, .. }) => Some(format!(
                    "subject {} has no version {version}: {message}",
                    avro.subject
                )),
                other => derived_fit(contract, &other?.schema, *version),
            }
        }
    })
}

/// Why events of the sink's output contract cannot be written with `pinned`:
/// the schema derived from the contract must be readable as it.
fn derived_fit(
    contract: &keystone_crds::schema::SchemaSpec,
    pinned: &Schema,
    version: u32,
) -> Option<String> {
    let Schema::Record(record) = pinned else {
        return Some(format!("version {version} is not a record schema"));
    };
    let namespace = record.name.namespace.clone().unwrap_or_default();
    let derived = match schema_for_output(contract, &namespace, &record.name.name) {
        Ok(derived) => derived,
        Err(e) => return Some(format!("the output contract makes no Avro schema: {e}")),
    };
    crate::can_read(&derived.schema, pinned)
        .err()
        .map(|reason| {
            format!("version {version} cannot take the output contract's events: {reason}")
        })
}

#[cfg(test)]
mod tests {
    use keystone_crds::{compile, parse_manifests};

    use super::*;

    const MANIFEST: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: clicks-v2, namespace: web}
spec:
  source:
    topic: clicks
    format: avro
    avro: {subjectStrategy: TopicRecordName, recordName: web.Click}
    schema: {fields: [{name: id, type: integer}]}
  sinks:
    - name: derived
      kafka: {topic: out, format: avro}
    - name: named
      kafka: {topic: named, format: avro, avro: {recordName: shop.Clean, subjectStrategy: RecordName}}
    - name: pinned
      kafka: {topic: pinned, format: avro, avro: {version: 4}}
    - name: plain
      kafka: {topic: plain}
    - name: keyed
      kafka: {topic: keyed, key: [id], keyFormat: avro}
"#;

    const READER: &str = r#"{"type": "record", "name": "Click", "namespace": "web", "fields": [
      {"name": "id", "type": "long"}, {"name": "note", "type": ["null", "string"], "default": null}]}"#;

    #[test]
    fn the_plan_gets_the_reader_and_each_avro_sinks_writer() {
        let manifests = parse_manifests("p.yaml", MANIFEST).expect("manifest");
        let pipeline = &manifests.pipelines[0];
        assert!(uses_avro(pipeline));
        let reader =
            reader_from_text(pipeline, READER, 2, "file click.avsc".into()).expect("reader");
        assert_eq!(reader.registered.subject, "clicks-web.Click");
        assert_eq!(reader.registered.contract.fields.len(), 2);
        let mut plan = keystone_crds::compile_with_facts(
            pipeline,
            &[],
            &keystone_crds::SourceFacts {
                table: None,
                registered: Some(&reader.registered),
            },
        )
        .expect("valid");
        let registry = SchemaRegistrySpec {
            url: "http://registry:8081".into(),
            credentials_secret: None,
            ca_secret: None,
        };
        complete_plan(&mut plan, &registry, Some(&reader)).expect("complete");
        let source = plan.source.avro.as_ref().expect("source");
        assert_eq!(
            (source.subject.as_str(), source.version),
            ("clicks-web.Click", 2)
        );
        assert_eq!(
            source.reader_schema, READER,
            "the text as registered, defaults kept"
        );
        assert_eq!(plan.schema_registry.as_ref(), Some(&registry));

        let writer_of = |name: &str| {
            let sink = plan.sinks.iter().find(|s| s.name == name).expect("sink");
            sink.avro
                .as_ref()
                .map(|a| (a.subject.clone(), a.writer.clone()))
        };
        let (subject, writer) = writer_of("derived").expect("derived");
        assert_eq!(subject, "out-value");
        let PlanAvroWriter::Register { schema } = writer else {
            panic!("derived from the contract: {writer:?}")
        };
        let parsed = Schema::parse_str(&schema).expect("a schema");
        assert_eq!(
            parsed.name().map(|n| n.fullname(None)),
            Some("dev.keystone.web.clicks_v2".to_owned())
        );
        let (subject, _) = writer_of("named").expect("named");
        assert_eq!(subject, "shop.Clean", "RecordName: the record's full name");
        assert_eq!(
            writer_of("pinned"),
            Some((
                "pinned-value".into(),
                PlanAvroWriter::Version { version: 4 }
            ))
        );
        assert_eq!(writer_of("plain"), None, "a JSON sink stays JSON");
        let key_of = |name: &str| {
            let sink = plan.sinks.iter().find(|s| s.name == name).expect("sink");
            sink.avro_key
                .as_ref()
                .map(|a| (a.subject.clone(), a.writer.clone()))
        };
        assert_eq!(
            key_of("keyed"),
            Some((
                "keyed-key".into(),
                PlanAvroWriter::Register {
                    schema: r#""long""#.into()
                }
            )),
            "the key field's type, under <topic>-key"
        );
        assert_eq!(writer_of("keyed"), None, "its values stay JSON");
        assert_eq!(key_of("derived"), None, "JSON keys unless keyFormat: avro");
    }

    #[test]
    fn a_reader_that_is_no_contract_is_refused_naming_its_origin() {
        let manifests = parse_manifests("p.yaml", MANIFEST).expect("manifest");
        let error = reader_from_text(
            &manifests.pipelines[0],
            r#""string""#,
            1,
            "file s.avsc".into(),
        )
        .expect_err("not a record");
        let message = error.to_string();
        assert!(
            message.contains("the Avro schema clicks-web.Click version 1 (from file s.avsc)")
                && message.contains("not a record"),
            "{message}"
        );
        let _ = compile(&manifests.pipelines[0], &[]).expect("valid without the reader");
    }

    #[test]
    fn an_inline_reader_schema_needs_no_registry_and_is_named_by_its_field() {
        let inline = MANIFEST.replace(
            "    avro: {subjectStrategy: TopicRecordName, recordName: web.Click}\n",
            &format!(
                "    avro: {{subjectStrategy: TopicRecordName, recordName: web.Click, schema: {}}}\n",
                serde_json::to_string(&READER.replace('\n', " ")).expect("quoted")
            ),
        );
        let manifests = parse_manifests("p.yaml", &inline).expect("manifest");
        let reader = reader_inline(&manifests.pipelines[0])
            .expect("an inline schema")
            .expect("a contract");
        assert_eq!(reader.registered.version, INLINE_VERSION);
        assert_eq!(
            reader.registered.describe(),
            "the Avro schema of spec.source.avro.schema"
        );
        assert_eq!(reader.registered.contract.fields.len(), 2);
        let without = parse_manifests("p.yaml", MANIFEST).expect("manifest");
        assert!(reader_inline(&without.pipelines[0]).is_none());

        let broken = MANIFEST.replace(
            "    avro: {subjectStrategy: TopicRecordName, recordName: web.Click}\n",
            "    avro: {schema: '\"string\"'}\n",
        );
        let manifests = parse_manifests("p.yaml", &broken).expect("manifest");
        let error = reader_inline(&manifests.pipelines[0])
            .expect("an inline schema")
            .expect_err("not a record");
        let AvroPlanError::Schema { path, message } = &error else {
            panic!("{error}")
        };
        assert_eq!(path, "spec.source.avro.schema");
        assert!(
            message.starts_with("the Avro schema of spec.source.avro.schema: ")
                && message.contains("not a record"),
            "{message}"
        );
    }
}
