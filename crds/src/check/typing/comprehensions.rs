//! Comprehensions, which the macros (`all`, `exists`, `exists_one`, `map`,
//! `filter`) expand to, and the scope of their variables.

use cel::common::ast::{ComprehensionExpr, IdedExpr};

use super::inference::Typer;
use super::kinds::{Kind, MapShape, STRING, Type};

impl Typer<'_> {
    pub(super) fn comprehension(
        &mut self,
        expression: &IdedExpr,
        comprehension: &ComprehensionExpr,
    ) -> Type {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{failure, ty};

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
        assert_eq!(
            failure("count.filter(x, x > 0)"),
            "count.filter(x, …): only lists and maps can be iterated, not int"
        );
        assert_eq!(
            failure("count.map(x, x > 0, x + 1)"),
            "count.map(x, …): only lists and maps can be iterated, not int"
        );
        assert_eq!(ty("[].all(x, x + 'a')"), "bool");
    }
}
