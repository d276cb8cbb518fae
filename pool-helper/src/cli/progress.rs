//! How `pool-helper fetch` shows a download while it runs: a progress bar on a terminal (stderr),
//! JSON Lines on a stdout that is not a terminal (at most one progress line a second), nothing
//! else. The final line (the master's path, or the `--json` final object) is printed by the caller.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use vcc_core::control::proto;

/// At most one `downloading` line this often (state changes are always printed).
pub const JSONL_EVERY: Duration = Duration::from_secs(1);

/// What a fetch is doing, as the JSON Lines' `state` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The download runs (`done_bytes` may start above 0: resumed from staging).
    Downloading,
    /// The whole file is here and being checked.
    Verifying,
}

/// One JSON Lines progress object. Fields in the order printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub event: &'static str,
    pub state: Phase,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Whole percent, 0 while the size is unknown.
    pub percent: u64,
    /// Download rate, bytes/s.
    pub down_bps: u64,
    pub peers: u32,
}

impl Line {
    pub fn new(state: Phase, p: &proto::Progress) -> Line {
        let percent = if p.total_bytes == 0 {
            0
        } else {
            (p.done_bytes.min(p.total_bytes) as u128 * 100 / p.total_bytes as u128) as u64
        };
        Line {
            event: "progress",
            state,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            percent,
            down_bps: p.down_bps,
            peers: p.peers,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Decides which progress reports become lines: the first, every change of state, the end of
/// the download, and otherwise at most one per `every`. Pure (the clock is passed in).
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<(Instant, Phase)>,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        RateLimit { every, last: None }
    }

    /// The line to print for this report at `now`, if any.
    pub fn line(&mut self, now: Instant, state: Phase, p: &proto::Progress) -> Option<Line> {
        let complete = p.total_bytes > 0 && p.done_bytes >= p.total_bytes;
        let due = match self.last {
            None => true,
            Some((_, s)) if s != state => true,
            Some((t, _)) => complete || now.saturating_duration_since(t) >= self.every,
        };
        if !due {
            return None;
        }
        self.last = Some((now, state));
        Some(Line::new(state, p))
    }
}

/// The bar drawn on stderr: bytes, rate, ETA, as wide as the terminal.
pub fn bar(total_bytes: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let pb = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(style);
    pb
}

/// Shows a fetch's progress where its caller looks (see the module docs).
#[derive(Debug)]
pub struct Shower {
    bar: Option<ProgressBar>,
    jsonl: Option<RateLimit>,
    /// `--json`: every event as the daemon sends it (unchanged), no bar, no extra lines.
    json: bool,
}

impl Shower {
    /// `stderr_tty`: draw a bar; `stdout_tty`: no JSON Lines; `json`: `--json` given (its own
    /// stream, printed by the caller).
    pub fn new(json: bool, stderr_tty: bool, stdout_tty: bool) -> Self {
        Shower {
            bar: (!json && stderr_tty).then(|| bar(0)),
            jsonl: (!json && !stdout_tty).then(|| RateLimit::new(JSONL_EVERY)),
            json,
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// A progress report of the download.
    pub fn progress(&mut self, state: Phase, p: &proto::Progress) {
        if let Some(b) = &self.bar {
            if b.length() != Some(p.total_bytes) {
                b.set_length(p.total_bytes);
            }
            b.set_position(p.done_bytes.min(p.total_bytes));
            let what = match state {
                Phase::Downloading => format!("{} peer(s)", p.peers),
                Phase::Verifying => "verifying".to_string(),
            };
            b.set_message(what);
        }
        if let Some(rl) = &mut self.jsonl {
            if let Some(line) = rl.line(Instant::now(), state, p) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", line.to_json());
                let _ = out.flush();
            }
        }
    }

    /// A resumed download starts at `have_bytes`: the rate and ETA count from there.
    pub fn started(&mut self, have_bytes: u64, total_bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total_bytes);
            b.set_position(have_bytes);
            b.reset_eta();
        }
    }

