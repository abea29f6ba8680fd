//! `filter`: keeps the events for which a CEL expression is `true`.
//!
//! - `true`: the event passes unchanged.
//! - `false`: the event is dropped (counted in `dropped`).
//! - any other result, or an evaluation error (a referenced field missing, a type
//!   error such as `"a" > 1`): dead letter with the reason.

use keystone_crds::ops::FilterSpec;

use crate::error::RuntimeError;
use crate::event::Event;
use crate::expr::{Bindings, Expr, cel_type_name};
use crate::operator::{Ctx, Operator, Output};

pub struct Filter {
    expr: Expr,
    bindings: Bindings,
}

impl Filter {
    pub fn new(spec: &FilterSpec) -> Result<Self, RuntimeError> {
        let expr = Expr::compile(&spec.expression)?;
        let bindings = Bindings::new([&expr]);
        Ok(Self { expr, bindings })
    }
}

impl Operator for Filter {
    fn process(&mut self, event: Event, _ctx: &Ctx, out: &mut Output) {
        let result = self
            .bindings
            .with_scope(&event.value, |scope| self.expr.execute(scope));
        match result {
            Ok(cel::Value::Bool(true)) => out.emit(event),
            Ok(cel::Value::Bool(false)) => out.drop_event(event),
            Ok(other) => {
                let reason = format!(
                    "filter expression {:?} returned a {}, not a bool",
                    self.expr.source,
                    cel_type_name(&other)
                );
                out.dead_letter(event, reason)
            }
            Err(e) => {
                let reason = format!("filter expression {:?} failed: {e}", self.expr.source);
                out.dead_letter(event, reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{events, run};

    #[test]
    fn keeps_true_drops_false_dead_letters_the_rest() {
        let mut filter = Filter::new(&FilterSpec {
            expression: "amount > 100".into(),
        })
        .unwrap();
        let out = run(
            &mut filter,
            events(&[
                r#"{"amount":150}"#,
                r#"{"amount":50}"#,
                r#"{"amount":"x"}"#,
                r#"{"other":1}"#,
            ]),
        );
        assert_eq!(out.json(), vec![r#"{"amount":150}"#]);
        assert_eq!(out.dropped, 1);
        assert_eq!(out.dead.len(), 2);
        assert!(
            out.dead[0].reason.contains("failed"),
            "{}",
            out.dead[0].reason
        );
        assert!(
            out.dead[1].reason.contains("amount"),
            "{}",
            out.dead[1].reason
        );
    }

    #[test]
    fn non_boolean_results_are_dead_letters() {
        let mut filter = Filter::new(&FilterSpec {
            expression: "amount".into(),
        })
        .unwrap();
        let out = run(&mut filter, events(&[r#"{"amount":1}"#]));
        assert_eq!(
            out.dead[0].reason,
            r#"filter expression "amount" returned a int, not a bool"#
        );
    }
}
