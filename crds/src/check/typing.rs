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
use std::fmt;

use cel::common::ast::operators;
use cel::common::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue};

use super::expressions::{EVENT_VARIABLE, free_variables};
use super::{Checker, ErrorKind};
use crate::schema::{FieldType, Schema};

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
    /// Parses and types an expression over `schema`, reporting a parse error,
    /// parts that fail whenever evaluated, and a result that can never serve
    /// `usage`. Returns the top-level names it reads, unless it does not parse.
    pub(super) fn check_expression(
        &mut self,
        expression: &str,
        schema: &Schema,
        usage: Usage<'_>,
        path: &str,
        subject: &str,
    ) -> Option<BTreeSet<String>> {
        let program = match cel::Program::compile(expression) {
            Ok(program) => program,
            Err(parse_error) => {
                self.error(
                    ErrorKind::InvalidExpression,
                    path,
                    Some(subject),
                    format!(
                        "the CEL expression does not parse: {}",
                        parse_error.to_string().trim()
                    ),
                );
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

/// The scalar kinds, one bit each.
const NULL: u16 = 1;
const BOOL: u16 = 1 << 1;
const INT: u16 = 1 << 2;
const UINT: u16 = 1 << 3;
const DOUBLE: u16 = 1 << 4;
const STRING: u16 = 1 << 5;
const BYTES: u16 = 1 << 6;
const TIMESTAMP: u16 = 1 << 7;
const DURATION: u16 = 1 << 8;
const NUMBERS: u16 = INT | UINT | DOUBLE;

/// CEL's names of the scalar kinds, in the order messages list them.
const SCALAR_NAMES: [(u16, &str); 9] = [
    (BOOL, "bool"),
    (INT, "int"),
    (UINT, "uint"),
    (DOUBLE, "double"),
    (STRING, "string"),
    (BYTES, "bytes"),
    (TIMESTAMP, "timestamp"),
    (DURATION, "duration"),
    (NULL, "null"),
];

/// What a map value is known to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MapShape {
    /// The object at this schema path (`""` is the whole event): its members
    /// are the schema's fields under the path.
    Record(String),
    /// A map whose entries are unknown.
    Entries,
}

/// The kinds a value may have at run time. The empty type (no kind) is what
/// nothing evaluates to, such as the elements of `[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Type {
    /// Any value: the checker cannot tell.
    dynamic: bool,
    /// The scalar kinds it may be, a bit each.
    scalars: u16,
    /// The element type, when it may be a list.
    list: Option<Box<Type>>,
    /// What it holds, when it may be a map.
    map: Option<MapShape>,
}

/// One kind of a [`Type`], for operators that are defined per pair of kinds.
#[derive(Clone, Debug)]
enum Kind {
    Dyn,
    Scalar(u16),
    List(Type),
    Map(MapShape),
}

impl Type {
    fn dynamic() -> Self {
        Self {
            dynamic: true,
            ..Self::default()
        }
    }

    fn scalar(bits: u16) -> Self {
        Self {
            scalars: bits,
            ..Self::default()
        }
    }

    fn list(element: Type) -> Self {
        Self {
            list: Some(Box::new(element)),
            ..Self::default()
        }
    }

    fn map(shape: MapShape) -> Self {
        Self {
            map: Some(shape),
            ..Self::default()
        }
    }

    /// The type of a field declared in a schema; `path` locates an object's members.
    fn of_field(field_type: FieldType, optional: bool, path: &str) -> Self {
        let mut ty = match field_type {
            FieldType::String => Self::scalar(STRING),
            FieldType::Integer => Self::scalar(INT),
            // A JSON number is an int when it is integral, a double otherwise.
            FieldType::Number => Self::scalar(INT | DOUBLE),
            FieldType::Boolean => Self::scalar(BOOL),
            // An RFC 3339 string or epoch milliseconds; never a CEL timestamp.
            FieldType::Timestamp => Self::scalar(STRING | INT),
            FieldType::Object => Self::map(MapShape::Record(path.to_owned())),
            FieldType::Array => Self::list(Self::dynamic()),
            FieldType::Any => return Self::dynamic(),
        };
        if optional {
            ty.scalars |= NULL;
        }
        ty
    }

    fn is_empty(&self) -> bool {
        !self.dynamic && self.scalars == 0 && self.list.is_none() && self.map.is_none()
    }

    fn is_dynamic(&self) -> bool {
        self.dynamic
    }

    /// Whether a value of this type may be of one of the scalar kinds `bits`.
    fn may_be(&self, bits: u16) -> bool {
        self.dynamic || self.scalars & bits != 0
    }

    /// Whether every value of this type is of one of the scalar kinds `bits`.
    fn only(&self, bits: u16) -> bool {
        !self.dynamic
            && self.list.is_none()
            && self.map.is_none()
            && self.scalars != 0
            && self.scalars & !bits == 0
    }

    fn may_be_list(&self) -> bool {
        self.dynamic || self.list.is_some()
    }

    fn may_be_map(&self) -> bool {
        self.dynamic || self.map.is_some()
    }

    fn may_be_bool(&self) -> bool {
        self.may_be(BOOL)
    }

    /// Whether some value of this type has a JSON form (durations and bytes have none).
    fn may_have_json_form(&self) -> bool {
        self.dynamic
            || self.list.is_some()
            || self.map.is_some()
            || self.scalars & !(DURATION | BYTES) != 0
    }

    /// Whether every value of it is a number (so a comparison with 0 makes a condition).
    fn is_numeric(&self) -> bool {
        self.only(NUMBERS)
    }

    fn is_string(&self) -> bool {
        self.only(STRING)
    }

    /// Whether every value of it is a list or a map.
    fn is_collection(&self) -> bool {
        !self.dynamic && self.scalars == 0 && (self.list.is_some() || self.map.is_some())
    }

    /// The schema type that declares values of this type, when one does exactly.
    fn field_type(&self) -> Option<FieldType> {
        if self.dynamic || self.is_empty() {
            return None;
        }
        let scalars = self.scalars & !NULL;
        match (scalars, &self.list, &self.map) {
            (0, Some(_), None) => Some(FieldType::Array),
            (0, None, Some(_)) => Some(FieldType::Object),
            (bits, None, None) if bits != 0 && bits & !(INT | UINT) == 0 => {
                Some(FieldType::Integer)
            }
            (bits, None, None) if bits != 0 && bits & !NUMBERS == 0 => Some(FieldType::Number),
            (STRING, None, None) => Some(FieldType::String),
            (BOOL, None, None) => Some(FieldType::Boolean),
            (TIMESTAMP, None, None) => Some(FieldType::Timestamp),
            _ => None,
        }
    }

    /// The least type holding the values of both.
    fn join(&self, other: &Type) -> Type {
        if self.dynamic || other.dynamic {
            return Type::dynamic();
        }
        let list = match (&self.list, &other.list) {
            (Some(a), Some(b)) => Some(Box::new(a.join(b))),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        let map = match (&self.map, &other.map) {
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            (Some(_), Some(_)) => Some(MapShape::Entries),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Type {
            dynamic: false,
            scalars: self.scalars | other.scalars,
            list,
            map,
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        if self.dynamic {
            return vec![Kind::Dyn];
        }
        let mut kinds: Vec<Kind> = SCALAR_NAMES
            .iter()
            .filter(|(bit, _)| self.scalars & bit != 0)
            .map(|(bit, _)| Kind::Scalar(*bit))
            .collect();
        if let Some(element) = &self.list {
            kinds.push(Kind::List((**element).clone()));
        }
        if let Some(shape) = &self.map {
            kinds.push(Kind::Map(shape.clone()));
        }
        kinds
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dynamic {
            return f.write_str("dyn");
        }
        let mut names: Vec<&str> = SCALAR_NAMES
            .iter()
            .filter(|(bit, _)| self.scalars & bit != 0 && *bit != NULL)
            .map(|(_, name)| *name)
            .collect();
        if self.list.is_some() {
            names.push("list");
        }
        if self.map.is_some() {
            names.push("map");
        }
        // Null last: `string or null` reads as an optional string.
        if self.scalars & NULL != 0 {
            names.push("null");
        }
        match names.split_last() {
            None => f.write_str("nothing"),
            Some((last, [])) => f.write_str(last),
            Some((last, rest)) => write!(f, "{} or {last}", rest.join(", ")),
        }
    }
}

/// A part of an expression that fails whenever it is evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Failure {
    /// The part, as CEL source.
    pub at: String,
    /// Why it fails, for the user.
    pub why: String,
}

/// What the checker learnt about one expression.
struct Typed {
    /// The type of its result.
    pub result: Type,
    /// The parts that fail whenever they are evaluated. A part may still be
    /// skipped (`false && x`), so these are mistakes, not certain failures of
    /// the whole expression.
    pub failures: Vec<Failure>,
}

/// Types `expression` over events of `schema`: top-level fields are variables,
/// and `event` is the whole event unless a field has that name.
fn type_of(expression: &IdedExpr, schema: &Schema) -> Typed {
    let mut typer = Typer {
        schema,
        scopes: Vec::new(),
        failures: Vec::new(),
    };
    let result = typer.infer(expression);
    Typed {
        result,
        failures: typer.failures,
    }
}

struct Typer<'s> {
    schema: &'s Schema,
    /// Comprehension variables in scope, innermost last.
    scopes: Vec<(String, Type)>,
    failures: Vec<Failure>,
}

impl Typer<'_> {
    fn fail(&mut self, expression: &IdedExpr, why: String) -> Type {
        let failure = Failure {
            at: show(expression),
            why,
        };
        // Comprehension steps are typed more than once; say each failure once.
        if !self.failures.contains(&failure) {
            self.failures.push(failure);
        }
        // The failure is reported; what follows from it would only repeat it.
        Type::dynamic()
    }

    fn infer(&mut self, expression: &IdedExpr) -> Type {
        match &expression.expr {
            Expr::Literal(literal) => Type::scalar(match literal {
                LiteralValue::Boolean(_) => BOOL,
                LiteralValue::Bytes(_) => BYTES,
                LiteralValue::Double(_) => DOUBLE,
                LiteralValue::Int(_) => INT,
                LiteralValue::Null => NULL,
                LiteralValue::String(_) => STRING,
                LiteralValue::UInt(_) => UINT,
            }),
            Expr::Ident(name) => self.variable(name),
            Expr::Select(select) => {
                let operand = self.infer(&select.operand);
                if select.test {
                    return Type::scalar(BOOL);
                }
                self.member(expression, &operand, &select.field)
            }
            Expr::Call(call) => self.call(expression, call),
            Expr::List(list) => {
                let mut element = Type::default();
                for item in &list.elements {
                    element = element.join(&self.infer(item));
                }
                Type::list(element)
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        self.infer(&entry.key);
                        self.infer(&entry.value);
                    }
                }
                Type::map(MapShape::Entries)
            }
            Expr::Comprehension(comprehension) => self.comprehension(expression, comprehension),
            Expr::Struct(_) | Expr::Unspecified => Type::dynamic(),
        }
    }

    fn variable(&self, name: &str) -> Type {
        if let Some((_, ty)) = self.scopes.iter().rev().find(|(bound, _)| bound == name) {
            return ty.clone();
        }
        match self.schema.get(name) {
            Some(info) => Type::of_field(info.field_type, info.optional, name),
            None if name == EVENT_VARIABLE => Type::map(MapShape::Record(String::new())),
            // Unknown fields are the requirements' to report.
            None => Type::dynamic(),
        }
    }

    /// The member `field` of a value of type `operand`, or the failure to select it.
    fn member(&mut self, expression: &IdedExpr, operand: &Type, field: &str) -> Type {
        if operand.is_empty() {
            return Type::dynamic();
        }
        let mut result = Type::default();
        let mut selectable = false;
        for kind in operand.kinds() {
            match kind {
                Kind::Dyn | Kind::Map(MapShape::Entries) => return Type::dynamic(),
                Kind::Map(MapShape::Record(path)) => {
                    selectable = true;
                    result = result.join(&self.record_member(&path, field));
                }
                Kind::Scalar(_) | Kind::List(_) => {}
            }
        }
        if selectable {
            result
        } else {
            self.fail(expression, format!("{} has no fields", grouped(operand)))
        }
    }

    /// The type of member `field` of the object at schema path `path`.
    fn record_member(&self, path: &str, field: &str) -> Type {
        let member = if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        match self.schema.get(&member) {
            Some(info) => Type::of_field(info.field_type, info.optional, &member),
            // An open schema's objects, and objects whose members are not
            // listed, may carry it; whether a closed one does is the
            // requirements' question, not a type.
            None => Type::dynamic(),
        }
    }

    fn call(&mut self, expression: &IdedExpr, call: &CallExpr) -> Type {
        let args = &call.args;
        match (call.func_name.as_str(), &call.target, args.len()) {
            (operators::CONDITIONAL, None, 3) => {
                let condition = self.infer(&args[0]);
                if !condition.is_empty() && !condition.may_be_bool() {
                    self.fail(
                        &args[0],
                        format!("a condition before ? must be a bool, not {condition}"),
                    );
                }
                let then = self.infer(&args[1]);
                let otherwise = self.infer(&args[2]);
                then.join(&otherwise)
            }
            (operators::LOGICAL_AND | operators::LOGICAL_OR, None, 2) => {
                let left = self.infer(&args[0]);
                let right = self.infer(&args[1]);
                // Either side may decide the result alone (`false && x` is false
                // whatever x is), so only two non-bools fail for sure.
                if !left.is_empty()
                    && !right.is_empty()
                    && !left.may_be_bool()
                    && !right.may_be_bool()
                {
                    let symbol = if call.func_name == operators::LOGICAL_AND {
                        "&&"
                    } else {
                        "||"
                    };
                    self.fail(
                        expression,
                        format!(
                            "{symbol} needs bools, not {} and {}",
                            grouped(&left),
                            grouped(&right)
                        ),
                    );
                }
                Type::scalar(BOOL)
            }
            (operators::LOGICAL_NOT, None, 1) => {
                let operand = self.infer(&args[0]);
                if !operand.is_empty() && !operand.may_be_bool() {
                    self.fail(expression, format!("! needs a bool, not {operand}"));
                }
                Type::scalar(BOOL)
            }
            (operators::NOT_STRICTLY_FALSE, None, 1) => {
                self.infer(&args[0]);
                Type::scalar(BOOL)
            }
            (operators::EQUALS | operators::NOT_EQUALS, None, 2) => {
                // Values of different kinds are unequal, never an error.
                self.infer(&args[0]);
                self.infer(&args[1]);
                Type::scalar(BOOL)
            }
            (
                operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS,
                None,
                2,
            ) => {
                let left = self.infer(&args[0]);
                let right = self.infer(&args[1]);
                let symbol = binary_symbol(&call.func_name);
                self.binary(expression, symbol, &left, &right, |a, b| {
                    comparable(a, b).then(|| Type::scalar(BOOL))
                });
                Type::scalar(BOOL)
            }
            (
                operators::ADD
                | operators::SUBSTRACT
                | operators::MULTIPLY
                | operators::DIVIDE
                | operators::MODULO,
                None,
                2,
            ) => {
                let left = self.infer(&args[0]);
                let right = self.infer(&args[1]);
                let operator = call.func_name.as_str();
                self.binary(
                    expression,
                    binary_symbol(operator),
                    &left,
                    &right,
                    |a, b| arithmetic(operator, a, b),
                )
            }
            (operators::NEGATE, None, 1) => {
                let operand = self.infer(&args[0]);
                self.unary(expression, "-", &operand, |kind| match kind {
                    Kind::Scalar(bit) if bit & (INT | DOUBLE) != 0 => Some(Type::scalar(bit)),
                    _ => None,
                })
            }
            (operators::INDEX, None, 2) => self.index(expression, &args[0], &args[1]),
            (operators::IN, None, 2) => {
                let element = self.infer(&args[0]);
                let container = self.infer(&args[1]);
                if !container.is_empty()
                    && !element.is_empty()
                    && !container.may_be_list()
                    && !container.may_be_map()
                {
                    self.fail(
                        expression,
                        format!("in needs a list or a map on its right, not {container}"),
                    );
                }
                Type::scalar(BOOL)
            }
            ("size", None, 1) | ("size", Some(_), 0) => {
                let operand = match &call.target {
                    Some(target) => self.infer(target),
                    None => self.infer(&args[0]),
                };
                self.unary(expression, "size", &operand, |kind| match kind {
                    Kind::Scalar(bit) if bit & (STRING | BYTES) != 0 => Some(Type::scalar(INT)),
                    Kind::Scalar(_) => None,
                    _ => Some(Type::scalar(INT)),
                })
            }
            ("contains" | "startsWith" | "endsWith" | "matches", Some(target), 1) => {
                let receiver = self.infer(target);
                self.infer(&args[0]);
                let method = call.func_name.clone();
                self.unary(expression, &method, &receiver, |kind| match kind {
                    Kind::Scalar(STRING) | Kind::Dyn => Some(Type::scalar(BOOL)),
                    _ => None,
                });
                Type::scalar(BOOL)
            }
            (conversion, None, 1) if conversion_result(conversion).is_some() => {
                let operand = self.infer(&args[0]);
                match conversion_result(conversion) {
                    // dyn() keeps its operand's kinds at run time.
                    Some(None) => operand,
                    Some(Some(bits)) => Type::scalar(bits),
                    None => Type::dynamic(),
                }
            }
            (accessor, Some(target), _) if accessor.starts_with("get") => {
                self.infer(target);
                for arg in args {
                    self.infer(arg);
                }
                Type::scalar(INT)
            }
            _ => {
                // A function the checker does not know: its arguments may still fail.
                if let Some(target) = &call.target {
                    self.infer(target);
                }
                for arg in args {
                    self.infer(arg);
                }
                Type::dynamic()
            }
        }
    }

    /// The result of an operator defined for some kinds of its operand, or
    /// the failure when it is defined for none.
    fn unary(
        &mut self,
        expression: &IdedExpr,
        operator: &str,
        operand: &Type,
        result: impl Fn(Kind) -> Option<Type>,
    ) -> Type {
        if operand.is_empty() {
            return Type::dynamic();
        }
        let mut joined: Option<Type> = None;
        for kind in operand.kinds() {
            if matches!(kind, Kind::Dyn) {
                // Whatever it is, the operator may apply.
                return result(Kind::Dyn).unwrap_or_else(Type::dynamic);
            }
            if let Some(ty) = result(kind) {
                joined = Some(joined.map_or(ty.clone(), |j| j.join(&ty)));
            }
        }
        match joined {
            Some(ty) => ty,
            None => self.fail(
                expression,
                format!("{operator} does not apply to {operand}"),
            ),
        }
    }

    /// The result of an operator defined for some pairs of kinds, or the
    /// failure when it is defined for no pair its operands can make.
    fn binary(
        &mut self,
        expression: &IdedExpr,
        operator: &str,
        left: &Type,
        right: &Type,
        result: impl Fn(&Kind, &Kind) -> Option<Type>,
    ) -> Type {
        if left.is_empty() || right.is_empty() {
            return Type::dynamic();
        }
        let mut joined: Option<Type> = None;
        for a in left.kinds() {
            for b in right.kinds() {
                if matches!(a, Kind::Dyn) || matches!(b, Kind::Dyn) {
                    return Type::dynamic();
                }
                if let Some(ty) = result(&a, &b) {
                    joined = Some(joined.map_or(ty.clone(), |j| j.join(&ty)));
                }
            }
        }
        if let Some(ty) = joined {
            return ty;
        }
        // Mixed numbers are the common mistake: CEL converts none implicitly.
        let hint = if left.only(NUMBERS) && right.only(NUMBERS) && left != right {
            "; CEL does not mix numeric types: convert one side with int(), uint() or double()"
        } else if (left.may_be(STRING) && right.only(TIMESTAMP))
            || (right.may_be(STRING) && left.only(TIMESTAMP))
        {
            "; convert the other side with timestamp()"
        } else {
            ""
        };
        self.fail(
            expression,
            format!(
                "{operator} does not apply to {} and {}{hint}",
                grouped(left),
                grouped(right)
            ),
        )
    }

    fn index(&mut self, expression: &IdedExpr, operand: &IdedExpr, key: &IdedExpr) -> Type {
        let container = self.infer(operand);
        let key_type = self.infer(key);
        if container.is_empty() || key_type.is_empty() {
            return Type::dynamic();
        }
        let literal_key = match &key.expr {
            Expr::Literal(LiteralValue::String(name)) => Some(name.inner().to_owned()),
            _ => None,
        };
        let mut result: Option<Type> = None;
        let mut add = |ty: Type| result = Some(result.take().map_or(ty.clone(), |r| r.join(&ty)));
        for kind in container.kinds() {
            match kind {
                Kind::Dyn | Kind::Map(MapShape::Entries) => return Type::dynamic(),
                Kind::Map(MapShape::Record(path)) => match &literal_key {
                    Some(field) => add(self.record_member(&path, field)),
                    None => return Type::dynamic(),
                },
                // Lists take any number as an index.
                Kind::List(element) if key_type.may_be(NUMBERS) => add(element),
                Kind::List(_) | Kind::Scalar(_) => {}
            }
        }
        match result {
            Some(ty) => ty,
            None => self.fail(
                expression,
                format!(
                    "{} cannot be indexed with {}",
                    grouped(&container),
                    grouped(&key_type)
                ),
            ),
        }
    }

    fn comprehension(&mut self, expression: &IdedExpr, comprehension: &ComprehensionExpr) -> Type {
        let range = self.infer(&comprehension.iter_range);
        let element = if range.is_empty() {
            Type::default()
        } else {
            let mut element: Option<Type> = None;
            for kind in range.kinds() {
                let ty = match kind {
                    Kind::Dyn | Kind::Map(MapShape::Entries) => Type::dynamic(),
                    Kind::List(element) => element,
                    // An object's keys are its member names.
                    Kind::Map(MapShape::Record(_)) => Type::scalar(STRING),
                    Kind::Scalar(_) => continue,
                };
                element = Some(element.map_or(ty.clone(), |e| e.join(&ty)));
            }
            match element {
                Some(element) => element,
                None => self.fail(
                    expression,
                    format!("only lists and maps can be iterated, not {range}"),
                ),
            }
        };
        let element = if comprehension.iter_var2.is_some() {
            // Two variables (index or key, then value): not among the macros
            // the runtime expands, so nothing is known of them.
            Type::dynamic()
        } else {
            element
        };
        let scope = self.scopes.len();
        self.scopes
            .push((comprehension.iter_var.clone(), element.clone()));
        if let Some(second) = &comprehension.iter_var2 {
            self.scopes.push((second.clone(), Type::dynamic()));
        }
        let mut accumulator = self.infer(&comprehension.accu_init);
        // The accumulator's type is what its start and every step can make:
        // iterate to a fixed point (lists of lists take one more round).
        let mut settled = false;
        for _ in 0..4 {
            self.scopes
                .push((comprehension.accu_var.clone(), accumulator.clone()));
            self.infer(&comprehension.loop_cond);
            let step = self.infer(&comprehension.loop_step);
            self.scopes.pop();
            let next = accumulator.join(&step);
            if next == accumulator {
                settled = true;
                break;
            }
            accumulator = next;
        }
        if !settled {
            accumulator = Type::dynamic();
        }
        self.scopes
            .push((comprehension.accu_var.clone(), accumulator));
        let result = self.infer(&comprehension.result);
        self.scopes.truncate(scope);
        result
    }
}

