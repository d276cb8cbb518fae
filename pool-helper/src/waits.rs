//! What the daemon says while a domain's start waits for a master (issue 12, item 5): libvirt
//! shows the hook's stderr only when the start fails, so the wait is told in the daemon's log
//! (the journal under systemd) and in `status`: the domains that wait, and the fetch's progress
//! at a bounded rate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one progress line per fetch this often in the daemon's log.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Most domains one fetch lists as waiting (more are counted by the requests, not listed).
pub const MAX_WAITING: usize = 64;

/// `" for domain 'a'"`, `" for domains 'a', 'b'"`, or nothing.
pub fn for_domains(domains: &[String]) -> String {
    match domains {
        [] => String::new(),
        [one] => format!(" for the start of domain '{one}'"),
        many => {
            let names: Vec<String> = many.iter().map(|d| format!("'{d}'")).collect();
            format!(" for the start of domains {}", names.join(", "))
        }
    }
}

/// Adds `domain` to those waiting (each name once, at most [`MAX_WAITING`]).
pub fn add(domains: &mut Vec<String>, domain: &str) {
    if domains.len() < MAX_WAITING && !domains.iter().any(|d| d == domain) {
        domains.push(domain.to_string());
    }
}

/// Removes `domain` from those waiting (its request ended).
pub fn remove(domains: &mut Vec<String>, domain: &str) {
    domains.retain(|d| d != domain);
}

/// Whether a progress line is due: the first report, then one per `every`.
#[derive(Debug)]
pub struct Every {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl Every {
    pub fn new(every: Duration) -> Self {
        Every { every, last: Mutex::new(None) }
    }

    pub fn due(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if now.saturating_duration_since(t) < self.every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waiting_domains_read_as_one_phrase() {
        assert_eq!(for_domains(&[]), "");
        assert_eq!(for_domains(&["vm1".into()]), " for the start of domain 'vm1'");
        assert_eq!(for_domains(&["a".into(), "b".into()]), " for the start of domains 'a', 'b'");
    }

    #[test]
    fn each_domain_waits_once_and_the_list_is_bounded() {
        let mut v = Vec::new();
        add(&mut v, "vm1");
        add(&mut v, "vm1");
        assert_eq!(v, ["vm1"]);
        for i in 0..1000 {
            add(&mut v, &format!("d{i}"));
        }
        assert_eq!(v.len(), MAX_WAITING);
        remove(&mut v, "vm1");
        assert!(!v.iter().any(|d| d == "vm1") && v.len() == MAX_WAITING - 1);
    }

    #[test]
    fn one_progress_line_per_period() {
        let e = Every::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let due: Vec<u64> = (0..=25).filter(|&n| e.due(s(n))).collect();
        assert_eq!(due, [0, 10, 20]);
        // A clock that goes back prints nothing more.
        assert!(!e.due(t0));
    }
}
