//! Types of CEL expressions against the schema the checker propagated.
//!
//! The `cel` crate parses and interprets CEL but has no type checker, so this
//! module infers types over its AST, gradually: a type is the set of kinds a
//! value may have at run time, or `dyn` where the checker cannot tell. It is
//! precise where the schema is (an `integer` field is an `int`), follows the
//! interpreter the runtime runs rather than the CEL specification (arithmetic
//! never mixes `int` and `double`, comparisons do), and is permissive elsewhere:
//! callers refuse only a type that can never be what a step needs, and an
//! operator is reported only when it fails for every kind its operands can have.

use std::collections::BTreeSet;

use cel::common::ast::operators;
use cel::common::ast::{Expr, IdedExpr};

use super::expressions::{compile_bounded, free_variables};
use super::limits::{MAX_COMPREHENSION_NESTING, MAX_EVENT_BYTES, MAX_EXPRESSION_COST};
use super::{Checker, ErrorKind};
use crate::schema::{FieldType, Schema};

mod calls;
mod comprehensions;
mod cost;
mod inference;
mod kinds;
mod source;

use inference::type_of;
use kinds::{BOOL, BYTES, DURATION, INT, NUMBERS, STRING, TIMESTAMP, Type, UINT};

/// What a step does with an expression's result.
#[derive(Clone, Copy, Debug)]
pub(super) enum Usage<'u> {
    /// A condition, such as a filter's. `subject` names the expression in
    /// messages ("the filter expression"), `need` says why it must be a bool,
    /// `example` compares a string into one (`== "d"`).
    Condition {
        subject: &'u str,
        need: &'u str,
        example: &'u str,
    },
    /// The value of the map field `name`, declared of type `declared`.
    MapField { name: &'u str, declared: FieldType },
}

impl Checker<'_> {
    /// Parses and types an expression over `schema`, reporting an expression
    /// over the limits (length, nesting, cost: see [`super::limits`]) or that
    /// does not parse, parts that fail whenever evaluated, and a result that
    /// can never serve `usage`. Returns the top-level names it reads, unless it does not parse.
    pub(super) fn check_expression(
        &mut self,
        expression: &str,
        schema: &Schema,
        usage: Usage<'_>,
        path: &str,
        subject: &str,
    ) -> Option<BTreeSet<String>> {
        let program = match compile_bounded(expression) {
            Ok(program) => program,
            Err(message) => {
                self.error(ErrorKind::InvalidExpression, path, Some(subject), message);
                return None;
            }
        };
        let root = program.expression();
        let typed = type_of(root, schema);
        for failure in &typed.failures {
            self.error(
                ErrorKind::InvalidExpression,
                path,
                Some(subject),
                format!(
                    "the CEL expression fails whenever it evaluates `{}`: {}",
                    failure.at, failure.why
                ),
            );
        }
        if let Some(problem) = result_problem(expression.trim(), root, &typed.result, usage) {
            self.error(ErrorKind::WrongType, path, Some(subject), problem);
        }
        if let Some(problem) = cost_problem(&cost::estimate(root, &typed.types)) {
            self.error(ErrorKind::InvalidExpression, path, Some(subject), problem);
        }
        Some(free_variables(root))
    }
}

/// Why a result of type `result` can never serve `usage`, if it cannot;
/// `source` is the expression as written, `root` as parsed.
fn result_problem(
    source: &str,
    root: &IdedExpr,
    result: &Type,
    usage: Usage<'_>,
) -> Option<String> {
    if result.is_dynamic() || result.is_empty() {
        return None;
    }
    match usage {
        Usage::Condition {
            subject,
            need,
            example,
        } => {
            if result.may_be_bool() {
                return None;
            }
            // A conditional binds looser than the comparison the hint adds.
            let operand = match &root.expr {
                Expr::Call(call) if call.func_name == operators::CONDITIONAL => {
                    format!("({source})")
                }
                _ => source.to_owned(),
            };
            let hint = if result.is_numeric() {
                format!("compare it, for example {operand} > 0")
            } else if result.is_string() {
                format!("compare it, for example {operand} {example}")
            } else if result.is_collection() {
                format!("test its size, for example size({source}) > 0")
            } else {
                "make it a comparison or another test that is true or false".to_owned()
            };
            Some(format!(
                "{subject} is {result} ({source}), but {need}; {hint}"
            ))
        }
        Usage::MapField { name, declared } => {
            if may_be_declared(result, declared) {
                return None;
            }
            let hint = if declared == FieldType::Any {
                "durations and bytes have no JSON form; convert it with string()".to_owned()
            } else {
                let redeclare = result
                    .field_type()
                    .map(|t| format!("declare the field {t}"));
                let convert = conversion_to(declared)
                    .filter(|(_, from)| result.only(*from))
                    .map(|(function, _)| format!("convert the result with {function}()"));
                match (redeclare, convert) {
                    (Some(redeclare), Some(convert)) => format!("{redeclare}, or {convert}"),
                    (Some(one), None) | (None, Some(one)) => one,
                    (None, None) => format!("make the expression return a {declared}"),
                }
            };
            Some(format!(
                "map field {name:?} is declared {declared}, but its expression is {result} ({source}); {hint}"
            ))
        }
    }
}