/// What a conversion function returns: `Some(Some(kinds))`, or `Some(None)`
/// for `dyn`, which returns its operand; `None` if `name` is none.
fn conversion_result(name: &str) -> Option<Option<u16>> {
    Some(Some(match name {
        "int" => INT,
        "uint" => UINT,
        "double" => DOUBLE,
        "string" => STRING,
        "bytes" => BYTES,
        "bool" => BOOL,
        "timestamp" => TIMESTAMP,
        "duration" => DURATION,
        "dyn" => return Some(None),
        _ => return None,
    }))
}

fn binary_symbol(function: &str) -> &'static str {
    match function {
        operators::ADD => "+",
        operators::SUBSTRACT => "-",
        operators::MULTIPLY => "*",
        operators::DIVIDE => "/",
        operators::MODULO => "%",
        operators::LESS => "<",
        operators::LESS_EQUALS => "<=",
        operators::GREATER => ">",
        operators::GREATER_EQUALS => ">=",
        operators::EQUALS => "==",
        operators::NOT_EQUALS => "!=",
        operators::LOGICAL_AND => "&&",
        operators::LOGICAL_OR => "||",
        operators::IN => "in",
        _ => "?",
    }
}

/// Whether the interpreter orders two values of these kinds: numbers of any
/// kind against each other, other scalars only against their own kind.
fn comparable(a: &Kind, b: &Kind) -> bool {
    match (a, b) {
        (Kind::Scalar(a), Kind::Scalar(b)) => {
            (a & NUMBERS != 0 && b & NUMBERS != 0)
                || (a == b && a & (BOOL | STRING | BYTES | TIMESTAMP | DURATION) != 0)
        }
        _ => false,
    }
}

