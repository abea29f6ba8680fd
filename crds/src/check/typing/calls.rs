//! The typing rules of operators and functions, per kind of their operands.

use cel::common::ast::operators;
use cel::common::ast::{CallExpr, IdedExpr};

use super::inference::Typer;
use super::kinds::{
    BOOL, BYTES, DOUBLE, DURATION, INT, Kind, NUMBERS, STRING, TIMESTAMP, Type, UINT, grouped,
};
use super::source::binary_symbol;

impl Typer<'_> {
    pub(super) fn call(&mut self, expression: &IdedExpr, call: &CallExpr) -> Type {
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
            (
                macro_name @ ("all" | "exists" | "exists_one" | "map" | "filter"),
                Some(target),
                _,
            ) => {
                // The parser expands these only with a variable and a body.
                self.infer(target);
                let example = match macro_name {
                    "map" => "x * 2",
                    _ => "x > 0",
                };
                self.fail(
                    expression,
                    format!(
                        "{macro_name} takes a variable and an expression of it, as {}.{macro_name}(x, {example})",
                        super::source::show(target)
                    ),
                )
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

#[cfg(test)]
mod tests {
    use super::super::testing::{failure, ty};

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
            failure("tags.exists(x > 1)"),
            "tags.exists(x > 1): exists takes a variable and an expression of it, as tags.exists(x, x > 0)"
        );
        assert_eq!(
            failure("tags.map(x)"),
            "tags.map(x): map takes a variable and an expression of it, as tags.map(x, x * 2)"
        );
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
}