/// Why an expression with this estimate could take too long on one event, if
/// it could.
fn cost_problem(estimate: &cost::Estimate) -> Option<String> {
    if estimate.nesting > MAX_COMPREHENSION_NESTING {
        return Some(format!(
            "the CEL expression runs {} iterations (all, exists, exists_one, map, filter) inside one another, over the limit of {MAX_COMPREHENSION_NESTING}; iterate over one list at a time, in separate steps if need be",
            estimate.nesting
        ));
    }
    if estimate.cost <= MAX_EXPRESSION_COST as f64 {
        return None;
    }
    let event = format!("{} MiB", MAX_EVENT_BYTES >> 20);
    let costliest = match &estimate.costliest {
        Some(c) => format!(
            ": `{}` runs its body up to {} times, {} in all",
            c.at,
            show_number(c.iterations),
            show_number(c.total)
        ),
        None => String::new(),
    };
    Some(format!(
        "the CEL expression may cost up to {} on one event, over the limit of {}{costliest}. A list, map or string read from the event may be as large as the largest event ({event}): iterating over one inside an iteration over another, or `in` on one inside an iteration, grows with the square of the event's size, and `matches` compiles its pattern again on every call; iterate over one event list at a time (lists nested in its elements are fine), compare against literal lists, match a pattern against one field rather than each element, or split the work across several steps",
        show_number(estimate.cost),
        show_number(MAX_EXPRESSION_COST as f64)
    ))
}

/// A cost or a count in a message: with thousands separators, or in
/// scientific notation when it is astronomical.
fn show_number(value: f64) -> String {
    if value >= 1e15 {
        return format!("{value:.1e}");
    }
    let digits = format!("{:.0}", value.ceil());
    let mut shown = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            shown.push(',');
        }
        shown.push(digit);
    }
    shown
}

/// Whether a result of type `result` may be written to a field declared
/// `declared`, as the runtime's map step checks it: `integer` takes int and
/// uint, `number` any number, `timestamp` a timestamp, an int (epoch
/// milliseconds) or an RFC 3339 string, `any` whatever has a JSON form.
fn may_be_declared(result: &Type, declared: FieldType) -> bool {
    match declared {
        FieldType::String => result.may_be(STRING),
        FieldType::Integer => result.may_be(INT | UINT),
        FieldType::Number => result.may_be(NUMBERS),
        FieldType::Boolean => result.may_be(BOOL),
        FieldType::Timestamp => result.may_be(TIMESTAMP | INT | STRING),
        FieldType::Object => result.may_be_map(),
        FieldType::Array => result.may_be_list(),
        FieldType::Any => result.may_have_json_form(),
    }
}

/// The conversion function that makes a `declared` value, and the kinds it
/// converts (as the interpreter's overloads take them).
fn conversion_to(declared: FieldType) -> Option<(&'static str, u16)> {
    match declared {
        FieldType::String => Some((
            "string",
            BOOL | NUMBERS | STRING | BYTES | TIMESTAMP | DURATION,
        )),
        FieldType::Integer => Some(("int", NUMBERS | STRING | TIMESTAMP)),
        FieldType::Number => Some(("double", NUMBERS | STRING)),
        FieldType::Timestamp => Some(("timestamp", INT | STRING | TIMESTAMP)),
        _ => None,
    }
}

/// Helpers the submodules' tests share: a schema with a field of every type,
/// and the type and failures of an expression over it.
#[cfg(test)]
mod testing {
    use super::inference::{Typed, type_of};
    use crate::schema::{FieldSpec, FieldType, Schema, SchemaSpec};

    pub(super) fn schema(open: bool) -> Schema {
        let field = |name: &str, field_type: FieldType, optional: bool| FieldSpec {
            name: name.to_owned(),
            field_type,
            optional,
            description: None,
        };
        Schema::from_spec(&SchemaSpec {
            fields: vec![
                field("name", FieldType::String, false),
                field("count", FieldType::Integer, false),
                field("amount", FieldType::Number, false),
                field("paid", FieldType::Boolean, false),
                field("ts", FieldType::Timestamp, false),
                field("tags", FieldType::Array, false),
                field("note", FieldType::String, true),
                field("extra", FieldType::Any, false),
                field("customer.id", FieldType::String, false),
                field("customer.tier", FieldType::String, true),
                field("customer.address.zip", FieldType::Integer, false),
            ],
            open,
        })
    }

    pub(super) fn typed(source: &str) -> Typed {
        let program = cel::Program::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        type_of(program.expression(), &schema(true))
    }

    /// The result type as messages show it; the expression must not fail.
    #[track_caller]
    pub(super) fn ty(source: &str) -> String {
        let typed = typed(source);
        assert!(
            typed.failures.is_empty(),
            "{source}: unexpected failures {:?}",
            typed.failures
        );
        typed.result.to_string()
    }

    /// The one failing part, as `part: why`.
    #[track_caller]
    pub(super) fn failure(source: &str) -> String {
        let typed = typed(source);
        assert_eq!(typed.failures.len(), 1, "{source}: {:?}", typed.failures);
        format!("{}: {}", typed.failures[0].at, typed.failures[0].why)
    }
}
