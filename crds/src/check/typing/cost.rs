//! The worst-case cost of evaluating an expression on one event, estimated as
//! cel-go estimates the CEL rules of a Kubernetes CRD: about one unit per node
//! evaluated, a tenth of a unit per byte a string or list operation goes
//! through, and a comprehension's body times the number of elements it
//! iterates over.
//!
//! Sizes are bytes of JSON. What an expression reads from the event is bounded
//! only by [`MAX_EVENT_BYTES`] (the schema says nothing of sizes), and a list of
//! `n` bytes has at most `n / 2` elements (`[0,0,…]`). The elements of a list
//! together are no larger than the list, so the estimate keeps the cost of a
//! body as a function of the size of its element (a [`Linear`] bound) and sums
//! it over the list: walking a nested structure costs its size once, not its
//! size times its length. Iterating over one event list inside another has no
//! such sum, and costs the product, which is what the limit is for.

use std::collections::HashMap;

use cel::common::ast::operators;
use cel::common::ast::{CallExpr, ComprehensionExpr, Expr, IdedEntryExpr, IdedExpr, LiteralValue};

use super::kinds::Type;
use super::source::show;
use crate::check::expressions::entry_parts;
use crate::check::limits::MAX_EVENT_BYTES;

/// Cost units per byte that a string or list operation goes through (cel-go's
/// `StringTraversalCostFactor`).
const TRAVERSAL: f64 = 0.1;
/// Cost units per byte of pattern and per byte of string that `matches`
/// spends: the interpreter compiles the pattern on every call, and the match
/// can take time in the product of the two (cel-go's regex factor is 0.25).
const REGEX: f64 = 0.25;
/// Cost units per byte of pattern that compiling it for `matches` spends.
const REGEX_COMPILE: f64 = 20.0;
/// Bytes of a number, bool, null, timestamp or duration: small and bounded.
const SMALL_BYTES: f64 = 32.0;

/// A bound that grows with the sizes of the comprehension variables in scope:
/// `constant + Σ coefficient × bytes(variable)`, variables by nesting level.
#[derive(Clone, Debug, Default, PartialEq)]
struct Linear {
    constant: f64,
    terms: Vec<(usize, f64)>,
}

impl Linear {
    fn constant(constant: f64) -> Self {
        Self {
            constant,
            terms: Vec::new(),
        }
    }

    fn variable(level: usize) -> Self {
        Self {
            constant: 0.0,
            terms: vec![(level, 1.0)],
        }
    }

    fn plus(&self, other: &Linear) -> Linear {
        let mut sum = self.clone();
        sum.constant += other.constant;
        for &(level, coefficient) in &other.terms {
            match sum.terms.iter_mut().find(|(l, _)| *l == level) {
                Some((_, c)) => *c += coefficient,
                None => sum.terms.push((level, coefficient)),
            }
        }
        sum
    }

    fn plus_constant(&self, constant: f64) -> Linear {
        self.plus(&Linear::constant(constant))
    }

    fn scaled(&self, factor: f64) -> Linear {
        Linear {
            constant: self.constant * factor,
            terms: self.terms.iter().map(|&(l, c)| (l, c * factor)).collect(),
        }
    }

    /// The most it can be, with every variable at its largest (`maxima` by level).
    fn bound(&self, maxima: &[f64]) -> f64 {
        self.terms
            .iter()
            .fold(self.constant, |sum, &(level, c)| sum + c * maxima[level])
    }

    /// A bound of both: sizes are never negative, so the larger coefficient of
    /// each term bounds the larger of the two.
    fn max(&self, other: &Linear) -> Linear {
        let mut max = self.clone();
        max.constant = max.constant.max(other.constant);
        for &(level, coefficient) in &other.terms {
            match max.terms.iter_mut().find(|(l, _)| *l == level) {
                Some((_, c)) => *c = c.max(coefficient),
                None => max.terms.push((level, coefficient)),
            }
        }
        max
    }

