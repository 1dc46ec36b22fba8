//! What Weir knows of each shard server's WAL position, for read-your-writes and replica
//! lag (the sampling itself is `backend::walsample`).
//!
//! Every `replica_lsn_interval` Weir asks each primary for its WAL insert position and each
//! replica for its replay position. Samples of a primary are numbered; a client whose write
//! transaction on a shard ends remembers the number of samples *started* so far (`mark`).
//! The first sample started after that commit was sent after the commit was acknowledged,
//! so its position bounds the commit's WAL: once a replica has replayed that far it holds
//! the client's write. Until then the client's reads of that shard go to the primary (or to
//! a replica that has). No query runs per write; the cost is the sampling interval.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Samples of a primary kept for lookups by number (older ones fall back to the latest,
/// which is a larger, still correct bound).
const RING: usize = 64;
/// Primary positions kept to measure replica lag in time.
const HISTORY: usize = 4096;

/// One replica's state as last sampled.
#[derive(Debug, Default)]
pub struct ReplicaWal {
    /// Replay position; 0 = not known yet.
    pub replay: AtomicU64,
    /// Bytes of WAL behind the primary's last sample.
    pub lag_bytes: AtomicU64,
    /// How long the oldest WAL it has not replayed has existed on the primary (µs).
    pub lag_us: AtomicU64,
    /// Not in recovery any more: promoted, so no longer a copy of this shard's primary.
    pub promoted: AtomicBool,
    /// When the last sample succeeded (µs since the tracker started; 0 = never).
    pub sampled_at: AtomicU64,
}

/// One shard: its primary's samples and its replicas.
#[derive(Debug)]
pub struct ShardWal {
    /// Samples started so far (the next one gets this number + 1).
    started: AtomicU64,
    /// The number and position of the newest finished sample (position written first).
    done_seq: AtomicU64,
    done_lsn: AtomicU64,
    ring: Vec<(AtomicU64, AtomicU64)>,
    /// The newest sample number any client of this Weir marked (`global` mode).
    pub last_mark: AtomicU64,
    /// The primary is in recovery (read-only): writes are refused.
    pub primary_read_only: AtomicBool,
    pub primary_sampled_at: AtomicU64,
    /// (when, position) each time the primary's position moved, for lag in time.
    history: Mutex<VecDeque<(Instant, u64)>>,
    pub replicas: Vec<ReplicaWal>,
}

/// The WAL view of one sharded database.
#[derive(Debug)]
pub struct WalState {
    pub shards: Vec<ShardWal>,
    /// Zero: no limit.
    pub max_lag: Duration,
    pub max_lag_bytes: u64,
    pub interval: Duration,
    pub epoch: Instant,
    /// The sampler runs (read_from_replicas with replicas).
    pub active: AtomicBool,
}

/// A client's bound for one shard: the sample number to wait for, then its position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    pub seq: u64,
    pub lsn: u64,
}