/// The result of an arithmetic operator on two kinds, as the interpreter
/// defines it: numbers only with their own kind, never mixed.
fn arithmetic(operator: &str, a: &Kind, b: &Kind) -> Option<Type> {
    let (a, b) = match (a, b) {
        (Kind::List(a), Kind::List(b)) if operator == operators::ADD => {
            return Some(Type::list(a.join(b)));
        }
        (Kind::Scalar(a), Kind::Scalar(b)) => (*a, *b),
        _ => return None,
    };
    let bits = match operator {
        operators::ADD => match (a, b) {
            _ if a == b && a & (INT | UINT | DOUBLE | STRING | BYTES | DURATION) != 0 => a,
            (TIMESTAMP, DURATION) | (DURATION, TIMESTAMP) => TIMESTAMP,
            _ => return None,
        },
        operators::SUBSTRACT => match (a, b) {
            _ if a == b && a & (NUMBERS | DURATION) != 0 => a,
            (TIMESTAMP, TIMESTAMP) => DURATION,
            (TIMESTAMP, DURATION) => TIMESTAMP,
            _ => return None,
        },
        operators::MULTIPLY | operators::DIVIDE if a == b && a & NUMBERS != 0 => a,
        operators::MODULO if a == b && a & (INT | UINT) != 0 => a,
        _ => return None,
    };
    Some(Type::scalar(bits))
}

