//! Rate-limited WARN lines for refused connections.
//!
//! A connection refused for load or for its certificate (memory high-water
//! mark, connection limits, a failed TLS or WebSocket handshake) is worth a
//! WARN line, but a flood of them (a fleet reconnecting into a full broker, a
//! scanner hitting a TLS port) must not flood the log or cost the shard its
//! time. Per shard and per [`Refusal`] kind, the first [`LINES_PER_WINDOW`]
//! refusals of each [`WINDOW_MS`] window get their own line; the rest are
//! counted, and when the window has passed one summary line says how many more
//! there were. Every refusal is still counted in `/metrics`
//! (`tessera_connects_total{result}`) where it was before.
//!
//! Shard-local (one per shard, no locks); the clock is passed in, so the unit
//! tests drive it.

/// What a connection was refused for; one rate limit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The process's RSS is above `limits.memory_high_water_bytes`.
    MemoryHighWater,
    /// The shard holds `connections_max` connections.
    ConnectionLimit,
    /// The listener's own connection limit.
    ListenerConnectionLimit,
    /// A TLS or WebSocket handshake failed (a refused certificate, a bad upgrade).
    Handshake,
    /// The client certificate names no usable username.
    CertificateIdentity,
}

impl Refusal {
    const COUNT: usize = 5;

    /// Every kind, in index order.
    const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::MemoryHighWater,
        Refusal::ConnectionLimit,
        Refusal::ListenerConnectionLimit,
        Refusal::Handshake,
        Refusal::CertificateIdentity,
    ];

    /// The `reason` field of the log lines.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Refusal::MemoryHighWater => "memory_high_water",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::ListenerConnectionLimit => "listener_connection_limit",
            Refusal::Handshake => "handshake",
            Refusal::CertificateIdentity => "certificate_identity",
        }
    }
}

/// Refusals of one kind logged in full per window; the rest are summed up.
pub(crate) const LINES_PER_WINDOW: u32 = 3;

/// The window of [`LINES_PER_WINDOW`], in milliseconds.
pub(crate) const WINDOW_MS: u64 = 1000;

/// One shard's rate limit of refusal lines (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// Start of the current window, per kind.
    window_start_ms: [u64; Refusal::COUNT],
    /// Lines logged in the current window, per kind.
    logged: [u32; Refusal::COUNT],
    /// Refusals not logged in the current window, per kind.
    suppressed: [u64; Refusal::COUNT],
}

impl RefusalLog {
    /// Records a refusal at `now_ms`; true when it gets its own line. A
    /// window that has passed is closed first, its summary handed to
    /// `summary(kind, suppressed)`.
    pub(crate) fn admit(
        &mut self,
        now_ms: u64,
        why: Refusal,
        summary: impl FnMut(Refusal, u64),
    ) -> bool {
        self.roll(now_ms, summary);
        let k = why as usize;
        if self.logged[k] == 0 && self.suppressed[k] == 0 {
            self.window_start_ms[k] = now_ms;
        }
        if self.logged[k] < LINES_PER_WINDOW {
            self.logged[k] += 1;
            true
        } else {
            self.suppressed[k] += 1;
            false
        }
    }

    /// Closes every window that has passed at `now_ms`, calling
    /// `summary(kind, n)` for each that suppressed `n > 0` lines. The shard
    /// calls it from its tick, so the summary comes also when the refusals
    /// stop.
    pub(crate) fn roll(&mut self, now_ms: u64, mut summary: impl FnMut(Refusal, u64)) {
        for why in Refusal::ALL {
            let k = why as usize;
            if (self.logged[k] > 0 || self.suppressed[k] > 0)
                && now_ms.saturating_sub(self.window_start_ms[k]) >= WINDOW_MS
            {
                if self.suppressed[k] > 0 {
                    summary(why, self.suppressed[k]);
                }
                self.logged[k] = 0;
                self.suppressed[k] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_summary(why: Refusal, n: u64) {
        panic!("unexpected summary: {n} more {}", why.name());
    }

    #[test]
    fn a_flood_gets_a_few_lines_then_one_summary_per_window() {
        let mut log = RefusalLog::default();
        let mut lines = 0;
        // 1,000 refusals within 500 ms.
        for k in 0..1000 {
            if log.admit(10_000 + k / 2, Refusal::ConnectionLimit, no_summary) {
                lines += 1;
            }
        }
        assert_eq!(lines, LINES_PER_WINDOW);
        // Nothing to say before the window ends.
        log.roll(10_999, no_summary);
        let mut summaries = Vec::new();
        log.roll(11_000, |why, n| summaries.push((why, n)));
        assert_eq!(
            summaries,
            [(Refusal::ConnectionLimit, 1000 - u64::from(LINES_PER_WINDOW))]
        );
        // Said once: the next tick is quiet, and the next refusal gets a line.
        log.roll(11_250, no_summary);
        assert!(log.admit(11_300, Refusal::ConnectionLimit, no_summary));
    }

    #[test]
    fn a_refusal_after_the_window_brings_the_summary_first() {
        let mut log = RefusalLog::default();
        for _ in 0..5 {
            log.admit(0, Refusal::Handshake, no_summary);
        }
        let mut summaries = Vec::new();
        assert!(log.admit(1_500, Refusal::Handshake, |why, n| summaries.push((why, n))));
        assert_eq!(summaries, [(Refusal::Handshake, 2)]);
    }

    #[test]
    fn kinds_are_limited_separately_and_a_few_refusals_get_no_summary() {
        let mut log = RefusalLog::default();
        for _ in 0..10 {
            log.admit(0, Refusal::MemoryHighWater, no_summary);
        }
        // Another kind still gets its lines in the same window.
        for _ in 0..LINES_PER_WINDOW {
            assert!(log.admit(1, Refusal::ListenerConnectionLimit, no_summary));
        }
        let mut summaries = Vec::new();
        log.roll(5_000, |why, n| summaries.push((why, n)));
        assert_eq!(summaries, [(Refusal::MemoryHighWater, 7)]);
    }
}