impl WalState {
    pub fn new(replicas: &[usize], interval: Duration, max_lag: Duration, max_bytes: u64) -> Self {
        WalState {
            shards: replicas
                .iter()
                .map(|&n| ShardWal {
                    started: AtomicU64::new(0),
                    done_seq: AtomicU64::new(0),
                    done_lsn: AtomicU64::new(0),
                    ring: (0..RING)
                        .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                        .collect(),
                    last_mark: AtomicU64::new(0),
                    primary_read_only: AtomicBool::new(false),
                    primary_sampled_at: AtomicU64::new(0),
                    history: Mutex::new(VecDeque::new()),
                    replicas: (0..n).map(|_| ReplicaWal::default()).collect(),
                })
                .collect(),
            max_lag,
            max_lag_bytes: max_bytes,
            interval,
            epoch: Instant::now(),
            active: AtomicBool::new(false),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A write transaction on `shard` ended: the bound a later read must wait for.
    pub fn mark(&self, shard: usize) -> Need {
        let Some(s) = self.shards.get(shard) else {
            return Need::default();
        };
        let seq = s.started.load(Ordering::SeqCst);
        s.last_mark.fetch_max(seq + 1, Ordering::Relaxed);
        Need {
            seq: seq + 1,
            lsn: 0,
        }
    }

    /// Marks every shard as written now (see `mark`).
    pub fn mark_all(&self) {
        for shard in 0..self.shards.len() {
            self.mark(shard);
        }
    }

    /// The bound every client's reads of `shard` must respect in `global` mode.
    pub fn global_need(&self, shard: usize) -> Need {
        let seq = self
            .shards
            .get(shard)
            .map_or(0, |s| s.last_mark.load(Ordering::Relaxed));
        Need { seq, lsn: 0 }
    }

    /// Fills in `need.lsn` once the sample it waits for has finished; `false` while it has
    /// not (reads must go to the primary).
    pub fn resolve(&self, shard: usize, need: &mut Need) -> bool {
        if need.seq == 0 || need.lsn != 0 {
            return true;
        }
        let Some(s) = self.shards.get(shard) else {
            return false;
        };
        if s.done_seq.load(Ordering::Acquire) < need.seq {
            return false;
        }
        let (seq, lsn) = &s.ring[need.seq as usize % RING];
        let first = seq.load(Ordering::Acquire);
        let pos = lsn.load(Ordering::Acquire);
        need.lsn = if first == need.seq && pos != 0 {
            pos
        } else {
            // Overwritten by a later sample: the newest position also bounds the write.
            s.done_lsn.load(Ordering::Acquire)
        };
        need.lsn != 0
    }

    /// Whether replica `r` of `shard` may serve a read that must see `min_lsn` (0: any).
    pub fn replica_ok(&self, shard: usize, r: usize, min_lsn: u64) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return true;
        }
        let Some(rep) = self.shards.get(shard).and_then(|s| s.replicas.get(r)) else {
            return false;
        };
        if rep.promoted.load(Ordering::Relaxed) {
            return false;
        }
        let replay = rep.replay.load(Ordering::Acquire);
        if min_lsn != 0 && replay < min_lsn {
            return false;
        }
        if self.max_lag_bytes == 0 && self.max_lag.is_zero() {
            return true;
        }
        // A replica not heard from lately has an unknown lag.
        let stale = (self.interval * 50).max(Duration::from_secs(1)).as_micros() as u64;
        let at = rep.sampled_at.load(Ordering::Relaxed);
        if at == 0 || self.now_us().saturating_sub(at) > stale {
            return false;
        }
        (self.max_lag_bytes == 0 || rep.lag_bytes.load(Ordering::Relaxed) <= self.max_lag_bytes)
            && (self.max_lag.is_zero()
                || rep.lag_us.load(Ordering::Relaxed) <= self.max_lag.as_micros() as u64)
    }

    /// Sampler: a primary sample starts; its number.
    pub fn start_sample(&self, shard: usize) -> u64 {
        self.shards
            .get(shard)
            .map_or(0, |s| s.started.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Sampler: primary sample `seq` found position `lsn` (and whether it is in recovery).
    pub fn primary_sampled(&self, shard: usize, seq: u64, lsn: u64, in_recovery: bool) {
        let Some(s) = self.shards.get(shard) else {
            return;
        };
        s.primary_read_only.store(in_recovery, Ordering::Relaxed);
        s.primary_sampled_at.store(self.now_us(), Ordering::Relaxed);
        if in_recovery {
            return;
        }
        let (slot_seq, slot_lsn) = &s.ring[seq as usize % RING];
        slot_lsn.store(lsn, Ordering::Release);
        slot_seq.store(seq, Ordering::Release);
        s.done_lsn.store(lsn, Ordering::Release);
        s.done_seq.fetch_max(seq, Ordering::Release);
        let mut h = s.history.lock();
        if h.back().is_none_or(|(_, last)| *last < lsn) {
            h.push_back((Instant::now(), lsn));
            if h.len() > HISTORY {
                h.pop_front();
            }
        }
    }

    /// Sampler: replica `r` replayed up to `replay` (`None`: it is not in recovery).
    pub fn replica_sampled(&self, shard: usize, r: usize, replay: Option<u64>) {
        let Some(s) = self.shards.get(shard) else {
            return;
        };
        let Some(rep) = s.replicas.get(r) else {
            return;
        };
        let Some(replay) = replay else {
            if !rep.promoted.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    shard,
                    replica = r,
                    "replica is not in recovery (promoted?); it gets no reads"
                );
            }
            return;
        };
        if rep.promoted.swap(false, Ordering::Relaxed) {
            tracing::info!(shard, replica = r, "replica is in recovery again");
        }
        rep.replay.fetch_max(replay, Ordering::Release);
        let primary = s.done_lsn.load(Ordering::Acquire);
        rep.lag_bytes
            .store(primary.saturating_sub(replay), Ordering::Relaxed);
        let lag_us = {
            let mut h = s.history.lock();
            // Positions every replica has passed are of no further use (one kept).
            let now = Instant::now();
            let slowest = s
                .replicas
                .iter()
                .map(|x| x.replay.load(Ordering::Relaxed))
                .min()
                .unwrap_or(replay);
            while h.len() > 1 && h.get(1).is_some_and(|(_, l)| *l <= slowest) {
                h.pop_front();
            }
            h.iter()
                .find(|(_, l)| *l > replay)
                .map_or(0, |(at, _)| now.duration_since(*at).as_micros() as u64)
        };
        rep.lag_us.store(lag_us, Ordering::Relaxed);
        rep.sampled_at.store(self.now_us(), Ordering::Relaxed);
    }