    /// Whichever bounds less at the variables' largest: a bound of the smaller.
    fn min(&self, other: &Linear, maxima: &[f64]) -> Linear {
        if self.bound(maxima) <= other.bound(maxima) {
            self.clone()
        } else {
            other.clone()
        }
    }

    /// A bound of the product: exact when one side is constant, else one side
    /// at its largest times the other.
    fn times(&self, other: &Linear, maxima: &[f64]) -> Linear {
        if self.terms.is_empty() {
            other.scaled(self.constant)
        } else if other.terms.is_empty() {
            self.scaled(other.constant)
        } else {
            other.scaled(self.bound(maxima))
        }
    }

    /// The part that does not depend on the variable at `level`, and the
    /// coefficient of that variable.
    fn split(&self, level: usize) -> (Linear, f64) {
        let mut rest = self.clone();
        let mut coefficient = 0.0;
        rest.terms.retain(|&(l, c)| {
            if l == level {
                coefficient += c;
                false
            } else {
                true
            }
        });
        (rest, coefficient)
    }
}

/// What a value may be as large as: its bytes of JSON, and how many elements
/// (or map keys) iterating over it visits.
#[derive(Clone, Debug)]
struct Size {
    bytes: Linear,
    items: Linear,
}

impl Size {
    /// A number, bool, null, timestamp or duration; nothing to iterate over.
    fn small() -> Size {
        Size {
            bytes: Linear::constant(SMALL_BYTES),
            items: Linear::default(),
        }
    }

    /// A value read from the event, of a type that may be large.
    fn event() -> Size {
        Size::of_bytes(Linear::constant(MAX_EVENT_BYTES as f64))
    }

    /// A value of at most `bytes` bytes: a list of them holds at most half as
    /// many elements (one byte and a comma each).
    fn of_bytes(bytes: Linear) -> Size {
        Size {
            items: bytes.scaled(0.5),
            bytes,
        }
    }

    fn max(&self, other: &Size) -> Size {
        Size {
            bytes: self.bytes.max(&other.bytes),
            items: self.items.max(&other.items),
        }
    }
}

/// The most costly iteration of an expression, for the message that refuses it.
#[derive(Clone, Debug)]
pub(super) struct Costliest {
    /// The comprehension, as CEL source (`tags.map(t, …)`).
    pub(super) at: String,
    /// The most times its body runs.
    pub(super) iterations: f64,
    /// The most all the runs of its body cost together.
    pub(super) total: f64,
}

/// The estimate of one expression.
#[derive(Clone, Debug)]
pub(super) struct Estimate {
    /// The most evaluating it costs on one event, in cost units.
    pub(super) cost: f64,
    /// How many comprehensions nest at most (0 without any).
    pub(super) nesting: usize,
    /// The comprehension that costs most, if any.
    pub(super) costliest: Option<Costliest>,
}

/// Estimates the cost of `expression`, whose parts have the `types` the typer
/// inferred. The expression must be no deeper than the depth limit (the walk
/// recurses once per level).
pub(super) fn estimate(expression: &IdedExpr, types: &HashMap<u64, Type>) -> Estimate {
    let mut estimator = Estimator {
        types,
        scopes: Vec::new(),
        maxima: Vec::new(),
        appended: Vec::new(),
        nesting: 0,
        max_nesting: 0,
        costliest: None,
    };
    let (cost, _) = estimator.part(expression);
    Estimate {
        cost: cost.bound(&estimator.maxima),
        nesting: estimator.max_nesting,
        costliest: estimator.costliest,
    }
}

struct Estimator<'t> {
    types: &'t HashMap<u64, Type>,
    /// Comprehension variables and accumulators in scope, innermost last.
    scopes: Vec<(String, Size)>,
    /// The largest size, in bytes, of the iteration variable of each level.
    maxima: Vec<f64>,
    /// Per comprehension being estimated: what its loop appends to its
    /// accumulator (`map` and `filter` build their result so).
    appended: Vec<(String, Option<Size>)>,
    nesting: usize,
    max_nesting: usize,
    costliest: Option<Costliest>,
}

