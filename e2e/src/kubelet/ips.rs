//! Pod IPs: every pod gets its own loopback address, so two pods can listen on
//! the same port (all of 127.0.0.0/8 is bindable on Linux without setup).

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// Hands out 127.N.x.y addresses (N = `net`, 1 by default), skipping those
/// in use. Two testbeds on one machine use different N.
#[derive(Debug)]
pub struct IpPool {
    base: u32,
    used: HashSet<Ipv4Addr>,
    next: u32,
}

const SIZE: u32 = 65_000;

impl Default for IpPool {
    fn default() -> Self {
        Self::new(1)
    }
}

impl IpPool {
    pub fn new(net: u8) -> Self {
        Self {
            base: u32::from_be_bytes([127, net, 0, 2]),
            used: HashSet::new(),
            next: 0,
        }
    }

    /// Takes `wanted` (an address the pod already had, e.g. before a kubelet
    /// restart) if it is a free loopback address, else the next free one.
    pub fn allocate(&mut self, wanted: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(ip) = wanted.filter(|ip| ip.is_loopback() && !self.used.contains(ip)) {
            self.used.insert(ip);
            return Some(ip);
        }
        for _ in 0..SIZE {
            let ip = Ipv4Addr::from(self.base + self.next);
            self.next = (self.next + 1) % SIZE;
            // .0 and .255 work on loopback but look like network/broadcast
            // addresses to people reading logs.
            if matches!(ip.octets()[3], 0 | 255) {
                continue;
            }
            if self.used.insert(ip) {
                return Some(ip);
            }
        }
        None
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_addresses_and_reuses_a_wanted_one() {
        let mut pool = IpPool::default();
        let a = pool.allocate(None).unwrap();
        let b = pool.allocate(None).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, Ipv4Addr::new(127, 1, 0, 2));
        let wanted = Ipv4Addr::new(127, 1, 9, 9);
        assert_eq!(pool.allocate(Some(wanted)), Some(wanted));
        // Taken: falls back to a fresh one.
        assert_ne!(pool.allocate(Some(wanted)), Some(wanted));
        pool.release(a);
        assert_eq!(pool.allocate(Some(a)), Some(a));
        assert_eq!(
            IpPool::new(7).allocate(None),
            Some(Ipv4Addr::new(127, 7, 0, 2))
        );
    }
}
