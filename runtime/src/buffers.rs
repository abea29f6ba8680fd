//! How much held-back input one runtime instance may keep: the events `order`
//! steps hold, over every partition and stage of the process. Past the limit
//! the instance stops reading input (backpressure) until timers have released
//! enough; nothing is dropped and nothing leaves early.

use std::str::FromStr;

/// The limit when none is given and the container's memory limit is unknown.
pub const DEFAULT_LIMIT: u64 = 256 * 1024 * 1024;

/// Where cgroup v2 shows the container's memory limit.
const CGROUP_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";

/// A size in bytes, as `268435456`, `256MiB` or `1 GiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Size, String> {
        let size = text
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|e| format!("{text:?} is not a size like 256MiB: {e}"))?;
        if size.as_u64() == 0 {
            return Err(format!("{text:?}: the limit must be above zero"));
        }
        Ok(Size(size.as_u64()))
    }
}

/// Half the container's memory limit, when cgroup v2 shows one; else
/// [`DEFAULT_LIMIT`]. Held events are the part of an instance's memory that
/// grows with its input; the other half is for everything else.
pub fn default_limit() -> u64 {
    std::fs::read_to_string(CGROUP_MEMORY_MAX)
        .ok()
        .and_then(|text| limit_from_memory_max(&text))
        .unwrap_or(DEFAULT_LIMIT)
}

fn limit_from_memory_max(text: &str) -> Option<u64> {
    // "max" when the container has no limit.
    text.trim().parse::<u64>().ok().map(|bytes| bytes / 2)
}

/// Whether intake should be paused for the buffers: on above the limit, off
/// again below nine tenths of it, so that it does not flap on every event.
#[derive(Debug)]
pub struct IntakeGate {
    limit: u64,
    full: bool,
}

impl IntakeGate {
    pub fn new(limit: u64) -> IntakeGate {
        IntakeGate { limit, full: false }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Updates the gate with the bytes held now; returns whether it is full.
    pub fn update(&mut self, buffered: u64) -> bool {
        if buffered > self.limit {
            self.full = true;
        } else if buffered < self.limit / 10 * 9 {
            self.full = false;
        }
        self.full
    }

    pub fn is_full(&self) -> bool {
        self.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_units() {
        assert_eq!("268435456".parse::<Size>(), Ok(Size(268_435_456)));
        assert_eq!("256MiB".parse::<Size>(), Ok(Size(256 << 20)));
        assert_eq!("1 GiB".parse::<Size>(), Ok(Size(1 << 30)));
        assert!("0".parse::<Size>().is_err());
        let error = "lots".parse::<Size>().unwrap_err();
        assert!(error.contains("\"lots\""), "{error}");
    }

    #[test]
    fn the_default_is_half_the_containers_memory_limit() {
        assert_eq!(limit_from_memory_max("536870912\n"), Some(268_435_456));
        assert_eq!(limit_from_memory_max("max\n"), None);
    }

    #[test]
    fn the_gate_closes_above_the_limit_and_opens_below_nine_tenths() {
        let mut gate = IntakeGate::new(1000);
        assert!(!gate.update(1000));
        assert!(gate.update(1001));
        assert!(
            gate.update(950),
            "between nine tenths and the limit: still full"
        );
        assert!(!gate.update(899));
        assert!(!gate.update(950));
    }
}
