//! Expressions shown as CEL source in messages, with the parentheses
//! precedence needs.

use cel::common::ast::operators;
use cel::common::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue};

pub(super) fn binary_symbol(function: &str) -> &'static str {
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

/// An expression as CEL source: macros are shown as written, not as the
/// comprehension they expand to.
pub(super) fn show(expression: &IdedExpr) -> String {
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
                _ if appends_element(comprehension) => "filter",
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

/// Whether a comprehension's step is `filter`'s: `p ? @result + [x] : @result`
/// with `x` the element itself (a `map` with a predicate appends what it makes).
fn appends_element(comprehension: &ComprehensionExpr) -> bool {
    let Expr::Call(step) = &comprehension.loop_step.expr else {
        return false;
    };
    if step.func_name != operators::CONDITIONAL || step.args.len() != 3 {
        return false;
    }
    let Expr::Call(append) = &step.args[1].expr else {
        return false;
    };
    matches!(
        append.args.get(1).map(|a| &a.expr),
        Some(Expr::List(list)) if matches!(
            list.elements.as_slice(),
            [element] if matches!(&element.expr, Expr::Ident(name) if *name == comprehension.iter_var)
        )
    )
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