/// An expression as CEL source: macros are shown as written, not as the
/// comprehension they expand to.
fn show(expression: &IdedExpr) -> String {
    match &expression.expr {
        Expr::Literal(literal) => match literal {
            LiteralValue::Boolean(b) => b.inner().to_string(),
            LiteralValue::Bytes(b) => format!("b{:?}", String::from_utf8_lossy(b.inner())),
            LiteralValue::Double(d) => {
                let d = *d.inner();
                if d.is_finite() && d.fract() == 0.0 {
                    format!("{d:.1}")
                } else {
                    d.to_string()
                }
            }
            LiteralValue::Int(i) => i.inner().to_string(),
            LiteralValue::Null => "null".to_owned(),
            LiteralValue::String(s) => format!("{:?}", s.inner()),
            LiteralValue::UInt(u) => format!("{}u", u.inner()),
        },
        Expr::Ident(name) => name.clone(),
        Expr::Select(select) if select.test => {
            format!(
                "has({}.{})",
                operand(&select.operand, POSTFIX),
                select.field
            )
        }
        Expr::Select(select) => format!("{}.{}", operand(&select.operand, POSTFIX), select.field),
        Expr::Call(call) => show_call(call),
        Expr::List(list) => {
            let items: Vec<String> = list.elements.iter().map(show).collect();
            format!("[{}]", items.join(", "))
        }
        Expr::Map(map) => {
            let entries: Vec<String> = map
                .entries
                .iter()
                .filter_map(|entry| match &entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        Some(format!("{}: {}", show(&entry.key), show(&entry.value)))
                    }
                    EntryExpr::StructField(_) => None,
                })
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        Expr::Comprehension(comprehension) => {
            let name = match &comprehension.accu_init.expr {
                Expr::Literal(LiteralValue::Boolean(b)) if *b.inner() => "all",
                Expr::Literal(LiteralValue::Boolean(_)) => "exists",
                Expr::Literal(LiteralValue::Int(_)) => "exists_one",
                _ => "map",
            };
            format!(
                "{}.{name}({}, …)",
                operand(&comprehension.iter_range, POSTFIX),
                comprehension.iter_var
            )
        }
        Expr::Struct(s) => format!("{}{{…}}", s.type_name),
        Expr::Unspecified => "…".to_owned(),
    }
}

