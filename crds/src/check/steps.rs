//! One step's part of the contract: the operator it runs, the fields it needs
//! from the stream that reaches it, and the stream that leaves it.

use std::collections::BTreeSet;

use super::contracts::{check_processor, derived_state_key, operator_count_message};
use super::expressions::EVENT_VARIABLE;
use super::typing::Usage;
use super::{
    Checker, ErrorKind, Removal, Requirement, StepContract, StreamState, key_set, show_key,
};
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
                    // A Processor's own errors are the same wherever it is used:
                    // reported once, at the first step that references it.
                    let first_use = self.processors_reported.insert(reference.name.clone());
                    if first_use && let Err(errors) = check_processor(processor) {
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
                        Ok(source_path) if !field.optional => need(
                            &source_path,
                            FieldType::Any,
                            format!("the source of output field {:?}", field.name),
                        ),
                        Ok(_) => {}
                        Err(problem) => self.error(
                            ErrorKind::InvalidOperator,
                            format!("{path}.{which}.fields[{i}].from"),
                            Some(&step.name),
                            problem,
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
        self.require_source_cluster(
            table.cluster.as_deref(),
            &format!("{path}.table.cluster"),
            step,
            "table",
        );
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
                    let field = requirement.field.as_str();
                    // The field itself or the object it was nested in may have been removed.
                    let removal = std::iter::once(field)
                        .chain(field.match_indices('.').map(|(i, _)| &field[..i]).rev())
                        .find_map(|p| stream.removed_by.get(p));
                    let cause = removal.map_or_else(String::new, |r| r.by.clone());
                    if let Some((_, also)) = self
                        .missing_reported
                        .get_mut(&(field.to_owned(), cause.clone()))
                    {
                        if !also.iter().any(|s| s == step) {
                            also.push(step.to_owned());
                        }
                        continue;
                    }
                    let message = match removal {
                        Some(removal) => format!(
                            "needs field {field:?} ({}) for {}, but {} removed it: {}, or move this step before that one",
                            requirement.field_type, requirement.purpose, removal.by, removal.remedy
                        ),
                        None => format!(
                            "needs field {field:?} ({}) for {}, but it does not reach this step; available: {}{}",
                            requirement.field_type,
                            requirement.purpose,
                            stream.schema.describe(),
                            self.source_origin_note()
                        ),
                    };
                    self.missing_reported
                        .insert((field.to_owned(), cause), (self.errors.len(), Vec::new()));
                    self.error(ErrorKind::MissingField, path, Some(step), message);
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

    /// The stream after a step: exactly the fields the runtime's operator leaves
    /// in the events (see runtime/src/ops and `with_writes` there), then the
    /// Processor's declared effect.
    pub(super) fn apply_step(
        &mut self,
        mut stream: StreamState,
        op: Operator<'_>,
        declared: Option<&ContractSpec>,
        step: &StepSpec,
        path: &str,
    ) -> StreamState {
        let before = stream.schema.clone();
        match op {
            Operator::Filter(_) | Operator::Dedup(_) => {}
            Operator::Order(o) => {
                // The order step emits each key's events in sequence order.
                stream.ordered_by = Some(key_set(&o.key));
            }
            Operator::Map(m) => {
                // Every value is computed from the input event, then written in
                // order: a whole-field write replaces what was under it.
                for field in &m.fields {
                    stream.schema.write(
                        &field.name,
                        FieldInfo {
                            field_type: field.field_type,
                            optional: false,
                        },
                        &[],
                    );
                }
            }
            Operator::Project(p) | Operator::Extract(p) => {
                let mut out = if matches!(op, Operator::Project(_)) {
                    Schema::default()
                } else {
                    stream.schema.clone()
                };
                // Every pointer reads the input event, so sources come from `stream`.
                for field in &p.fields {
                    let Ok(source_path) = pointer_to_path(&field.from) else {
                        continue;
                    };
                    let info = stream.schema.get(&source_path).unwrap_or(FieldInfo {
                        field_type: FieldType::Any,
                        optional: true,
                    });
                    // The copied value carries whatever was nested under its source.
                    let children = stream.schema.nested(&source_path);
                    // A copy means what its source meant; a value that may be
                    // either the old or the copied one keeps no description.
                    let descriptions = stream.schema.descriptions_under(&source_path);
                    if field.optional {
                        // A missing source leaves the output field as it was.
                        let fresh = out.get(&field.name).is_none();
                        write_conditionally(&mut out, &field.name, info.field_type, &children);
                        if fresh {
                            out.describe_under(&field.name, descriptions);
                        }
                    } else {
                        // A missing source sends the event to the dead letters, so
                        // every event that leaves has the field.
                        out.write(
                            &field.name,
                            FieldInfo {
                                field_type: info.field_type,
                                optional: false,
                            },
                            &children,
                        );
                        out.describe_under(&field.name, descriptions);
                    }
                }
                if matches!(op, Operator::Project(_)) {
                    // Key fields that the projection dropped can no longer key the output.
                    stream.key.retain(|k| out.get(k).is_some());
                }
                stream.schema = out;
            }
            Operator::Join(j) => {
                let conditional = j.kind == crate::ops::JoinKind::Left;
                if let Some(into) = &j.into {
                    self.check_into(
                        &stream.schema,
                        into,
                        &j.table.name,
                        step,
                        &format!("{path}.join.into"),
                    );
                }
                add_table_fields(
                    &mut stream.schema,
                    &j.table,
                    &j.fields,
                    j.into.as_deref(),
                    conditional,
                );
            }
            Operator::Enrich(e) => {
                self.check_into(
                    &stream.schema,
                    &e.into,
                    &e.table.name,
                    step,
                    &format!("{path}.enrich.into"),
                );
                add_table_fields(&mut stream.schema, &e.table, &e.fields, Some(&e.into), true)
            }
            Operator::Rekey(r) => {
                stream.key = r.key.clone();
                stream.rekeyed_by = Some(step.name.clone());
            }
        }
        // The fix is in the Processor when the operator comes from one.
        let (by, owner) = match &step.processor_ref {
            Some(r) => (
                format!(
                    "step {:?} (Processor {:?}, {})",
                    step.name,
                    r.name,
                    op.kind()
                ),
                format!("Processor {:?}", r.name),
            ),
            None => (
                format!("step {:?} ({})", step.name, op.kind()),
                "that step".to_owned(),
            ),
        };
        let remedy = match op {
            Operator::Project(_) => format!("keep it in the fields of {owner}"),
            Operator::Map(_) | Operator::Extract(_) => {
                format!("give the output field of {owner} another name")
            }
            _ => format!("set an into on {owner} so the table's fields do not replace it"),
        };
        record_removals(&mut stream, &before, &by, &remedy);

        // A Processor's declared schema effect refines what the operator alone tells
        // (for example the types of computed fields).
        if let Some(SchemaEffectSpec { effect, fields }) = declared.and_then(|c| c.schema.as_ref())
        {
            let before = stream.schema.clone();
            let processor = step.processor_ref.as_ref().map_or("", |r| r.name.as_str());
            let by = format!(
                "step {:?} (Processor {processor:?}, schema effect {effect:?})",
                step.name
            );
            match effect {
                SchemaEffect::Passthrough => {}
                SchemaEffect::Adds => {
                    for field in fields {
                        stream.schema.write(
                            &field.name,
                            FieldInfo {
                                field_type: field.field_type,
                                optional: field.optional,
                            },
                            &[],
                        );
                        if let Some(description) = &field.description {
                            stream
                                .schema
                                .descriptions
                                .insert(field.name.clone(), description.clone());
                        }
                    }
                }
                SchemaEffect::Removes => {
                    for field in fields {
                        stream.schema.remove(&field.name);
                    }
                }
                SchemaEffect::Replaces => {
                    let replaced = crate::schema::SchemaSpec {
                        fields: fields.clone(),
                        open: false,
                    };
                    stream.schema = Schema::from_spec(&replaced);
                }
            }
            let remedy = match effect {
                SchemaEffect::Replaces => {
                    "add it to the fields of that Processor's Replaces effect"
                }
                _ => "take it out of the fields of that Processor's Removes effect",
            };
            record_removals(&mut stream, &before, &by, remedy);
        }
        stream
    }

    /// Refuses an `into` that would clobber a field that is not an object: the
    /// runtime replaces such a value by the object of the table's fields, so any
    /// later reader of the old value fails on every matched event.
    fn check_into(
        &mut self,
        schema: &Schema,
        into: &str,
        table: &str,
        step: &StepSpec,
        path: &str,
    ) {
        let mut prefixes: Vec<&str> = into.match_indices('.').map(|(i, _)| &into[..i]).collect();
        prefixes.push(into);
        let Some((field, info)) = prefixes.into_iter().find_map(|p| {
            schema
                .get(p)
                .filter(|i| !matches!(i.field_type, FieldType::Object | FieldType::Any))
                .map(|i| (p, i))
        }) else {
            return;
        };
        let mut suggestion = table.to_owned();
        if schema.get(&suggestion).is_some() {
            suggestion = format!("{into}_{table}");
        }
        self.error(
            ErrorKind::WrongType,
            path,
            Some(&step.name),
            format!(
                "into {into:?} writes the table's fields under field {field:?}, which is {} here: \
                 a matched event would have it replaced by an object, and every later reader of \
                 {field:?} would fail; choose an into that is not a field of the stream, for example {suggestion:?}",
                info.field_type
            ),
        );
    }
}

/// Remembers which step removed the fields that were in `before` and are gone
/// now, and forgets removals of fields the step brought back.
fn record_removals(stream: &mut StreamState, before: &Schema, by: &str, remedy: &str) {
    for name in before.fields.keys() {
        if stream.schema.get(name).is_none() {
            stream.removed_by.insert(
                name.clone(),
                Removal {
                    by: by.to_owned(),
                    remedy: remedy.to_owned(),
                },
            );
        }
    }
    let schema = &stream.schema;
    stream
        .removed_by
        .retain(|name, _| schema.get(name).is_none());
}

/// A write that some events get and others do not (a left join without a
/// match, a row or source without the value): the field is either its old value
/// or the new one, so it keeps only what both have in common.
fn write_conditionally(
    schema: &mut Schema,
    path: &str,
    field_type: FieldType,
    children: &[(String, FieldInfo)],
) {
    let optional_children: Vec<(String, FieldInfo)> = children
        .iter()
        .map(|(name, info)| {
            (
                name.clone(),
                FieldInfo {
                    field_type: info.field_type,
                    optional: true,
                },
            )
        })
        .collect();
    let Some(old) = schema.get(path) else {
        schema.write(
            path,
            FieldInfo {
                field_type,
                optional: true,
            },
            &optional_children,
        );
        return;
    };
    // The value is either one: neither's description is sure to hold.
    schema.forget_descriptions(path);
    let merged_type = if old.field_type == field_type {
        field_type
    } else {
        FieldType::Any
    };
    // Either value may be there: what was nested under the old one may be gone,
    // and what the new one brings may be missing.
    let prefix = format!("{path}.");
    let mut old_children: Vec<String> = Vec::new();
    for (name, info) in schema.fields.iter_mut() {
        if name.starts_with(&prefix) {
            info.optional = true;
            old_children.push(name.clone());
        }
    }
    schema.fields.insert(
        path.to_owned(),
        FieldInfo {
            field_type: merged_type,
            optional: old.optional,
        },
    );
    for (name, info) in optional_children {
        let full = format!("{path}.{name}");
        let merged = match schema.get(&full) {
            Some(existing) if existing.field_type != info.field_type => FieldInfo {
                field_type: FieldType::Any,
                optional: true,
            },
            _ => info,
        };
        schema.fields.insert(full, merged);
    }
}

/// The table's fields a matched event gets, under `into` or at the top level.
/// `conditional`: events without a matching row pass unchanged (left join, enrich).
fn add_table_fields(
    schema: &mut Schema,
    table: &crate::ops::TableSpec,
    fields: &[String],
    into: Option<&str>,
    conditional: bool,
) {
    let table_schema = Schema::from_spec(&table.schema);
    // Whole top-level fields except the key, or the named (dotted) fields; each
    // value carries what is nested under it.
    let roots: Vec<&String> = if fields.is_empty() {
        table_schema
            .fields
            .keys()
            .filter(|name| !name.contains('.') && !table.key.contains(name))
            .collect()
    } else {
        fields
            .iter()
            .filter(|f| table_schema.get(f).is_some())
            .collect()
    };
    if let Some(into) = into {
        // A match writes `into` as an object even when the row has nothing to copy.
        match schema.get(into) {
            // Merged into: what is already under it stays. Without a match an
            // `any` field keeps its own value, so it stays `any`.
            Some(info) if matches!(info.field_type, FieldType::Object | FieldType::Any) => {
                if !conditional {
                    schema.fields.insert(
                        into.to_owned(),
                        FieldInfo {
                            field_type: FieldType::Object,
                            optional: false,
                        },
                    );
                }
            }
            // A scalar is replaced (check_into refuses that), or the field is new.
            _ => schema.write(
                into,
                FieldInfo {
                    field_type: FieldType::Object,
                    optional: conditional,
                },
                &[],
            ),
        }
    }
    for root in roots {
        let Some(info) = table_schema.get(root) else {
            continue;
        };
        let target = match into {
            Some(into) => format!("{into}.{root}"),
            None => root.clone(),
        };
        let children = table_schema.nested(root);
        // A row without the field skips the write, like a missing match.
        if conditional || info.optional {
            write_conditionally(schema, &target, info.field_type, &children);
        } else {
            schema.write(
                &target,
                FieldInfo {
                    field_type: info.field_type,
                    optional: false,
                },
                &children,
            );
        }
    }
}
