//! Finds processes that listen on a wildcard address. Pods share the host's
//! network here, so `0.0.0.0:PORT` in one pod takes PORT from every pod IP;
//! the kubelet warns about it instead of letting another pod fail obscurely.

use std::collections::HashSet;

/// TCP ports `pid` listens on at 0.0.0.0 or [::].
pub fn wildcard_listen_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: HashSet<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        ports.extend(parse_wildcard_listeners(&text, &inodes));
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Lines look like `sl local_address rem_address st ... uid timeout inode`,
/// with `local_address` as hex `ADDR:PORT` and `st` 0A for LISTEN.
fn parse_wildcard_listeners(table: &str, inodes: &HashSet<String>) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            let (addr, port) = local.split_once(':')?;
            let wildcard = addr.chars().all(|c| c == '0');
            (*state == "0A" && wildcard && inodes.contains(*inode))
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wildcard_listeners_of_the_process_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 0200017F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0
   2: 00000000:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0 100 0 0 10 0
   3: 00000000:1F93 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 444 1 0 100 0 0 10 0";
        let inodes: HashSet<String> = ["111", "222", "444"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(parse_wildcard_listeners(table, &inodes), vec![8080]);
    }

    #[test]
    fn sees_a_real_wildcard_listener() {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(wildcard_listen_ports(std::process::id()).contains(&port));
        let specific = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = specific.local_addr().unwrap().port();
        assert!(!wildcard_listen_ports(std::process::id()).contains(&port));
    }
}