fn show_call(call: &CallExpr) -> String {
    let args = &call.args;
    match (call.func_name.as_str(), &call.target, args.len()) {
        (operators::CONDITIONAL, None, 3) => format!(
            "{} ? {} : {}",
            operand(&args[0], CONDITIONAL + 1),
            operand(&args[1], CONDITIONAL + 1),
            operand(&args[2], CONDITIONAL)
        ),
        (operators::INDEX, None, 2) => {
            format!("{}[{}]", operand(&args[0], POSTFIX), show(&args[1]))
        }
        (operators::LOGICAL_NOT, None, 1) => format!("!{}", operand(&args[0], UNARY)),
        (operators::NEGATE, None, 1) => format!("-{}", operand(&args[0], UNARY)),
        (name, None, 2) if binary_symbol(name) != "?" => format!(
            "{} {} {}",
            operand(&args[0], call_precedence(call)),
            binary_symbol(name),
            operand(&args[1], call_precedence(call) + 1)
        ),
        (name, target, _) => {
            let shown: Vec<String> = args.iter().map(show).collect();
            match target {
                Some(target) => {
                    format!("{}.{name}({})", operand(target, POSTFIX), shown.join(", "))
                }
                None => format!("{name}({})", shown.join(", ")),
            }
        }
    }
}