impl Estimator<'_> {
    /// Whether the typer knows every value of `expression` to be small.
    fn small(&self, expression: &IdedExpr) -> bool {
        self.types.get(&expression.id).is_some_and(Type::is_small)
    }

    /// The size of a value of `expression`, or `size` unless it is small.
    fn sized(&self, expression: &IdedExpr, size: Size) -> Size {
        if self.small(expression) {
            Size::small()
        } else {
            size
        }
    }

    /// The cost and the size of one part.
    fn part(&mut self, expression: &IdedExpr) -> (Linear, Size) {
        match &expression.expr {
            Expr::Literal(literal) => {
                let size = match literal {
                    LiteralValue::String(s) => {
                        Size::of_bytes(Linear::constant(s.inner().len() as f64 + 2.0))
                    }
                    LiteralValue::Bytes(b) => {
                        Size::of_bytes(Linear::constant(b.inner().len() as f64 + 2.0))
                    }
                    _ => Size::small(),
                };
                // Constants are built when the expression is compiled.
                (Linear::default(), size)
            }
            Expr::Ident(name) => {
                let size = match self.scopes.iter().rev().find(|(bound, _)| bound == name) {
                    Some((_, size)) => size.clone(),
                    None => self.sized(expression, Size::event()),
                };
                (Linear::constant(1.0), size)
            }
            Expr::Select(select) => {
                let (cost, operand) = self.part(&select.operand);
                let size = if select.test {
                    Size::small()
                } else {
                    // A member is part of its object, no larger.
                    self.sized(expression, Size::of_bytes(operand.bytes))
                };
                (cost.plus_constant(1.0), size)
            }
            Expr::Call(call) => self.call(expression, call),
            Expr::List(list) => {
                let mut cost = Linear::constant(1.0 + list.elements.len() as f64);
                let mut bytes = Linear::constant(2.0 + list.elements.len() as f64);
                for element in &list.elements {
                    let (c, size) = self.part(element);
                    cost = cost.plus(&c);
                    bytes = bytes.plus(&size.bytes);
                }
                let items = Linear::constant(list.elements.len() as f64);
                (cost, Size { bytes, items })
            }
            Expr::Map(map) => self.entries(map.entries.iter()),
            Expr::Struct(structure) => self.entries(structure.entries.iter()),
            Expr::Comprehension(comprehension) => self.comprehension(expression, comprehension),
            Expr::Unspecified => (Linear::constant(1.0), Size::small()),
        }
    }

    fn entries<'e>(
        &mut self,
        entries: impl ExactSizeIterator<Item = &'e IdedEntryExpr>,
    ) -> (Linear, Size) {
        let count = entries.len() as f64;
        let mut cost = Linear::constant(1.0 + 2.0 * count);
        let mut bytes = Linear::constant(2.0 + 2.0 * count);
        for entry in entries {
            for part in entry_parts(entry) {
                let (c, size) = self.part(part);
                cost = cost.plus(&c);
                bytes = bytes.plus(&size.bytes);
            }
        }
        let items = Linear::constant(count);
        (cost, Size { bytes, items })
    }

    fn call(&mut self, expression: &IdedExpr, call: &CallExpr) -> (Linear, Size) {
        // Every operand is evaluated (the logical operators may skip one,
        // which the bound need not count on).
        let mut cost = Linear::constant(1.0);
        let mut operands = Vec::new();
        if let Some(target) = &call.target {
            let (c, size) = self.part(target);
            cost = cost.plus(&c);
            operands.push(size);
        }
        let first_argument = operands.len();
        for argument in &call.args {
            let (c, size) = self.part(argument);
            cost = cost.plus(&c);
            operands.push(size);
        }
        let arguments: Vec<&IdedExpr> =
            call.target.iter().map(|t| &**t).chain(&call.args).collect();
        let traverse = |size: &Size| size.bytes.scaled(TRAVERSAL);
        let largest = |operands: &[Size]| {
            operands
                .iter()
                .fold(Size::small(), |largest, size| largest.max(size))
        };
        let all_small = arguments.iter().all(|a| self.small(a));
        match (call.func_name.as_str(), operands.as_slice()) {
            (operators::CONDITIONAL, [_, then, otherwise]) => {
                (cost, self.sized(expression, then.max(otherwise)))
            }
            (
                operators::EQUALS
                | operators::NOT_EQUALS
                | operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS,
                [left, right],
            ) => {
                if !all_small {
                    // Comparing two strings or lists stops at the shorter one.
                    let shorter = left.bytes.min(&right.bytes, &self.maxima);
                    cost = cost.plus(&shorter.scaled(TRAVERSAL));
                }
                (cost, Size::small())
            }
            (operators::ADD, [left, right]) => {
                if self.small(expression) {
                    return (cost, Size::small());
                }
                let appends = matches!(
                    &arguments[0].expr,
                    Expr::Ident(name) if self.appended.last().is_some_and(|(accumulator, _)| accumulator == name)
                );
                if appends {
                    // `@result + [x]` in a `map` or `filter` appends in place.
                    if let Some((_, appended)) = self.appended.last_mut() {
                        *appended = Some(match appended.take() {
                            Some(earlier) => earlier.max(right),
                            None => right.clone(),
                        });
                    }
                    return (cost, left.clone());
                }
                // Concatenation copies both.
                let bytes = left.bytes.plus(&right.bytes);
                cost = cost.plus(&bytes.scaled(TRAVERSAL));
                let items = left.items.plus(&right.items);
                (cost, Size { bytes, items })
            }
            (operators::INDEX | operators::OPT_INDEX, [container, key]) => {
                if !self.small(arguments[1]) {
                    cost = cost.plus(&traverse(key));
                }
                (
                    cost,
                    self.sized(expression, Size::of_bytes(container.bytes.clone())),
                )
            }
            (operators::OPT_SELECT, [operand, _]) => (
                cost,
                self.sized(expression, Size::of_bytes(operand.bytes.clone())),
            ),
            (operators::IN, [element, container]) => {
                // A list is searched element by element, each compared with
                // `element` up to the size of either; a map hashes the key.
                cost = cost
                    .plus(&container.items)
                    .plus(&traverse(container))
                    .plus(&traverse(element));
                (cost, Size::small())
            }
            ("size", [operand]) => {
                // The size of a string counts its characters.
                (cost.plus(&traverse(operand)), Size::small())
            }
            ("contains" | "startsWith" | "endsWith", [text, part]) if first_argument == 1 => (
                cost.plus(&traverse(text)).plus(&traverse(part)),
                Size::small(),
            ),
            ("matches", [text, pattern]) => {
                // The pattern is compiled on every call (about 2 µs per byte
                // of pattern); matching may take the product of the
                // pattern's and the text's lengths.
                let compile = pattern.bytes.scaled(REGEX_COMPILE);
                let matching = traverse(text).times(
                    &pattern.bytes.scaled(REGEX).max(&Linear::constant(1.0)),
                    &self.maxima,
                );
                (cost.plus(&compile).plus(&matching), Size::small())
            }
            (
                "string" | "bytes" | "int" | "uint" | "double" | "bool" | "timestamp" | "duration"
                | "dyn" | "type",
                [operand],
            ) => {
                // Conversions parse or copy their operand.
                let size = self.sized(expression, operand.clone());
                (cost.plus(&traverse(operand)), size)
            }
            (getter, _) if getter.starts_with("get") => {
                // Timestamp and duration accessors; a time zone is parsed.
                let zones: Vec<Linear> = operands[first_argument..].iter().map(traverse).collect();
                let cost = zones.iter().fold(cost, |cost, zone| cost.plus(zone));
                (cost, Size::small())
            }
            _ => {
                // The rest (the logical operators, arithmetic, optionals, and
                // functions the interpreter lacks) cost a unit and return at
                // most their largest operand.
                let size = self.sized(expression, largest(&operands));
                (cost, size)
            }
        }
    }

    fn comprehension(
        &mut self,
        expression: &IdedExpr,
        comprehension: &ComprehensionExpr,
    ) -> (Linear, Size) {
        let (range_cost, range) = self.part(&comprehension.iter_range);
        let (init_cost, init) = self.part(&comprehension.accu_init);
        // `map` and `filter` start from an empty list and append to it.
        let builds_list =
            matches!(&comprehension.accu_init.expr, Expr::List(list) if list.elements.is_empty());

        let level = self.maxima.len();
        self.maxima.push(range.bytes.bound(&self.maxima));
        let scope = self.scopes.len();
        self.scopes.push((
            comprehension.iter_var.clone(),
            Size::of_bytes(Linear::variable(level)),
        ));
        if let Some(second) = &comprehension.iter_var2 {
            self.scopes
                .push((second.clone(), Size::of_bytes(Linear::variable(level))));
        }
        self.scopes
            .push((comprehension.accu_var.clone(), init.clone()));
        self.appended.push((comprehension.accu_var.clone(), None));
        self.nesting += 1;
        self.max_nesting = self.max_nesting.max(self.nesting);
        let (condition, _) = self.part(&comprehension.loop_cond);
        let (step, _) = self.part(&comprehension.loop_step);
        self.nesting -= 1;
        let appended = self.appended.pop().and_then(|(_, appended)| appended);
        self.scopes.truncate(scope);

        // One run of the body: binding the element, the condition, the step.
        let each = condition.plus(&step).plus_constant(1.0);
        let iterations = range.items.clone();
        let loop_cost = self.sum(&each, &iterations, &range.bytes, level);
        let accumulator = match (builds_list, appended) {
            (true, Some(element)) => {
                // The appended `[x]` is x and its brackets; in the list, x and a comma.
                let per_element = element.bytes.plus_constant(-1.0);
                Size {
                    bytes: self
                        .sum(&per_element, &iterations, &range.bytes, level)
                        .plus_constant(2.0),
                    items: iterations.clone(),
                }
            }
            _ => init,
        };

        self.maxima.pop();
        let total = loop_cost.bound(&self.maxima);
        if self.costliest.as_ref().is_none_or(|c| c.total < total) {
            self.costliest = Some(Costliest {
                at: show(expression),
                iterations: iterations.bound(&self.maxima),
                total,
            });
        }

        self.scopes
            .push((comprehension.accu_var.clone(), accumulator));
        let (result_cost, result) = self.part(&comprehension.result);
        self.scopes.truncate(scope);
        let cost = range_cost
            .plus(&init_cost)
            .plus(&loop_cost)
            .plus(&result_cost);
        (cost, self.sized(expression, result))
    }

    /// A bound of `each` summed over the elements of a range of `bytes` bytes
    /// and at most `iterations` elements, `each` depending on the size of the
    /// element (the variable at `level`): the elements together are no larger
    /// than the range.
    fn sum(&self, each: &Linear, iterations: &Linear, bytes: &Linear, level: usize) -> Linear {
        let (fixed, per_byte) = each.split(level);
        iterations
            .times(&fixed, &self.maxima)
            .plus(&bytes.scaled(per_byte))
    }
}