    /// The whole file is being checked.
    pub fn verifying(&mut self, total_bytes: u64) {
        let p = proto::Progress { done_bytes: total_bytes, total_bytes, ..Default::default() };
        self.progress(Phase::Verifying, &p);
    }

    /// The fetch ended (well or not): the bar goes.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(done: u64, total: u64) -> proto::Progress {
        proto::Progress { done_bytes: done, total_bytes: total, peers: 3, down_bps: 1_048_576 }
    }

    #[test]
    fn a_line_is_one_json_object_with_state_bytes_rate_and_peers() {
        let l = Line::new(Phase::Downloading, &p(512, 2048));
        assert_eq!(
            l.to_json(),
            r#"{"event":"progress","state":"downloading","done_bytes":512,"total_bytes":2048,"percent":25,"down_bps":1048576,"peers":3}"#
        );
        assert!(!l.to_json().contains('\n'));
        let v = Line::new(Phase::Verifying, &p(2048, 2048));
        assert!(v.to_json().contains(r#""state":"verifying""#) && v.to_json().contains(r#""percent":100"#));
    }

    #[test]
    fn percent_never_divides_by_zero_nor_overflows_nor_passes_100() {
        assert_eq!(Line::new(Phase::Downloading, &p(5, 0)).percent, 0);
        assert_eq!(Line::new(Phase::Downloading, &p(u64::MAX, u64::MAX)).percent, 100);
        assert_eq!(Line::new(Phase::Downloading, &p(u64::MAX - 1, u64::MAX)).percent, 99);
        assert_eq!(Line::new(Phase::Downloading, &p(30, 10)).percent, 100);
    }

    #[test]
    fn at_most_one_downloading_line_a_second() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut rl = RateLimit::new(Duration::from_secs(1));
        // Reports every 100 ms for 3.05 s: the first, then one per second.
        let printed: Vec<u64> = (0..=30)
            .filter_map(|i| rl.line(ms(i * 100 + 50), Phase::Downloading, &p(i, 1000)).map(|l| l.done_bytes))
            .collect();
        assert_eq!(printed, [0, 10, 20, 30]);
    }

    #[test]
    fn a_change_of_state_and_the_last_byte_are_printed_at_once() {
        let t0 = Instant::now();
        let mut rl = RateLimit::new(Duration::from_secs(1));
        assert!(rl.line(t0, Phase::Downloading, &p(1, 100)).is_some());
        assert!(rl.line(t0 + Duration::from_millis(10), Phase::Downloading, &p(2, 100)).is_none());
        let done = rl.line(t0 + Duration::from_millis(20), Phase::Downloading, &p(100, 100));
        assert_eq!(done.map(|l| l.percent), Some(100));
        let v = rl.line(t0 + Duration::from_millis(30), Phase::Verifying, &p(100, 100));
        assert_eq!(v.map(|l| l.state), Some(Phase::Verifying));
        assert!(rl.line(t0 + Duration::from_millis(40), Phase::Verifying, &p(0, 0)).is_none());
    }

    #[test]
    fn a_clock_going_back_prints_nothing_extra() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut rl = RateLimit::new(Duration::from_secs(1));
        assert!(rl.line(t0, Phase::Downloading, &p(1, 100)).is_some());
        assert!(rl.line(t0 - Duration::from_secs(5), Phase::Downloading, &p(2, 100)).is_none());
    }

    #[test]
    fn json_mode_draws_no_bar_and_prints_no_extra_lines() {
        let s = Shower::new(true, true, false);
        assert!(s.bar.is_none() && s.jsonl.is_none() && s.json());
        let s = Shower::new(false, false, false);
        assert!(s.bar.is_none() && s.jsonl.is_some());
        let s = Shower::new(false, true, true);
        assert!(s.bar.is_some() && s.jsonl.is_none());
    }
}