    /// The newest primary position sampled (0: none yet).
    pub fn primary_lsn(&self, shard: usize) -> u64 {
        self.shards
            .get(shard)
            .map_or(0, |s| s.done_lsn.load(Ordering::Acquire))
    }

    /// Whether the shard's primary was last seen in recovery (writes refused).
    pub fn primary_read_only(&self, shard: usize) -> bool {
        self.shards
            .get(shard)
            .is_some_and(|s| s.primary_read_only.load(Ordering::Relaxed))
    }
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(hi << 32 | lo)
}

/// Formats an LSN as PostgreSQL does.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> WalState {
        WalState::new(&[1], Duration::from_millis(10), Duration::ZERO, 0)
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_00FF), "1/FF");
        assert_eq!(parse_lsn("zz"), None);
        assert_eq!(parse_lsn("1/100000000"), None);
    }

    #[test]
    fn a_read_waits_for_the_first_sample_started_after_the_commit() {
        let w = state();
        w.active.store(true, Ordering::Relaxed);
        // A sample in flight when the commit ends does not bound it.
        let before = w.start_sample(0);
        let mut need = w.mark(0);
        w.primary_sampled(0, before, 100, false);
        assert!(!w.resolve(0, &mut need));
        let after = w.start_sample(0);
        w.primary_sampled(0, after, 150, false);
        assert!(w.resolve(0, &mut need));
        assert_eq!(need.lsn, 150);
        // Later samples do not move a resolved bound.
        let later = w.start_sample(0);
        w.primary_sampled(0, later, 900, false);
        assert!(w.resolve(0, &mut need));
        assert_eq!(need.lsn, 150);
        w.replica_sampled(0, 0, Some(149));
        assert!(!w.replica_ok(0, 0, need.lsn));
        w.replica_sampled(0, 0, Some(150));
        assert!(w.replica_ok(0, 0, need.lsn));
        assert!(w.replica_ok(0, 0, 0));
    }

    #[test]
    fn an_overwritten_sample_falls_back_to_the_newest() {
        let w = state();
        let mut need = w.mark(0);
        for i in 0..(RING as u64 * 2) {
            let seq = w.start_sample(0);
            w.primary_sampled(0, seq, 1000 + i, false);
        }
        assert!(w.resolve(0, &mut need));
        assert_eq!(need.lsn, 1000 + RING as u64 * 2 - 1);
    }

    #[test]
    fn global_mode_uses_the_newest_mark_of_any_client() {
        let w = state();
        assert_eq!(w.global_need(0).seq, 0);
        let seq = w.start_sample(0);
        w.primary_sampled(0, seq, 10, false);
        let n = w.mark(0);
        assert_eq!(w.global_need(0), n);
    }

    #[test]
    fn lag_limits_and_promotion_keep_reads_away() {
        let w = WalState::new(&[1], Duration::from_millis(10), Duration::ZERO, 100);
        w.active.store(true, Ordering::Relaxed);
        let seq = w.start_sample(0);
        w.primary_sampled(0, seq, 1000, false);
        w.replica_sampled(0, 0, Some(800));
        assert!(!w.replica_ok(0, 0, 0), "200 bytes behind, limit 100");
        w.replica_sampled(0, 0, Some(950));
        assert!(w.replica_ok(0, 0, 0));
        w.replica_sampled(0, 0, None);
        assert!(!w.replica_ok(0, 0, 0));
        w.replica_sampled(0, 0, Some(1000));
        assert!(w.replica_ok(0, 0, 0));
        // Inactive (no sampler): no constraint.
        let idle = state();
        assert!(idle.replica_ok(0, 0, 12345));
    }
}