/// A type in a message that names two: `(int or string) and timestamp`.
fn grouped(ty: &Type) -> String {
    let shown = ty.to_string();
    if shown.contains(" or ") {
        format!("({shown})")
    } else {
        shown
    }
}

/// How tightly an expression binds, as CEL parses it: a conditional the
/// loosest, selections, indexes and calls the tightest.
const CONDITIONAL: u8 = 1;
const UNARY: u8 = 7;
const POSTFIX: u8 = 8;

fn precedence(expression: &IdedExpr) -> u8 {
    match &expression.expr {
        Expr::Call(call) => call_precedence(call),
        _ => POSTFIX,
    }
}

fn call_precedence(call: &CallExpr) -> u8 {
    if call.target.is_some() {
        return POSTFIX;
    }
    match (call.func_name.as_str(), call.args.len()) {
        (operators::CONDITIONAL, 3) => CONDITIONAL,
        (operators::LOGICAL_OR, 2) => 2,
        (operators::LOGICAL_AND, 2) => 3,
        (
            operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS
            | operators::IN,
            2,
        ) => 4,
        (operators::ADD | operators::SUBSTRACT, 2) => 5,
        (operators::MULTIPLY | operators::DIVIDE | operators::MODULO, 2) => 6,
        (operators::LOGICAL_NOT | operators::NEGATE, 1) => UNARY,
        _ => POSTFIX,
    }
}

