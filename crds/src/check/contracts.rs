//! A Processor's declared contract against its operator: what each operator
//! does by itself, and where a declared contract says otherwise.

use super::{ContractError, ContractErrors, ErrorKind, key_set, show_key};
use crate::ops::{Operator, OperatorSpec};
use crate::processor::{ContractSpec, KeyEffect, Processor, SchemaEffect};

/// Checks that a Processor's declared contract agrees with its operator.
pub fn check_processor(processor: &Processor) -> Result<(), ContractErrors> {
    let mut errors = Vec::new();
    let name = processor.metadata.name.clone();
    match processor.spec.operator.single() {
        None => errors.push(ContractError {
            kind: ErrorKind::InvalidOperator,
            path: "spec".to_owned(),
            subject: name,
            message: operator_count_message(&processor.spec.operator, false),
        }),
        Some(op) => {
            if let Some(contract) = &processor.spec.contract {
                for message in declared_contract_conflicts(op, contract) {
                    errors.push(ContractError {
                        kind: ErrorKind::InvalidProcessorContract,
                        path: "spec.contract".to_owned(),
                        subject: name.clone(),
                        message,
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ContractErrors(errors))
    }
}

pub(super) fn operator_count_message(spec: &OperatorSpec, has_ref: bool) -> String {
    let mut set: Vec<&str> = spec.configured().iter().map(Operator::kind).collect();
    if has_ref {
        set.insert(0, "processorRef");
    }
    if set.is_empty() {
        "no operator is set: set exactly one of processorRef, filter, map, project, extract, dedup, order, join, enrich or rekey".to_owned()
    } else {
        format!(
            "more than one operator is set ({}): a step runs exactly one",
            set.join(", ")
        )
    }
}

/// The schema effect an operator has by itself.
fn derived_schema_effect(op: Operator<'_>) -> SchemaEffect {
    match op {
        Operator::Filter(_) | Operator::Dedup(_) | Operator::Order(_) | Operator::Rekey(_) => {
            SchemaEffect::Passthrough
        }
        Operator::Map(_) | Operator::Extract(_) | Operator::Join(_) | Operator::Enrich(_) => {
            SchemaEffect::Adds
        }
        Operator::Project(_) => SchemaEffect::Replaces,
    }
}

pub(super) fn derived_state_key(op: Operator<'_>) -> Option<Vec<String>> {
    match op {
        Operator::Dedup(d) => Some(d.key.clone()),
        Operator::Order(o) => Some(o.key.clone()),
        Operator::Join(j) if !j.table.replicated => Some(j.lookup_key.clone()),
        Operator::Enrich(e) if !e.table.replicated => Some(e.lookup_key.clone()),
        _ => None,
    }
}

fn declared_contract_conflicts(op: Operator<'_>, contract: &ContractSpec) -> Vec<String> {
    let mut conflicts = Vec::new();
    if let Some(schema) = &contract.schema {
        let derived = derived_schema_effect(op);
        if schema.effect != derived {
            conflicts.push(format!(
                "the contract declares schema effect {:?}, but the {} operator {}",
                schema.effect,
                op.kind(),
                match derived {
                    SchemaEffect::Passthrough => "passes the schema through unchanged",
                    SchemaEffect::Adds => "adds fields",
                    SchemaEffect::Removes => "removes fields",
                    SchemaEffect::Replaces => "replaces the schema",
                }
            ));
        }
    }
    if let Some(keys) = &contract.keys {
        let rekeys = matches!(op, Operator::Rekey(_));
        if keys.effect == KeyEffect::Rekeys && !rekeys {
            conflicts.push(format!(
                "the contract declares that the step re-keys the stream, but the {} operator preserves the key",
                op.kind()
            ));
        }
        if keys.effect == KeyEffect::Preserves && rekeys && contract.keys.is_some() {
            conflicts.push("the contract declares that the key is preserved, but the rekey operator changes it".to_owned());
        }
        if let (KeyEffect::Rekeys, Operator::Rekey(r)) = (keys.effect, op)
            && !keys.key.is_empty()
            && keys.key != r.key
        {
            conflicts.push(format!(
                "the contract declares the new key {}, but the operator re-keys by {}",
                show_key(&keys.key),
                show_key(&r.key)
            ));
        }
    }
    if let Some(state) = &contract.state {
        match derived_state_key(op) {
            None => conflicts.push(format!(
                "the contract declares state keyed by {}, but the {} operator keeps no keyed state",
                show_key(&state.keyed_by),
                op.kind()
            )),
            Some(key) if key_set(&key) != key_set(&state.keyed_by) => conflicts.push(format!(
                "the contract declares state keyed by {}, but the operator keys its state by {}",
                show_key(&state.keyed_by),
                show_key(&key)
            )),
            Some(_) => {}
        }
    }
    conflicts
}
