//! The names CEL expressions read, which the checker requires of the stream.

use std::collections::BTreeSet;

use cel::common::ast::{EntryExpr, Expr, IdedEntryExpr, IdedExpr};

use super::limits::{MAX_BRACKET_NESTING, MAX_EXPRESSION_DEPTH, MAX_EXPRESSION_LENGTH};

/// The top-level names a CEL expression reads, or why it cannot be compiled.
pub fn expression_variables(expression: &str) -> Result<BTreeSet<String>, String> {
    let program = compile_bounded(expression)?;
    Ok(free_variables(program.expression()))
}

/// Compiles an expression within the limits that keep the parser, the checker
/// and the interpreter, which all recurse once per level of an expression, in
/// a thread's stack, and the parser's time in bounds: an expression too long
/// or with brackets nested too deeply is refused before it is parsed, one
/// whose parts nest too deeply (`a + b + c + …`) right after. The error says
/// what is wrong and what to do.
pub fn compile_bounded(expression: &str) -> Result<cel::Program, String> {
    let length = expression.chars().count();
    if length > MAX_EXPRESSION_LENGTH {
        return Err(format!(
            "the CEL expression is {length} characters long, over the limit of {MAX_EXPRESSION_LENGTH}; split the work across several steps"
        ));
    }
    if let Some(column) = bracket_nesting_exceeded(expression, MAX_BRACKET_NESTING) {
        return Err(format!(
            "the CEL expression nests brackets more than {MAX_BRACKET_NESTING} deep (at character {column}); split the work across several steps"
        ));
    }
    // The parser recurses once or more per level of an expression, and within
    // the length limit a chain such as `a + b + …` nests two thousand levels:
    // more than a small thread's stack holds in a debug build (the operator
    // checks on 2 MiB ones). So it parses on a thread of its own with room for
    // any expression within the length limit; a too-deep tree is dropped
    // there too (dropping recurses as well), and a panic of the parser is an
    // error, not a crash.
    let parse = || {
        let program = cel::Program::compile(expression).map_err(|e| {
            format!(
                "the CEL expression does not parse: {}",
                parse_error_message(&e)
            )
        })?;
        if depth(program.expression(), MAX_EXPRESSION_DEPTH) > MAX_EXPRESSION_DEPTH {
            return Err(format!(
                "the CEL expression nests more than {MAX_EXPRESSION_DEPTH} levels deep (a chain such as `a + b + c + …` nests one level per operator); test one field against many values with `field in [a, b, c]` rather than a chain of `||`, or split the work across several steps"
            ));
        }
        Ok(program)
    };
    std::thread::scope(|scope| {
        let parser = std::thread::Builder::new()
            .name("cel-parser".to_owned())
            .stack_size(PARSER_STACK_BYTES)
            .spawn_scoped(scope, parse)
            .map_err(|e| format!("cannot start a thread to parse the CEL expression: {e}"))?;
        parser
            .join()
            .map_err(|_| "the CEL parser failed on this expression".to_owned())?
    })
}

/// The stack of the thread that parses an expression: the parser of a debug
/// build needs about 4 KiB per level, and an expression within the length
/// limit nests at most about 2,000. Only the pages touched are allocated.
const PARSER_STACK_BYTES: usize = 64 << 20;

