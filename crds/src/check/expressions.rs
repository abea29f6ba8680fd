//! The names CEL expressions read, which the checker requires of the stream.

use std::collections::BTreeSet;

/// Names of comprehension variables (`items.all(x, ...)`), which CEL reports as
/// references but which are not event fields.
fn comprehension_variables(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for macro_name in ["all(", "exists(", "exists_one(", "map(", "filter("] {
        for (index, _) in expression.match_indices(macro_name) {
            let preceded_by_dot = expression[..index].trim_end().ends_with('.');
            if !preceded_by_dot {
                continue;
            }
            let rest = &expression[index + macro_name.len()..];
            if let Some((var, _)) = rest.split_once(',') {
                let var = var.trim();
                if !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    names.insert(var.to_owned());
                }
            }
        }
    }
    names
}

/// The top-level names a CEL expression reads, or the parse error.
pub fn expression_variables(expression: &str) -> Result<BTreeSet<String>, String> {
    let program = cel::Program::compile(expression).map_err(|e| parse_error_message(&e))?;
    let iter_vars = comprehension_variables(expression);
    Ok(program
        .references()
        .variables()
        .into_iter()
        .filter(|name| !iter_vars.contains(*name))
        .map(str::to_owned)
        .collect())
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

    #[test]
    fn parse_errors_are_one_line_with_positions() {
        let message = expression_variables("amount >").unwrap_err();
        assert!(!message.contains('\n'), "{message}");
        assert!(!message.contains("ERROR"), "{message}");
        assert!(message.starts_with("1:"), "{message}");
    }
}
