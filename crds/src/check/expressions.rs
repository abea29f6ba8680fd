//! The names CEL expressions read, which the checker requires of the stream.

use std::collections::BTreeSet;

use cel::common::ast::{EntryExpr, Expr, IdedExpr};

/// The top-level names a CEL expression reads, or the parse error.
pub fn expression_variables(expression: &str) -> Result<BTreeSet<String>, String> {
    let program = cel::Program::compile(expression).map_err(|e| parse_error_message(&e))?;
    Ok(free_variables(program.expression()))
}

/// The names an expression reads that no comprehension in it binds: the
/// variables of `all`, `exists`, `map`, ... are in scope only in their macro.
pub(crate) fn free_variables(expression: &IdedExpr) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    collect(expression, &mut Vec::new(), &mut names);
    names
}

fn collect<'e>(expression: &'e IdedExpr, bound: &mut Vec<&'e str>, names: &mut BTreeSet<String>) {
    match &expression.expr {
        Expr::Ident(name) => {
            // `@`-names are the accumulators macros introduce.
            if !name.starts_with('@') && !bound.contains(&name.as_str()) {
                names.insert(name.clone());
            }
        }
        Expr::Select(select) => collect(&select.operand, bound, names),
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                collect(target, bound, names);
            }
            for arg in &call.args {
                collect(arg, bound, names);
            }
        }
        Expr::List(list) => {
            for element in &list.elements {
                collect(element, bound, names);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        collect(&entry.key, bound, names);
                        collect(&entry.value, bound, names);
                    }
                    EntryExpr::StructField(field) => collect(&field.value, bound, names),
                }
            }
        }
        Expr::Struct(structure) => {
            for entry in &structure.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(entry) => {
                        collect(&entry.key, bound, names);
                        collect(&entry.value, bound, names);
                    }
                    EntryExpr::StructField(field) => collect(&field.value, bound, names),
                }
            }
        }
        Expr::Comprehension(comprehension) => {
            // The range and the start are evaluated outside the loop's scope.
            collect(&comprehension.iter_range, bound, names);
            collect(&comprehension.accu_init, bound, names);
            let scope = bound.len();
            bound.push(&comprehension.accu_var);
            collect(&comprehension.result, bound, names);
            bound.push(&comprehension.iter_var);
            if let Some(second) = &comprehension.iter_var2 {
                bound.push(second);
            }
            collect(&comprehension.loop_cond, bound, names);
            collect(&comprehension.loop_step, bound, names);
            bound.truncate(scope);
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The variable that holds the whole event in expressions.
pub const EVENT_VARIABLE: &str = "event";

/// A CEL parse error as `line:column: message`, several joined by `; `. The
/// parser's own rendering adds an `ERROR: <input>:` prefix and a source snippet
/// over several lines, which reads as debug output inside one status message.
pub fn parse_error_message(errors: &cel::ParseErrors) -> String {
    let parts: Vec<String> = errors
        .errors
        .iter()
        .map(|e| format!("{}:{}: {}", e.pos.0, e.pos.1, plain_message(&e.msg)))
        .collect();
    if parts.is_empty() {
        "the expression does not parse".to_owned()
    } else {
        parts.join("; ")
    }
}

/// The parser's message in words: its token names (`'<EOF>'`, `NUM_INT`) mean
/// little to someone writing an expression.
fn plain_message(message: &str) -> String {
    let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
    let message = message
        .strip_prefix("Syntax error: ")
        .unwrap_or(&message)
        .to_owned();
    // ANTLR lists every token that may start an operand when one is missing.
    let expecting_operand = |set: &str| set.contains("IDENTIFIER") && set.contains("NUM_INT");
    if let Some((head, set)) = message.split_once(" expecting ")
        && expecting_operand(set)
    {
        return match head.strip_prefix("mismatched input ") {
            Some("'<EOF>'") => {
                "the expression ends where a value or field name is expected".to_owned()
            }
            Some(token) => format!("{token} is where a value or field name is expected"),
            None => format!("{head}: a value or field name is expected"),
        };
    }
    message.replace("'<EOF>'", "the end of the expression")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variables(expression: &str) -> Vec<String> {
        expression_variables(expression)
            .unwrap()
            .into_iter()
            .collect()
    }

    #[test]
    fn fields_and_the_roots_of_selections() {
        assert_eq!(
            variables("amount > 1 && customer.tier == 'gold'"),
            ["amount", "customer"]
        );
        assert_eq!(variables("event['order-id'] == 1"), ["event"]);
    }

    #[test]
    fn comprehension_variables_are_scoped_to_their_macro() {
        assert_eq!(variables("tags.exists(t, t == 'vip')"), ["tags"]);
        // The same name outside the macro is a field.
        assert_eq!(
            variables("tags.exists(t, t == 'vip') && t > 1"),
            ["t", "tags"]
        );
        // The range is read outside the macro's scope.
        assert_eq!(variables("x.all(x, x > 0)"), ["x"]);
        assert_eq!(
            variables("items.map(i, i.qty * price).all(v, v < limit)"),
            ["items", "limit", "price"]
        );
    }

    #[test]
    fn parse_errors_are_returned() {
        assert!(expression_variables("amount >").is_err());
    }

    #[test]
    fn parse_errors_are_one_line_with_positions() {
        let message = expression_variables("amount >").unwrap_err();
        assert!(!message.contains('\n'), "{message}");
        assert!(!message.contains("ERROR"), "{message}");
        assert!(message.starts_with("1:"), "{message}");
    }
}
