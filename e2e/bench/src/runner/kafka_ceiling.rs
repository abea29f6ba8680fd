//! S5/S6 against the consume-produce ceiling (issue 18): each round, the plain
//! loop on the same broker and input just before Keystone's run, and what that
//! run wrote. The arithmetic and the report's text are in crate::ceiling.

use super::Ctx;
use crate::ceiling::CeilingRound;
use crate::kafka::{CeilingArgs, CeilingRun, drive};
use crate::report::RunRecord;
use crate::scenario::{Engine, Scenario};

/// Whether a run is measured against the ceiling: Keystone's runs of S5 and S6.
pub(super) fn tracked(s: Scenario, engine: Engine) -> bool {
    matches!(s, Scenario::S5 | Scenario::S6) && engine == Engine::Keystone
}

/// The topic the loop copies into: recreated by each round's loop, deleted
/// after the scenario's rounds.
fn ceiling_topic(s: Scenario) -> String {
    format!("bench.{}.ceiling.out", s.id().to_ascii_lowercase())
}

/// Records in the input topic (all of them are copied); `events` when the
/// broker cannot say.
pub(super) fn input_records(ctx: &Ctx, source: &str, events: u64) -> u64 {
    match drive::records(&ctx.args.brokers, source) {
        Ok(Some((_, n))) if n > 0 => n as u64,
        _ => events,
    }
}

/// One run of the loop over every record of `source`.
pub(super) fn measure(
    ctx: &Ctx,
    s: Scenario,
    source: &str,
    records: u64,
) -> anyhow::Result<CeilingRun> {
    crate::kafka::measure_ceiling(&CeilingArgs {
        brokers: ctx.args.brokers.clone(),
        from: source.to_owned(),
        to: ceiling_topic(s),
        records,
    })
}

/// What Keystone's run wrote into the topics it created (its plan's: sink,
/// changelog, dead letters, repartition), counted before they are deleted.
/// S6 reads them back to leave transaction markers out.
pub(super) fn written(brokers: &str, topics: &[String], s: Scenario) -> CeilingRound {
    let mut c = CeilingRound::default();
    match drive::written(brokers, topics, s == Scenario::S6) {
        Ok((offsets, records)) => {
            c.offsets_written = Some(offsets);
            // Not read back: no transactions, so every offset is a data record.
            c.records_written = Some(records.unwrap_or(offsets));
        }
        Err(e) => c
            .errors
            .push(format!("counting the records written: {e:#}")),
    }
    c
}

/// Keystone's run record of the round completed with the round's ceiling.
pub(super) fn complete(
    s: Scenario,
    round: usize,
    rec: &mut RunRecord,
    ceiling: anyhow::Result<CeilingRun>,
    events: u64,
) {
    let c = rec.ceiling.get_or_insert_with(CeilingRound::default);
    match ceiling {
        Ok(run) => {
            c.copied = Some(run.records);
            c.records_per_s = Some(run.records_per_s).filter(|x| x.is_finite() && *x > 0.0);
        }
        Err(e) => c.errors.push(format!("the consume-produce loop: {e:#}")),
    }
    c.finish(events, rec.digest_ok.then_some(rec.events_per_s));
    eprintln!(
        "[{}] round {} ceiling {:.0} records/s; keystone wrote {:?} records ({:?} offsets), {:.3} per event: {:.3} of the ceiling{}",
        s.id(),
        round,
        c.records_per_s.unwrap_or(f64::NAN),
        c.records_written,
        c.offsets_written,
        c.records_per_event.unwrap_or(f64::NAN),
        c.fraction.unwrap_or(f64::NAN),
        if c.errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.errors.join("; "))
        }
    );
}

/// Deletes the loop's topic once the scenario's rounds are over.
pub(super) fn clean_up(ctx: &Ctx, s: Scenario) {
    if let Err(e) = drive::delete_topics(&ctx.args.brokers, &[ceiling_topic(s)], &[]) {
        eprintln!("deleting {}: {e:#}", ceiling_topic(s));
    }
}
