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
    let program = cel::Program::compile(expression).map_err(|e| e.to_string())?;
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
