//! `format: avro`: the source schema is the registered schema's contract,
//! which the operator (or `check`) reads from the registry or a file and
//! hands to the checker; declared fields are checked against it.

use super::{Checker, ErrorKind};
use crate::pipeline::Format;
use crate::schema::{FieldSpec, SchemaSpec};

/// The version a reader schema written in the manifest
/// (`spec.source.avro.schema`) is given: registries number theirs from 1.
pub const INLINE_VERSION: u32 = 0;

/// Where a reader schema written in the manifest is.
pub const INLINE_SCHEMA_PATH: &str = "spec.source.avro.schema";

/// The schema an Avro source is read with, as a contract, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisteredSource {
    pub subject: String,
    pub version: u32,
    /// The reader schema's fields, as `keystone_avro::contract::contract_of` maps them.
    pub contract: SchemaSpec,
    /// Where the schema was read, for messages: `the registry at URL` or `file F`.
    pub origin: String,
}

impl RegisteredSource {
    /// How messages name the schema, e.g. `the Avro schema orders-value
    /// version 3 (from the registry at http://...)`.
    pub fn describe(&self) -> String {
        if self.version == INLINE_VERSION {
            return format!("the Avro schema of {}", self.origin);
        }
        format!(
            "the Avro schema {} version {} (from {})",
            self.subject, self.version, self.origin
        )
    }
}

impl Checker<'_> {
    pub(super) fn avro_source(&self) -> Option<&RegisteredSource> {
        (self.pipeline.spec.source.format == Format::Avro)
            .then_some(self.registered_source)
            .flatten()
    }

    /// The source schema of an Avro source: the registered schema's fields,
    /// closed (a step reading a field producers do not send is refused).
    /// Declared fields are checked against it by [`Checker::check_avro_source`].
    pub(super) fn avro_source_schema(&self, registered: &RegisteredSource) -> SchemaSpec {
        let mut schema = registered.contract.clone();
        schema.open = false;
        schema
    }

    /// An Avro source is a topic other applications write: a capture or an
    /// ingest endpoint writes JSON. Declared fields must be the registered
    /// schema's, with its types.
    pub(super) fn check_avro_source(&mut self) {
        let source = &self.pipeline.spec.source;
        if source.format != Format::Avro {
            if source.avro.is_some() {
                self.error(
                    ErrorKind::InvalidOperator,
                    "spec.source.avro",
                    None,
                    "avro is read only with format: avro",
                );
            }
            return;
        }
        for (field, writer) in [
            ("postgres", source.postgres.is_some()),
            ("http", source.http.is_some()),
        ] {
            if writer {
                self.error(
                    ErrorKind::InvalidOperator,
                    "spec.source.format",
                    None,
                    format!(
                        "format: avro reads a topic that producers write with a schema registry; the {field} source writes JSON events, so leave format unset"
                    ),
                );
            }
        }
        let Some(registered) = self.registered_source else {
            return;
        };
        let declared: Vec<(usize, FieldSpec)> =
            source.schema.fields.iter().cloned().enumerate().collect();
        for (i, field) in declared {
            let Some(found) = registered
                .contract
                .fields
                .iter()
                .find(|f| f.name == field.name)
            else {
                self.error(
                    ErrorKind::MissingField,
                    format!("spec.source.schema.fields[{i}]"),
                    None,
                    format!(
                        "{} is declared, but {} has no such field",
                        field.name,
                        registered.describe()
                    ),
                );
                continue;
            };
            if !found.field_type.satisfies(field.field_type) {
                self.error(
                    ErrorKind::WrongType,
                    format!("spec.source.schema.fields[{i}]"),
                    None,
                    format!(
                        "{} is declared {}, but {} has it as {}",
                        field.name,
                        field.field_type,
                        registered.describe(),
                        found.field_type
                    ),
                );
            } else if found.optional && !field.optional {
                self.error(
                    ErrorKind::OptionalField,
                    format!("spec.source.schema.fields[{i}]"),
                    None,
                    format!(
                        "{} is declared required, but {} has it optional (a union with null): declare it optional",
                        field.name,
                        registered.describe()
                    ),
                );
            }
        }
    }

    /// Said after a missing field's message when the field was never in an
    /// Avro source's schema, so that the user knows which schema was checked.
    pub(super) fn source_origin_note(&self) -> String {
        self.avro_source()
            .map(|r| format!("; the source schema is {}", r.describe()))
            .unwrap_or_default()
    }
}
