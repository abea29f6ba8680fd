//! `rekey`: changes the stream key to other fields. The event itself passes
//! unchanged: the key is where the stage writes it (on Kafka, the record key of
//! the repartition or sink topic, computed from the plan's key fields at the stage
//! output). The runner has already dead-lettered events lacking a key field,
//! because the plan lists the new key fields in the step's `requires`.

use crate::event::Event;
use crate::operator::{Ctx, Operator, Output};

pub struct Rekey;

impl Operator for Rekey {
    fn process(&mut self, event: Event, _ctx: &Ctx, out: &mut Output) {
        out.emit(event);
    }
}
