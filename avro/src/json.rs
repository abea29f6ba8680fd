//! Avro records as Keystone's JSON events, and JSON events as Avro records.
//!
//! Reading follows the contract types of [`crate::contract`]: logical types
//! become the JSON a contract of that type holds (timestamps RFC 3339 in UTC,
//! dates and times ISO 8601, decimals the exact decimal as a string, bytes
//! base64). Writing takes what reading gives, and what a JSON event naturally
//! holds: a timestamp may also be epoch milliseconds, a decimal a number, and
//! a `string` field takes any other JSON value as its JSON text (the columns
//! that hold arrays, `any` values and objects whose members are not listed).
//!
//! Both directions work on the event as its owner holds it, with no JSON text
//! in between: reading gives a `serde_json` value or writes the JSON text
//! itself ([`Shape::write_json`], what a parser that owns its documents
//! reads), and writing reads any document model ([`Document`]).

mod read;
mod write;

use std::collections::HashMap;
use std::fmt;

use apache_avro::Schema;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value as Avro;
use serde_json::Value;

pub use write::{Document, Kind, SerdeJson};

/// What is wrong with a value, and where in the record.
#[derive(Debug, PartialEq, Eq)]
pub struct ValueError {
    /// Dotted path of the field; empty for the record itself.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "field {}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ValueError {}

/// Named types of a schema by full name, for its references.
struct Names(HashMap<String, Schema>);

impl Names {
    fn of(schema: &Schema) -> Result<Self, ValueError> {
        let resolved = ResolvedSchema::try_from(schema).map_err(|e| ValueError {
            path: String::new(),
            reason: format!("the schema's named types do not resolve: {e}"),
        })?;
        Ok(Self(
            resolved
                .get_names()
                .iter()
                .map(|(name, schema)| (name.fullname(None), (*schema).clone()))
                .collect(),
        ))
    }

    fn get(&self, name: &Name, path: &Path<'_>) -> Result<&Schema, ValueError> {
        self.0.get(&name.fullname(None)).ok_or_else(|| {
            path.error(format!(
                "the schema refers to {}, which it does not define",
                name.fullname(None)
            ))
        })
    }

    /// `schema`, or the named type it refers to.
    fn deref<'s>(&'s self, schema: &'s Schema, path: &Path<'_>) -> Result<&'s Schema, ValueError> {
        match schema {
            Schema::Ref { name } => self.get(name, path),
            other => Ok(other),
        }
    }
}

/// A schema ready to convert values with: its named types are indexed once
/// here, not for every record.
pub struct Shape {
    schema: Schema,
    names: Names,
    has_decimals: bool,
}

impl Shape {
    pub fn new(schema: Schema) -> Result<Self, ValueError> {
        let names = Names::of(&schema)?;
        let has_decimals = !crate::compat::decimals(&schema).is_empty();
        Ok(Self {
            schema,
            names,
            has_decimals,
        })
    }

    /// Whether the schema has decimals anywhere (resolution treats them).
    pub(crate) fn has_decimals(&self) -> bool {
        self.has_decimals
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The JSON event of an Avro value read with (or resolved to) this schema.
    pub fn to_json(&self, value: &Avro) -> Result<Value, ValueError> {
        let mut tree = read::Tree(Value::Null);
        read::read(value, &self.schema, &self.names, &Path::ROOT, &mut tree)?;
        Ok(tree.0)
    }

    /// Appends to `out` the JSON text of [`Shape::to_json`]'s event, byte for
    /// byte what `serde_json` writes of it (members in key order), without
    /// building it first. On error `out` holds part of it.
    pub fn write_json(&self, value: &Avro, out: &mut Vec<u8>) -> Result<(), ValueError> {
        read::read(
            value,
            &self.schema,
            &self.names,
            &Path::ROOT,
            &mut read::Text(out),
        )
    }

    /// The Avro value of a JSON event, to be written with this schema.
    pub fn from_json(&self, event: &Value) -> Result<Avro, ValueError> {
        self.from_document::<SerdeJson>(event)
    }

    /// The Avro value of an event held in the document model `D`, to be
    /// written with this schema.
    pub fn from_document<D: Document>(&self, event: &D::Value) -> Result<Avro, ValueError> {
        write::write::<D>(event, &self.schema, &self.names, &Path::ROOT)
    }
}

/// Deepest nesting of records, arrays and maps a value is converted at. The
/// walks recurse once per level; a schema parsed from text nests less (its
/// parser stops at 128 levels of JSON) and recursive schemas are refused, so
/// this only bounds the stack whatever the schema (a few kilobytes a level
/// unoptimized, within a test thread's 2 MiB).
pub const MAX_NESTING: usize = 256;

/// Where a value is in the record: a chain of steps on the stack, made into
/// the dotted path only for an error (not for every field converted).
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    step: Step<'a>,
    depth: usize,
}

#[derive(Clone, Copy)]
enum Step<'a> {
    Root,
    Field(&'a str),
    Index(usize),
}

impl<'a> Path<'a> {
    const ROOT: Path<'static> = Path {
        parent: None,
        step: Step::Root,
        depth: 0,
    };

    fn field(&'a self, name: &'a str) -> Path<'a> {
        self.below(Step::Field(name))
    }

    fn index(&'a self, index: usize) -> Path<'a> {
        self.below(Step::Index(index))
    }

    fn below(&'a self, step: Step<'a>) -> Path<'a> {
        Path {
            parent: Some(self),
            step,
            depth: self.depth + 1,
        }
    }

    /// Refuses a value nested deeper than [`MAX_NESTING`].
    fn check_depth(&self) -> Result<(), ValueError> {
        if self.depth > MAX_NESTING {
            return Err(self.error(format!(
                "nested deeper than {MAX_NESTING} levels of records, arrays and maps"
            )));
        }
        Ok(())
    }

    /// The dotted path: `a.b` for fields and map keys, `a[0]` for items.
    fn text(&self) -> String {
        let mut steps = Vec::with_capacity(self.depth);
        let mut at = Some(self);
        while let Some(path) = at {
            steps.push(path.step);
            at = path.parent;
        }
        let mut text = String::new();
        for step in steps.into_iter().rev() {
            match step {
                Step::Root => {}
                Step::Field(name) => {
                    if !text.is_empty() {
                        text.push('.');
                    }
                    text.push_str(name);
                }
                Step::Index(index) => {
                    use fmt::Write as _;
                    let _ = write!(text, "[{index}]");
                }
            }
        }
        text
    }

    fn error(&self, reason: impl Into<String>) -> ValueError {
        ValueError {
            path: self.text(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests;