#[cfg(test)]
mod tests {
    use super::super::inference::type_of;
    use super::super::testing::schema;
    use super::*;

    fn estimate_of(source: &str) -> Estimate {
        let program = cel::Program::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        let typed = type_of(program.expression(), &schema(true));
        estimate(program.expression(), &typed.types)
    }

    fn cost(source: &str) -> f64 {
        estimate_of(source).cost
    }

    const EVENT: f64 = MAX_EVENT_BYTES as f64;

    #[test]
    fn scalar_expressions_cost_a_unit_per_node() {
        assert_eq!(cost("1"), 0.0);
        assert_eq!(cost("count > 1"), 2.0);
        assert_eq!(cost("count + 1 > amount * 2"), 5.0);
        assert!(cost("paid && !paid || count == 1") < 20.0);
    }

    #[test]
    fn strings_cost_their_length() {
        // A string from the event may be as long as the event.
        let c = cost("name.contains('x')");
        assert!(c > EVENT * TRAVERSAL && c < EVENT * TRAVERSAL + 10.0, "{c}");
        // Comparing with a literal stops at the literal's end.
        assert!(cost("name == 'gold'") < 10.0);
    }

    #[test]
    fn one_pass_over_an_event_list_is_linear_in_the_event() {
        let c = cost("tags.exists(t, t == 'vip')");
        assert!(c > EVENT / 2.0 && c < EVENT * 10.0, "{c}");
        // Walking nested lists visits every byte once, however deep.
        let nested = cost("tags.all(t, t.all(u, u.all(v, v.contains('x'))))");
        assert!(nested < EVENT * 30.0, "{nested}");
        assert!(nested < MAX_EXPRESSION_COST_F, "{nested}");
        assert_eq!(
            estimate_of("tags.all(t, t.all(u, u.all(v, v.contains('x'))))").nesting,
            3
        );
    }

