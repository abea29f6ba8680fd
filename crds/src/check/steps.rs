//! One step's part of the contract: the operator it runs, the fields it needs
//! from the stream that reaches it, and the stream that leaves it.

use std::collections::{BTreeMap, BTreeSet};

use super::contracts::{check_processor, derived_state_key, operator_count_message};
use super::expressions::EVENT_VARIABLE;
use super::typing::Usage;
use super::{Checker, ErrorKind, Requirement, StepContract, StreamState, key_set, show_key};
use crate::ops::{Operator, OperatorSpec};
use crate::pipeline::StepSpec;
use crate::processor::{ContractSpec, Processor, SchemaEffect, SchemaEffectSpec};
use crate::schema::{FieldInfo, FieldType, Schema, pointer_to_path};

impl<'a> Checker<'a> {
    /// The operator a step runs and the Processor it comes from.
    pub(super) fn resolve_step<'s>(
        &mut self,
        step: &'s StepSpec,
        path: &str,
    ) -> Option<(&'s OperatorSpec, Option<&'s Processor>)>
    where
        'a: 's,
    {
        let inline = step.operator.configured();
        match (&step.processor_ref, inline.len()) {
            (Some(reference), 0) => match self.processors.get(reference.name.as_str()).copied() {
                Some(processor) => {
                    if processor.spec.operator.single().is_none() {
                        self.error(
                            ErrorKind::InvalidOperator,
                            format!("{path}.processorRef"),
                            Some(&step.name),
                            format!(
                                "Processor {:?}: {}",
                                reference.name,
                                operator_count_message(&processor.spec.operator, false)
                            ),
                        );
                        return None;
                    }
                    if let Err(errors) = check_processor(processor) {
                        for error in errors.0 {
                            self.error(
                                ErrorKind::InvalidProcessorContract,
                                format!("{path}.processorRef"),
                                Some(&step.name),
                                format!("Processor {:?}: {}", reference.name, error.message),
                            );
                        }
                    }
                    Some((&processor.spec.operator, Some(processor)))
                }
                None => {
                    let known: Vec<&str> = self.processors.keys().copied().collect();
                    let known = if known.is_empty() {
                        "no Processors were given".to_owned()
                    } else {
                        format!("known Processors: {}", known.join(", "))
                    };
                    self.error(
                        ErrorKind::UnknownProcessor,
                        format!("{path}.processorRef"),
                        Some(&step.name),
                        format!(
                            "Processor {:?} not found in namespace {:?} ({known})",
                            reference.name, self.namespace
                        ),
                    );
                    None
                }
            },
            (None, 1) => Some((&step.operator, None)),
            (has_ref, _) => {
                self.error(
                    ErrorKind::InvalidOperator,
                    path,
                    Some(&step.name),
                    operator_count_message(&step.operator, has_ref.is_some()),
                );
                None
            }
        }
    }

    pub(super) fn step_contract(
        &mut self,
        step: &StepSpec,
        op: Operator<'_>,
        declared: Option<&ContractSpec>,
        stream: &StreamState,
        path: &str,
    ) -> StepContract {
        let mut requires = Vec::new();
        let mut need = |field: &str, field_type: FieldType, purpose: String| {
            requires.push(Requirement {
                field: field.to_owned(),
                field_type,
                purpose,
            });
        };
        match op {
            Operator::Filter(f) => {
                self.expression_requirements(
                    &f.expression,
                    stream,
                    Usage::Condition {
                        subject: "the filter expression",
                        need: "a filter needs a bool",
                        example: "== \"x\"",
                    },
                    &format!("{path}.filter.expression"),
                    &step.name,
                    &mut need,
                );
            }
            Operator::Map(m) => {
                for (i, field) in m.fields.iter().enumerate() {
                    self.expression_requirements(
                        &field.expression,
                        stream,
                        Usage::MapField {
                            name: &field.name,
                            declared: field.field_type,
                        },
                        &format!("{path}.map.fields[{i}].expression"),
                        &step.name,
                        &mut need,
                    );
                }
            }
            Operator::Project(p) | Operator::Extract(p) => {
                let which = if matches!(op, Operator::Project(_)) {
                    "project"
                } else {
                    "extract"
                };
                for (i, field) in p.fields.iter().enumerate() {
                    match pointer_to_path(&field.from) {
                        Some(source_path) if !field.optional => {
                            need(&source_path, FieldType::Any, format!("the source of output field {:?}", field.name))
                        }
                        Some(_) => {}
                        None => self.error(
                            ErrorKind::InvalidOperator,
                            format!("{path}.{which}.fields[{i}].from"),
                            Some(&step.name),
                            format!("{:?} is not a JSON pointer: it must start with '/' (for example /payload/id)", field.from),
                        ),
                    }
                }
            }
            Operator::Dedup(d) => {
                for key in &d.key {
                    need(key, FieldType::Any, "the dedup key".to_owned());
                }
                if let Some(time_field) = &d.event_time_field {
                    match stream.schema.get(time_field) {
                        Some(info) if !matches!(info.field_type, FieldType::Timestamp | FieldType::Integer) => self.error(
                            ErrorKind::WrongType,
                            format!("{path}.dedup.eventTimeField"),
                            Some(&step.name),
                            format!(
                                "field {time_field:?} is the event-time field and must be a timestamp or integer (epoch milliseconds), but it is {}",
                                info.field_type
                            ),
                        ),
                        _ => need(time_field, FieldType::Any, "the event-time field".to_owned()),
                    }
                }
            }
            Operator::Order(o) => {
                for key in &o.key {
                    need(key, FieldType::Any, "the order key".to_owned());
                }
                match stream.schema.get(&o.sequence) {
                    Some(info) if info.field_type != FieldType::Integer => self.error(
                        ErrorKind::WrongType,
                        format!("{path}.order.sequence"),
                        Some(&step.name),
                        format!(
                            "sequence field {:?} must be an integer so events can be ordered by it, but it is {}",
                            o.sequence, info.field_type
                        ),
                    ),
                    _ => need(&o.sequence, FieldType::Integer, "the order sequence".to_owned()),
                }
            }
            Operator::Join(j) => self.lookup_requirements(
                &j.table,
                &j.lookup_key,
                &j.fields,
                stream,
                &format!("{path}.join"),
                &step.name,
                &mut need,
            ),
            Operator::Enrich(e) => self.lookup_requirements(
                &e.table,
                &e.lookup_key,
                &e.fields,
                stream,
                &format!("{path}.enrich"),
                &step.name,
                &mut need,
            ),
            Operator::Rekey(r) => {
                for key in &r.key {
                    need(key, FieldType::Any, "the new key".to_owned());
                }
            }
        }
        let mut requires_order_by = None;
        if let Some(contract) = declared {
            for required in &contract.requires {
                need(
                    &required.name,
                    required.field_type,
                    "the processor's contract".to_owned(),
                );
            }
            if let Some(keys) = &contract.keys
                && !keys.requires_order_by.is_empty()
            {
                requires_order_by = Some(keys.requires_order_by.clone());
            }
        }
        StepContract {
            requires,
            state_key: derived_state_key(op),
            requires_order_by,
        }
    }

    /// Checks an expression against the stream that reaches the step (see
    /// [`Checker::check_expression`]) and requires the fields it reads.
    #[allow(clippy::too_many_arguments)]
    fn expression_requirements(
        &mut self,
        expression: &str,
        stream: &StreamState,
        usage: Usage<'_>,
        path: &str,
        step: &str,
        need: &mut impl FnMut(&str, FieldType, String),
    ) {
        let Some(variables) = self.check_expression(expression, &stream.schema, usage, path, step)
        else {
            return;
        };
        for variable in variables {
            if variable == EVENT_VARIABLE && stream.schema.get(EVENT_VARIABLE).is_none() {
                continue;
            }
            need(&variable, FieldType::Any, "the expression".to_owned());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn lookup_requirements(
        &mut self,
        table: &crate::ops::TableSpec,
        on: &[String],
        fields: &[String],
        stream: &StreamState,
        path: &str,
        step: &str,
        need: &mut impl FnMut(&str, FieldType, String),
    ) {
        let table_schema = Schema::from_spec(&table.schema);
        if on.len() != table.key.len() {
            self.error(
                ErrorKind::InvalidOperator,
                format!("{path}.lookupKey"),
                Some(step),
                format!(
                    "the join matches {} event field(s) {} against table {:?}, whose key has {} field(s) {}",
                    on.len(),
                    show_key(on),
                    table.name,
                    table.key.len(),
                    show_key(&table.key)
                ),
            );
        }
        for (i, key) in table.key.iter().enumerate() {
            let Some(key_info) = table_schema.get(key) else {
                self.error(
                    ErrorKind::MissingField,
                    format!("{path}.table.key[{i}]"),
                    Some(step),
                    format!(
                        "table key field {key:?} is not in the table schema ({})",
                        table_schema.describe()
                    ),
                );
                continue;
            };
            if let Some(event_field) = on.get(i) {
                match stream.schema.get(event_field) {
                    Some(info) if !info.field_type.satisfies(key_info.field_type) && key_info.field_type != FieldType::Any => {
                        self.error(
                            ErrorKind::WrongType,
                            format!("{path}.lookupKey[{i}]"),
                            Some(step),
                            format!(
                                "event field {event_field:?} is {} but is matched against table key {key:?}, which is {}",
                                info.field_type, key_info.field_type
                            ),
                        )
                    }
                    _ => need(event_field, FieldType::Any, format!("the join key matched against table {:?}", table.name)),
                }
            }
        }
        for (i, field) in fields.iter().enumerate() {
            if table_schema.get(field).is_none() {
                self.error(
                    ErrorKind::MissingField,
                    format!("{path}.fields[{i}]"),
                    Some(step),
                    format!(
                        "table {:?} has no field {field:?} ({})",
                        table.name,
                        table_schema.describe()
                    ),
                );
            }
        }
    }

    pub(super) fn check_requirements(
        &mut self,
        contract: &StepContract,
        stream: &StreamState,
        path: &str,
        step: &str,
    ) {
        // One error per missing field, even when several parts of the step need it.
        let mut reported = BTreeSet::new();
        for requirement in &contract.requires {
            match stream.schema.get(&requirement.field) {
                None if !reported.insert(requirement.field.as_str()) => {}
                None => {
                    let hint = if let Some(by) = &stream.rekeyed_by {
                        format!(" (the stream was last re-keyed by step {by:?})")
                    } else {
                        String::new()
                    };
                    self.error(
                        ErrorKind::MissingField,
                        path,
                        Some(step),
                        format!(
                            "needs field {:?} ({}) for {}, but it does not reach this step{hint}; available: {}",
                            requirement.field,
                            requirement.field_type,
                            requirement.purpose,
                            stream.schema.describe()
                        ),
                    );
                }
                Some(info) if !info.field_type.satisfies(requirement.field_type) => {
                    self.error(
                        ErrorKind::WrongType,
                        path,
                        Some(step),
                        format!(
                            "needs field {:?} to be {} for {}, but it arrives as {}",
                            requirement.field,
                            requirement.field_type,
                            requirement.purpose,
                            info.field_type
                        ),
                    );
                }
                Some(_) => {}
            }
        }
    }

    /// The stream after a step.
    pub(super) fn apply_step(
        &mut self,
        mut stream: StreamState,
        op: Operator<'_>,
        declared: Option<&ContractSpec>,
        step: &str,
    ) -> StreamState {
        match op {
            Operator::Filter(_) | Operator::Dedup(_) => {}
            Operator::Order(o) => {
                // The order step emits each key's events in sequence order.
                stream.ordered_by = Some(key_set(&o.key));
            }
            Operator::Map(m) => {
                for field in &m.fields {
                    stream.schema.insert(
                        &field.name,
                        FieldInfo {
                            field_type: field.field_type,
                            optional: false,
                        },
                    );
                }
            }
            Operator::Project(p) | Operator::Extract(p) => {
                let mut out = if matches!(op, Operator::Project(_)) {
                    Schema {
                        fields: BTreeMap::new(),
                        open: false,
                    }
                } else {
                    stream.schema.clone()
                };
                for field in &p.fields {
                    let Some(source_path) = pointer_to_path(&field.from) else {
                        continue;
                    };
                    let info = stream.schema.get(&source_path).unwrap_or(FieldInfo {
                        field_type: FieldType::Any,
                        optional: true,
                    });
                    out.insert(
                        &field.name,
                        FieldInfo {
                            field_type: info.field_type,
                            optional: info.optional || field.optional,
                        },
                    );
                    for (nested, nested_info) in stream.schema.nested(&source_path) {
                        out.insert(&format!("{}.{nested}", field.name), nested_info);
                    }
                }
                if matches!(op, Operator::Project(_)) {
                    // Key fields that the projection dropped can no longer key the output.
                    stream.key.retain(|k| out.get(k).is_some());
                }
                stream.schema = out;
            }
            Operator::Join(j) => {
                let optional = j.kind == crate::ops::JoinKind::Left;
                add_table_fields(
                    &mut stream.schema,
                    &j.table,
                    &j.fields,
                    j.into.as_deref(),
                    optional,
                );
            }
            Operator::Enrich(e) => {
                add_table_fields(&mut stream.schema, &e.table, &e.fields, Some(&e.into), true)
            }
            Operator::Rekey(r) => {
                stream.key = r.key.clone();
                stream.rekeyed_by = Some(step.to_owned());
            }
        }
        // A Processor's declared schema effect refines what the operator alone tells
        // (for example the types of computed fields).
        if let Some(SchemaEffectSpec { effect, fields }) = declared.and_then(|c| c.schema.as_ref())
        {
            match effect {
                SchemaEffect::Passthrough => {}
                SchemaEffect::Adds => {
                    for field in fields {
                        stream.schema.insert(
                            &field.name,
                            FieldInfo {
                                field_type: field.field_type,
                                optional: field.optional,
                            },
                        );
                    }
                }
                SchemaEffect::Removes => {
                    for field in fields {
                        stream.schema.remove(&field.name);
                    }
                }
                SchemaEffect::Replaces => {
                    let mut replaced = crate::schema::SchemaSpec {
                        fields: fields.clone(),
                        open: false,
                    };
                    replaced.open = false;
                    stream.schema = Schema::from_spec(&replaced);
                }
            }
        }
        stream
    }
}

fn add_table_fields(
    schema: &mut Schema,
    table: &crate::ops::TableSpec,
    fields: &[String],
    into: Option<&str>,
    optional: bool,
) {
    let table_schema = Schema::from_spec(&table.schema);
    let chosen: Vec<(String, FieldInfo)> = table_schema
        .fields
        .iter()
        .filter(|(name, _)| {
            if fields.is_empty() {
                !table.key.contains(name)
            } else {
                fields
                    .iter()
                    .any(|f| f == *name || name.starts_with(&format!("{f}.")))
            }
        })
        .map(|(name, info)| (name.clone(), *info))
        .collect();
    for (name, info) in chosen {
        let path = match into {
            Some(into) => format!("{into}.{name}"),
            None => name,
        };
        schema.insert(
            &path,
            FieldInfo {
                field_type: info.field_type,
                optional: info.optional || optional,
            },
        );
    }
}