/// The character (1-based) where `(`, `[` and `{` outside string literals first
/// nest deeper than `limit`, if they do. CEL strings are quoted with `'`, `"`
/// or three of either, and escape with a backslash unless raw (`r'…'`).
fn bracket_nesting_exceeded(expression: &str, limit: usize) -> Option<usize> {
    let chars: Vec<char> = expression.chars().collect();
    let mut depth = 0usize;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '(' | '[' | '{' => {
                depth += 1;
                if depth > limit {
                    return Some(i + 1);
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            quote @ ('\'' | '"') => {
                let raw = i > 0 && matches!(chars[i - 1], 'r' | 'R');
                let triple = chars.get(i + 1) == Some(&quote) && chars.get(i + 2) == Some(&quote);
                let closing = if triple { 3 } else { 1 };
                i += closing;
                // To the closing quote(s), or the end of an unterminated string.
                while i < chars.len() {
                    if chars[i] == '\\' && !raw {
                        i += 2;
                        continue;
                    }
                    if chars[i] == quote && (0..closing).all(|k| chars.get(i + k) == Some(&quote)) {
                        i += closing - 1;
                        break;
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// How deeply `expression` nests, counting no further than `limit + 1`: the
/// walk itself recurses at most that deep, whatever the expression.
pub(crate) fn depth(expression: &IdedExpr, limit: usize) -> usize {
    fn walk(expression: &IdedExpr, level: usize, limit: usize) -> usize {
        if level > limit {
            return level;
        }
        let children: Vec<&IdedExpr> = match &expression.expr {
            Expr::Select(select) => vec![&*select.operand],
            Expr::Call(call) => call.target.iter().map(|t| &**t).chain(&call.args).collect(),
            Expr::List(list) => list.elements.iter().collect(),
            Expr::Map(map) => map.entries.iter().flat_map(entry_parts).collect(),
            Expr::Struct(structure) => structure.entries.iter().flat_map(entry_parts).collect(),
            Expr::Comprehension(c) => vec![
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ],
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
        };
        children
            .into_iter()
            .map(|child| walk(child, level + 1, limit))
            .max()
            .unwrap_or(level)
    }
    walk(expression, 1, limit)
}

/// The expressions of a map or struct entry.
pub(crate) fn entry_parts(entry: &IdedEntryExpr) -> Vec<&IdedExpr> {
    match &entry.expr {
        EntryExpr::MapEntry(entry) => vec![&entry.key, &entry.value],
        EntryExpr::StructField(field) => vec![&field.value],
    }
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

/// The parser's message for mistakes people coming from SQL or other languages
/// make, said in CEL's terms.
fn common_mistake(message: &str) -> Option<String> {
    let token = ["mismatched input ", "extraneous input "]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next());
    let replacement = match token {
        Some("'and'") => Some(("and", "&&")),
        Some("'or'") => Some(("or", "||")),
        Some("'not'") => Some(("not", "!")),
        Some("'AND'") => Some(("AND", "&&")),
        Some("'OR'") => Some(("OR", "||")),
        Some("'NOT'") => Some(("NOT", "!")),
        _ => None,
    };
    if let Some((word, operator)) = replacement {
        return Some(format!("`{word}` is not a CEL operator: write {operator}"));
    }
    if message.starts_with("token recognition error at: '=") {
        return Some("`=` alone is not a CEL operator: compare with ==".to_owned());
    }
    if message.starts_with("invalid argument to has() macro") {
        return Some(
            "has() takes a field of an object, as has(customer.tier), or has(event.region) for a top-level field".to_owned(),
        );
    }
    None
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
    if let Some(plain) = common_mistake(&message) {
        return plain;
    }
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
        assert!(
            message.starts_with("the CEL expression does not parse: 1:"),
            "{message}"
        );
    }

    #[test]
    fn mistakes_from_other_languages_are_named() {
        let message = |source: &str| expression_variables(source).unwrap_err();
        assert!(
            message("status == 'paid' and amount > 1")
                .ends_with("`and` is not a CEL operator: write &&"),
            "{}",
            message("status == 'paid' and amount > 1")
        );
        assert!(message("a or b").ends_with("`or` is not a CEL operator: write ||"));
        assert!(
            message("status = 'paid'").contains("`=` alone is not a CEL operator: compare with =="),
            "{}",
            message("status = 'paid'")
        );
        assert!(
            message("has(region)").ends_with("has(event.region) for a top-level field"),
            "{}",
            message("has(region)")
        );
    }

    #[test]
    fn a_huge_expression_is_refused_before_it_is_parsed() {
        // 24 MB: the parser would take minutes and gigabytes.
        let huge = "seq == 0 || ".repeat(2 << 20) + "true";
        let message = compile_bounded(&huge).unwrap_err();
        assert_eq!(
            message,
            format!(
                "the CEL expression is {} characters long, over the limit of 4096; split the work across several steps",
                huge.len()
            )
        );
    }

    #[test]
    fn deep_brackets_are_refused_before_they_are_parsed() {
        // The parser recurses several frames per bracket: thousands of them
        // overflow any thread's stack, a few dozen a small one's.
        for open in ["(", "[", "{'k': "] {
            let source = format!("{}1", open.repeat(500));
            let message = compile_bounded(&source).unwrap_err();
            assert!(
                message.starts_with("the CEL expression nests brackets more than 16 deep"),
                "{source:.20}: {message}"
            );
        }
        // Up to the limit is fine.
        let source = format!("{}1{}", "(".repeat(16), ")".repeat(16));
        assert!(compile_bounded(&source).is_ok());
        // Brackets in strings are text.
        let source = format!(
            "name == '{}' || name == \"{}\"",
            "(".repeat(40),
            "[".repeat(40)
        );
        assert!(compile_bounded(&source).is_ok(), "{source}");
        let source = format!("name == r'\\' && {}1{}", "(".repeat(17), ")".repeat(17));
        assert!(compile_bounded(&source).is_err(), "{source}");
        let source = format!(
            "name == '''it's''' && {}1{}",
            "(".repeat(17),
            ")".repeat(17)
        );
        assert!(compile_bounded(&source).is_err(), "{source}");
    }

    #[test]
    fn long_operator_chains_are_refused_after_parsing() {
        // Within the length limit, `+` nests one level per operator.
        let source = format!("a{}", " + a".repeat(1000));
        let message = compile_bounded(&source).unwrap_err();
        assert!(
            message.starts_with("the CEL expression nests more than 64 levels deep"),
            "{message}"
        );
        let source = format!("a{}", ".b".repeat(2000));
        assert!(compile_bounded(&source).is_err());
        // The parser balances `||` and `&&` chains.
        let source = format!("a == 0{}", " || a == 1".repeat(300));
        assert!(compile_bounded(&source).is_ok());
        assert!(compile_bounded(&format!("a{}", " + a".repeat(60))).is_ok());
    }

    #[test]
    fn depth_counts_to_one_past_the_limit() {
        let program = cel::Program::compile("a.b.c").unwrap();
        assert_eq!(depth(program.expression(), 10), 3);
        let deep = format!("a{}", ".b".repeat(40));
        let program = cel::Program::compile(&deep).unwrap();
        assert_eq!(depth(program.expression(), 10), 11);
        assert_eq!(depth(program.expression(), 100), 41);
    }
}