/// An operand of an operator that binds with `binding`: in parentheses when
/// it binds more loosely.
fn operand(expression: &IdedExpr, binding: u8) -> String {
    let shown = show(expression);
    if precedence(expression) < binding {
        format!("({shown})")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{FieldSpec, SchemaSpec};

    fn schema(open: bool) -> Schema {
        let field = |name: &str, field_type: FieldType, optional: bool| FieldSpec {
            name: name.to_owned(),
            field_type,
            optional,
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

    fn typed(source: &str) -> Typed {
        let program = cel::Program::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        type_of(program.expression(), &schema(true))
    }

    /// The result type as messages show it; the expression must not fail.
    #[track_caller]
    fn ty(source: &str) -> String {
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
    fn failure(source: &str) -> String {
        let typed = typed(source);
        assert_eq!(typed.failures.len(), 1, "{source}: {:?}", typed.failures);
        format!("{}: {}", typed.failures[0].at, typed.failures[0].why)
    }

    #[test]
    fn fields_have_their_schema_types() {
        assert_eq!(ty("name"), "string");
        assert_eq!(ty("count"), "int");
        assert_eq!(ty("amount"), "int or double");
        assert_eq!(ty("paid"), "bool");
        assert_eq!(ty("ts"), "int or string");
        assert_eq!(ty("tags"), "list");
        assert_eq!(ty("extra"), "dyn");
        assert_eq!(ty("customer"), "map");
        // Unknown fields are for the requirements to report.
        assert_eq!(ty("unknown"), "dyn");
    }

    #[test]
    fn optional_fields_may_be_null() {
        assert_eq!(ty("note"), "string or null");
        assert_eq!(ty("customer.tier"), "string or null");
        assert_eq!(ty("note == null ? 'none' : note"), "string or null");
    }

    #[test]
    fn nested_fields_are_looked_up_by_path() {
        assert_eq!(ty("customer.id"), "string");
        assert_eq!(ty("customer.address.zip"), "int");
        assert_eq!(ty("customer['id']"), "string");
        // Open objects may carry unlisted members.
        assert_eq!(ty("customer.other"), "dyn");
        assert_eq!(ty("extra.anything.deep"), "dyn");
        assert_eq!(failure("name.first"), "name.first: string has no fields");
    }

    #[test]
    fn event_is_the_whole_event() {
        assert_eq!(ty("event.count"), "int");
        assert_eq!(ty("event['customer'].id"), "string");
        assert_eq!(ty("event.unlisted"), "dyn");
        assert_eq!(ty("event"), "map");
        let with_event_field = Schema::from_spec(&SchemaSpec {
            fields: vec![FieldSpec {
                name: "event".to_owned(),
                field_type: FieldType::String,
                optional: false,
            }],
            open: true,
        });
        let program = cel::Program::compile("event").unwrap();
        assert_eq!(
            type_of(program.expression(), &with_event_field)
                .result
                .to_string(),
            "string"
        );
    }

    #[test]
    fn arithmetic_follows_the_interpreter() {
        assert_eq!(ty("count + 1"), "int");
        assert_eq!(ty("1.5 * 2.0"), "double");
        // A number field is an int or a double: each operand kind keeps its own.
        assert_eq!(ty("amount * 100.0"), "double");
        assert_eq!(ty("amount + 1"), "int");
        assert_eq!(ty("amount + amount"), "int or double");
        assert_eq!(ty("name + '!'"), "string");
        assert_eq!(ty("tags + [1]"), "list");
        assert_eq!(ty("count % 3"), "int");
        assert_eq!(ty("-amount"), "int or double");
        assert_eq!(
            ty("timestamp('2024-01-01T00:00:00Z') + duration('1h')"),
            "timestamp"
        );
        assert_eq!(
            ty("timestamp(ts) - timestamp('2024-01-01T00:00:00Z')"),
            "duration"
        );
        assert_eq!(ty("extra + 1"), "dyn");
    }

    #[test]
    fn arithmetic_that_always_fails() {
        assert_eq!(
            failure("name + 1"),
            "name + 1: + does not apply to string and int"
        );
        assert_eq!(
            failure("count * 1.5"),
            "count * 1.5: * does not apply to int and double; CEL does not mix numeric types: convert one side with int(), uint() or double()"
        );
        assert_eq!(
            failure("1.5 % 2.0"),
            "1.5 % 2.0: % does not apply to double and double"
        );
        assert_eq!(failure("-name"), "-name: - does not apply to string");
        // Parts are shown as written, with the parentheses precedence needs.
        assert_eq!(
            failure("-(name + 'a') > 0"),
            "-(name + \"a\"): - does not apply to string"
        );
        assert_eq!(
            failure("(count + 1) * name"),
            "(count + 1) * name: * does not apply to int and string"
        );
    }

    #[test]
    fn comparisons_are_bool_and_mix_numbers() {
        assert_eq!(ty("amount > 100"), "bool");
        assert_eq!(ty("count < 1.5"), "bool");
        assert_eq!(ty("name == 1"), "bool");
        assert_eq!(ty("note != null"), "bool");
        assert_eq!(ty("name >= 'm'"), "bool");
        assert_eq!(ty("ts > 0"), "bool");
        assert_eq!(ty("ts > '2024'"), "bool");
        assert_eq!(
            failure("name < 1"),
            "name < 1: < does not apply to string and int"
        );
        assert_eq!(
            failure("ts > timestamp('2024-01-01T00:00:00Z')"),
            "ts > timestamp(\"2024-01-01T00:00:00Z\"): > does not apply to (int or string) and timestamp; convert the other side with timestamp()"
        );
    }

    #[test]
    fn logic_and_conditions() {
        assert_eq!(ty("paid && count > 1 || !paid"), "bool");
        assert_eq!(ty("paid ? count : amount"), "int or double");
        assert_eq!(ty("paid ? 1 : 'x'"), "int or string");
        assert_eq!(
            failure("!amount"),
            "!amount: ! needs a bool, not int or double"
        );
        assert_eq!(
            failure("count ? 1 : 2"),
            "count: a condition before ? must be a bool, not int"
        );
        assert_eq!(
            failure("count && name"),
            "count && name: && needs bools, not int and string"
        );
        // One side may decide alone: `false && count` is false.
        assert_eq!(ty("paid && count"), "bool");
    }

    #[test]
    fn functions() {
        assert_eq!(ty("size(name)"), "int");
        assert_eq!(ty("tags.size()"), "int");
        assert_eq!(ty("size(customer)"), "int");
        assert_eq!(
            failure("size(count)"),
            "size(count): size does not apply to int"
        );
        assert_eq!(ty("name.contains('x')"), "bool");
        assert_eq!(ty("name.startsWith('x') || name.endsWith('y')"), "bool");
        assert_eq!(ty("name.matches('^a')"), "bool");
        assert_eq!(
            failure("count.startsWith('1')"),
            "count.startsWith(\"1\"): startsWith does not apply to int"
        );
        assert_eq!(ty("int(amount)"), "int");
        assert_eq!(ty("double(count)"), "double");
        assert_eq!(ty("string(count)"), "string");
        assert_eq!(ty("timestamp(ts)"), "timestamp");
        assert_eq!(ty("dyn(count)"), "int");
        assert_eq!(ty("timestamp(ts).getFullYear()"), "int");
        assert_eq!(ty("unknownFunction(count)"), "dyn");
    }

    #[test]
    fn literals_lists_and_maps() {
        assert_eq!(ty("1"), "int");
        assert_eq!(ty("1u"), "uint");
        assert_eq!(ty("1.0"), "double");
        assert_eq!(ty("'x'"), "string");
        assert_eq!(ty("b'x'"), "bytes");
        assert_eq!(ty("null"), "null");
        assert_eq!(ty("true"), "bool");
        assert_eq!(ty("[1, 2]"), "list");
        assert_eq!(ty("[1, 2][0]"), "int");
        assert_eq!(ty("{'a': 1}"), "map");
        assert_eq!(ty("{'a': 1}['a']"), "dyn");
        assert_eq!(ty("tags[0]"), "dyn");
        assert_eq!(ty("name in ['a', 'b']"), "bool");
        assert_eq!(
            failure("name[0]"),
            "name[0]: string cannot be indexed with int"
        );
        assert_eq!(
            failure("'a' in name"),
            "\"a\" in name: in needs a list or a map on its right, not string"
        );
    }

    #[test]
    fn macros_scope_their_variables() {
        assert_eq!(ty("tags.all(t, t == 'vip')"), "bool");
        assert_eq!(ty("tags.exists(t, t > 1)"), "bool");
        assert_eq!(ty("tags.exists_one(t, t > 1)"), "bool");
        assert_eq!(ty("[1, 2].map(x, x * 2)"), "list");
        assert_eq!(ty("[1, 2].map(x, x * 2)[0]"), "int");
        assert_eq!(ty("[1, 2].filter(x, x > 1)[0]"), "int");
        assert_eq!(ty("[[1]].map(x, x + [2])[0][0]"), "int");
        assert_eq!(ty("customer.all(k, k.startsWith('a'))"), "bool");
        // The comprehension variable shadows a field of the same name.
        assert_eq!(ty("[1].map(name, name + 1)[0]"), "int");
        assert_eq!(ty("has(customer.tier)"), "bool");
        assert_eq!(
            failure("[1, 2].map(x, x + 'a')"),
            "x + \"a\": + does not apply to int and string"
        );
        assert_eq!(
            failure("count.all(x, x > 0)"),
            "count.all(x, …): only lists and maps can be iterated, not int"
        );
        assert_eq!(ty("[].all(x, x + 'a')"), "bool");
    }

    #[test]
    fn field_types_of_results() {
        let field_type = |source: &str| typed(source).result.field_type();
        assert_eq!(field_type("count + 1"), Some(FieldType::Integer));
        assert_eq!(field_type("amount"), Some(FieldType::Number));
        assert_eq!(field_type("1.5"), Some(FieldType::Number));
        assert_eq!(field_type("note"), Some(FieldType::String));
        assert_eq!(field_type("timestamp(ts)"), Some(FieldType::Timestamp));
        assert_eq!(field_type("ts"), None);
        assert_eq!(field_type("tags"), Some(FieldType::Array));
        assert_eq!(field_type("customer"), Some(FieldType::Object));
        assert_eq!(field_type("extra"), None);
    }
}