    const MAX_EXPRESSION_COST_F: f64 = crate::check::limits::MAX_EXPRESSION_COST as f64;

    #[test]
    fn iterations_inside_iterations_over_the_event_multiply() {
        let quadratic = estimate_of("tags.exists(a, tags.exists(b, a == b))");
        assert!(quadratic.cost > EVENT * EVENT / 8.0, "{}", quadratic.cost);
        let costliest = quadratic.costliest.unwrap();
        assert_eq!(costliest.at, "tags.exists(a, …)");
        assert_eq!(costliest.iterations, EVENT / 2.0);
        // `in` searches the list.
        assert!(cost("tags.exists(t, t in tags)") > EVENT * EVENT / 8.0);
        // The four nested maps.
        assert!(cost("tags.map(a, tags.map(b, tags.map(c, tags.map(d, a + b + c + d))))") > 1e20);
    }

    #[test]
    fn literal_lists_have_their_length() {
        let c = cost("[1, 2, 3].map(x, x * 2)");
        assert!(c < 40.0, "{c}");
        // Nested over literals: the product of small lengths.
        let c = cost("[1, 2, 3].map(a, [4, 5].map(b, a * b))");
        assert!(c < 200.0, "{c}");
        // A literal list of event strings is still two elements long.
        let c = cost("[name, customer.id].exists(s, s.contains('x'))");
        assert!(c < EVENT * 3.0 * TRAVERSAL, "{c}");
    }

    #[test]
    fn map_results_are_as_large_as_what_they_build() {
        // A map over a literal builds a short list; iterating over it is cheap.
        assert!(cost("[1, 2].map(x, x).exists(y, y > 1)") < 100.0);
        // A map over the event builds a list the size of the event's.
        let c = cost("tags.map(x, name).exists(y, y.contains('a'))");
        assert!(c > EVENT * EVENT / 100.0, "{c}");
    }

    #[test]
    fn numbers_in_bodies_cost_nothing_per_byte() {
        // `count` is an integer: adding it copies nothing.
        let typed = cost("tags.map(t, count + 1)");
        let dynamic = cost("tags.map(t, extra + name)");
        assert!(typed < EVENT * 5.0, "{typed}");
        assert!(dynamic > EVENT * EVENT / 100.0, "{dynamic}");
    }

    #[test]
    fn patterns_are_compiled_per_call() {
        assert!(cost("name.matches('^a+$')") < EVENT);
        // A pattern read from the event compiles something the size of the event.
        assert!(cost("name.matches(note)") > EVENT * 5.0);
        // In a loop over the event, even a literal pattern costs its compilation each time.
        assert!(cost("tags.exists(t, t.matches('^v[0-9]+$'))") > EVENT * 10.0);
    }
}
