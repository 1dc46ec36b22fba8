//! The lending logic of a pool, apart from sockets: an idle stack, a count of
//! connections, and a FIFO of waiting clients — generic over what is lent, so
//! it is unit-tested and benchmarked with plain values.
//!
//! A waiter arms no timer. As PgBouncer does, the pool's housekeeping task
//! sweeps the queue ([`Queue::sweep`]): waiters past `reserve_pool_timeout`
//! get a reserve slot, those past `query_wait_timeout` are turned away. The
//! queue is FIFO, so the front waiter always has the earliest deadline and the
//! sweep sleeps exactly until it. Hand-offs are taken from the queue under the
//! lock and delivered after it is released, so a woken client never finds the
//! lock held by the one who woke it.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// Something a queue lends; a dead one is dropped instead of lent. A `C` holds
/// its slot in the count: dropping one must lead to [`Queue::release_slot`] (in
/// Weir, `ServerConn`'s slot guard does that).
pub trait Pooled: Send + 'static {
    /// Why every waiter may be turned away at once ([`Queue::fail_waiters`]).
    type Failure: Clone + Send + 'static;
    fn is_alive(&self) -> bool;
}

/// Sizes and timeouts of one queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub pool_size: usize,
    pub reserve_size: usize,
    pub reserve_timeout: Duration,
    /// `query_wait_timeout`; zero waits forever.
    pub wait_timeout: Duration,
}

impl Limits {
    /// Connections a checkout may open without waiting: the reserve counts at once when
    /// `reserve_pool_timeout` is zero.
    fn open_now(&self) -> usize {
        if self.reserve_timeout.is_zero() {
            self.pool_size + self.reserve_size
        } else {
            self.pool_size
        }
    }

    fn max_total(&self) -> usize {
        self.pool_size + self.reserve_size
    }

    /// The earliest moment a waiter that began at `since` needs the sweeper.
    fn first_deadline(&self, since: Instant) -> Option<Instant> {
        let reserve = (self.reserve_size > 0).then_some(self.reserve_timeout);
        let wait = (!self.wait_timeout.is_zero()).then_some(self.wait_timeout);
        match (reserve, wait) {
            (Some(r), Some(w)) => Some(since + r.min(w)),
            (Some(d), None) | (None, Some(d)) => Some(since + d),
            (None, None) => None,
        }
    }
}

/// What a waiting client is given.
pub enum Grant<C: Pooled> {
    /// An idle connection.
    Conn(C),
    /// The right to open one (the count already includes it).
    Slot,
    /// `query_wait_timeout` passed.
    TimedOut,
    /// Turned away: the pool cannot log in to its server.
    Failed(C::Failure),
}

/// The first answer to a checkout.
pub enum Start<'a, C: Pooled> {
    Idle(C),
    /// The caller opens a connection; the count already includes it, and the
    /// caller must [`Queue::release_slot`] if it does not keep one.
    Open,
    Wait(Ticket<'a, C>),
}

struct Waiter<C: Pooled> {
    id: u64,
    since: Instant,
    tx: oneshot::Sender<Grant<C>>,
}

struct State<C: Pooled> {
    /// Sizes and timeouts; changed in place by a reload ([`Queue::set_limits`]).
    limits: Limits,
    /// Idle connections, most recently used last (LIFO, as PgBouncer's default).
    idle: Vec<C>,
    /// Connections that exist or are being opened (idle + lent + connecting).
    total: usize,
    waiters: VecDeque<Waiter<C>>,
    next_id: u64,
    /// When the sweeper will look next (None: it is not sleeping on a deadline).
    sweep_at: Option<Instant>,
}

pub struct Queue<C: Pooled> {
    state: Mutex<State<C>>,
    /// Wakes the sweeper early: a waiter's deadline is nearer than its plan.
    sweep_soon: Arc<Notify>,
}

/// Snapshot for SHOW POOLS.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub idle: usize,
    pub total: usize,
    pub waiting: usize,
    /// How long the oldest queued client has waited (PgBouncer's maxwait).
    pub max_wait: Duration,
}

impl<C: Pooled> Queue<C> {
    pub fn new(limits: Limits) -> Queue<C> {
        Queue {
            state: Mutex::new(State {
                limits,
                idle: Vec::new(),
                total: 0,
                waiters: VecDeque::new(),
                next_id: 0,
                sweep_at: None,
            }),
            sweep_soon: Arc::new(Notify::new()),
        }
    }

    pub fn counts(&self) -> Counts {
        let st = self.state.lock();
        Counts {
            idle: st.idle.len(),
            total: st.total,
            waiting: st.waiters.len(),
            max_wait: st
                .waiters
                .front()
                .map_or(Duration::ZERO, |w| w.since.elapsed()),
        }
    }

    /// Lends an idle connection, or grants a slot, or queues the caller (who
    /// began waiting at `since`). Dead idle connections are dropped after the
    /// lock is released.
    pub fn start(&self, since: Instant) -> Start<'_, C> {
        let mut dead = Vec::new();
        let mut st = self.state.lock();
        while let Some(conn) = st.idle.pop() {
            if conn.is_alive() {
                drop(st);
                drop(dead);
                return Start::Idle(conn);
            }
            dead.push(conn);
        }
        if st.total < st.limits.open_now() {
            st.total += 1;
            return Start::Open;
        }
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = oneshot::channel();
        st.waiters.push_back(Waiter { id, since, tx });
        let first = st.limits.first_deadline(since);
        let wake = matches!((first, st.sweep_at), (Some(d), Some(at)) if d < at)
            || (first.is_some() && st.sweep_at.is_none());
        drop(st);
        drop(dead);
        if wake {
            self.sweep_soon.notify_one();
        }
        Start::Wait(Ticket {
            queue: self,
            id,
            rx,
            done: false,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.state.lock().limits
    }

    /// Changes sizes and timeouts in place (a reload that changed only those): waiters
    /// get the slots a larger pool has at once; a smaller one shrinks as connections close.
    pub fn set_limits(&self, limits: Limits) {
        let granted = {
            let mut st = self.state.lock();
            st.limits = limits;
            let mut granted = Vec::new();
            while st.total < limits.open_now() {
                let Some(w) = st.waiters.pop_front() else {
                    break;
                };
                st.total += 1;
                granted.push(w);
            }
            granted
        };
        for w in granted {
            if w.tx.send(Grant::Slot).is_err() {
                self.release_slot();
            }
        }
        self.sweep_soon.notify_one();
    }

    /// Turns every waiting client away with `failure` (a server login failed in a way the
    /// next attempt would repeat, and the pool has no usable connection: PgBouncer's
    /// kill_pool_logins).
    pub fn fail_waiters(&self, failure: &C::Failure) {
        let waiters = std::mem::take(&mut self.state.lock().waiters);
        for w in waiters {
            let _ = w.tx.send(Grant::Failed(failure.clone()));
        }
    }

    /// Returns a connection: to the longest-waiting client, else to the idle stack (then
    /// true).
    pub fn checkin(&self, conn: C) -> bool {
        let mut grant = Grant::Conn(conn);
        loop {
            let mut st = self.state.lock();
            let Some(w) = st.waiters.pop_front() else {
                if let Grant::Conn(conn) = grant {
                    st.idle.push(conn);
                }
                return true;
            };
            drop(st);
            match w.tx.send(grant) {
                Ok(()) => return false,
                Err(back) => grant = back, // that client left: next one
            }
        }
    }

    /// A slot is free (a connection closed or was never opened): the next
    /// waiter may open one, else the pool shrinks.
    pub fn release_slot(&self) {
        loop {
            let mut st = self.state.lock();
            if st.total > st.limits.max_total() {
                // The pool was made smaller: this slot goes.
                st.total -= 1;
                return;
            }
            let Some(w) = st.waiters.pop_front() else {
                st.total = st.total.saturating_sub(1);
                return;
            };
            drop(st);
            if w.tx.send(Grant::Slot).is_ok() {
                return;
            }
        }
    }

    /// Grants reserve slots to clients that waited `reserve_pool_timeout` (while the
    /// reserve has room) and turns away those past `query_wait_timeout`. Returns when
    /// the next deadline falls (None: no waiter has one).
    pub fn sweep(&self, now: Instant) -> Option<Instant> {
        let mut granted = Vec::new();
        let mut expired = Vec::new();
        let next = {
            let mut st = self.state.lock();
            let l = st.limits;
            while let Some(front) = st.waiters.front() {
                let waited = now.saturating_duration_since(front.since);
                if !l.wait_timeout.is_zero() && waited >= l.wait_timeout {
                    expired.extend(st.waiters.pop_front());
                } else if l.reserve_size > 0
                    && waited >= l.reserve_timeout
                    && st.total < l.max_total()
                {
                    st.total += 1;
                    granted.extend(st.waiters.pop_front());
                } else {
                    break;
                }
            }
            let next = st.waiters.front().and_then(|w| {
                let reserve = (l.reserve_size > 0 && st.total < l.max_total())
                    .then(|| w.since + l.reserve_timeout);
                let wait = (!l.wait_timeout.is_zero()).then(|| w.since + l.wait_timeout);
                match (reserve, wait) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            });
            st.sweep_at = next;
            next
        };
        for w in expired {
            let _ = w.tx.send(Grant::TimedOut);
        }
        for w in granted {
            if w.tx.send(Grant::Slot).is_err() {
                self.release_slot();
            }
        }
        next
    }

    /// Notified when a new waiter's deadline comes before the sweeper's plan
    /// (shared, so the sweeper can wait without keeping the queue alive).
    pub fn sweep_signal(&self) -> Arc<Notify> {
        self.sweep_soon.clone()
    }

    /// Takes the idle connection unused longest (to close it: eviction).
    pub fn take_one_idle(&self) -> Option<C> {
        let mut st = self.state.lock();
        if st.idle.is_empty() {
            None
        } else {
            Some(st.idle.remove(0))
        }
    }

    /// Takes every idle connection (RECONNECT, retirement); the caller drops
    /// them outside the lock, each freeing its slot.
    pub fn take_idle(&self) -> Vec<C> {
        std::mem::take(&mut self.state.lock().idle)
    }

    /// Takes the idle connections `expired` picks, given how many connections
    /// exist; the caller closes them outside the lock.
    pub fn take_idle_where(&self, mut expired: impl FnMut(&C, usize) -> bool) -> Vec<C> {
        let mut st = self.state.lock();
        let total = st.total;
        let mut out = Vec::new();
        let mut i = 0;
        while i < st.idle.len() {
            if expired(&st.idle[i], total - out.len()) {
                out.push(st.idle.remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Claims a slot for a connection opened without a client (min_pool_size),
    /// only when nobody waits and the pool has fewer than `up_to`.
    pub fn claim_spare(&self, up_to: usize) -> bool {
        let mut st = self.state.lock();
        if st.total >= up_to || !st.waiters.is_empty() {
            return false;
        }
        st.total += 1;
        true
    }

    fn leave(&self, id: u64) {
        self.state.lock().waiters.retain(|w| w.id != id);
    }
}

/// A place in the queue. Dropping it before the grant arrives (the client
/// left) removes it; a grant delivered in that instant goes back.
pub struct Ticket<'a, C: Pooled> {
    queue: &'a Queue<C>,
    id: u64,
    rx: oneshot::Receiver<Grant<C>>,
    done: bool,
}

impl<C: Pooled> Ticket<'_, C> {
    pub async fn wait(mut self) -> Grant<C> {
        let grant = (&mut self.rx).await;
        self.done = true;
        // The senders live in the queue, which outlives every ticket.
        grant.unwrap_or(Grant::TimedOut)
    }
}

impl<C: Pooled> Drop for Ticket<'_, C> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.queue.leave(self.id);
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Conn(conn)) => {
                self.queue.checkin(conn);
            }
            Ok(Grant::Slot) => self.queue.release_slot(),
            Ok(Grant::TimedOut) | Ok(Grant::Failed(_)) | Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    #[derive(Debug, PartialEq)]
    struct Conn(u32, bool);

    impl Pooled for Conn {
        type Failure = ();
        fn is_alive(&self) -> bool {
            self.1
        }
    }

    fn limits(pool: usize, reserve: usize) -> Limits {
        Limits {
            pool_size: pool,
            reserve_size: reserve,
            reserve_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(120),
        }
    }

    fn ready<F: Future>(f: F) -> Option<F::Output> {
        let mut f = pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    fn ticket<C: Pooled>(s: Start<'_, C>) -> Ticket<'_, C> {
        match s {
            Start::Wait(t) => t,
            _ => panic!("expected to wait"),
        }
    }

    #[test]
    fn opens_up_to_pool_size_then_queues() {
        let q = Queue::<Conn>::new(limits(2, 0));
        let now = Instant::now();
        assert!(matches!(q.start(now), Start::Open));
        assert!(matches!(q.start(now), Start::Open));
        let t = ticket(q.start(now));
        assert_eq!(q.counts().waiting, 1);
        q.checkin(Conn(1, true));
        assert!(matches!(ready(t.wait()), Some(Grant::Conn(Conn(1, true)))));
        assert_eq!(q.counts().idle, 0);
    }

    #[test]
    fn idle_is_lifo_and_dead_ones_are_dropped() {
        let q = Queue::<Conn>::new(limits(3, 0));
        let now = Instant::now();
        for _ in 0..3 {
            assert!(matches!(q.start(now), Start::Open));
        }
        q.checkin(Conn(1, true));
        q.checkin(Conn(2, true));
        q.checkin(Conn(3, false));
        assert!(matches!(q.start(now), Start::Idle(Conn(2, true))));
        // The dead one was dropped (its own guard frees its slot).
        assert_eq!(q.counts().idle, 1);
    }

    #[test]
    fn waiters_are_served_first_come_first_served() {
        let q = Queue::<Conn>::new(limits(1, 0));
        let now = Instant::now();
        assert!(matches!(q.start(now), Start::Open));
        let a = ticket(q.start(now));
        let b = ticket(q.start(now));
        q.checkin(Conn(1, true));
        q.checkin(Conn(2, true));
        assert!(matches!(ready(a.wait()), Some(Grant::Conn(Conn(1, _)))));
        assert!(matches!(ready(b.wait()), Some(Grant::Conn(Conn(2, _)))));
    }

    #[test]
    fn a_waiter_that_leaves_passes_its_grant_on() {
        let q = Queue::<Conn>::new(limits(1, 0));
        let now = Instant::now();
        assert!(matches!(q.start(now), Start::Open));
        let a = ticket(q.start(now));
        let b = ticket(q.start(now));
        drop(a);
        assert_eq!(q.counts().waiting, 1);
        q.checkin(Conn(7, true));
        assert!(matches!(ready(b.wait()), Some(Grant::Conn(Conn(7, _)))));
    }

    #[test]
    fn a_grant_racing_with_leaving_is_returned() {
        let q = Queue::<Conn>::new(limits(1, 0));
        let now = Instant::now();
        assert!(matches!(q.start(now), Start::Open));
        let a = ticket(q.start(now));
        q.checkin(Conn(3, true)); // delivered, never awaited
        drop(a);
        assert_eq!(q.counts().idle, 1);
        let _held = match q.start(now) {
            Start::Idle(c) => c,
            _ => panic!("expected the returned connection"),
        };
        // A slot granted to a leaving waiter goes on to the next one.
        let b = ticket(q.start(now));
        let c = ticket(q.start(now));
        q.release_slot();
        drop(b);
        assert_eq!(q.counts().waiting, 0);
        assert!(matches!(ready(c.wait()), Some(Grant::Slot)));
    }

    #[test]
    fn released_slot_goes_to_the_next_waiter_or_shrinks() {
        let q = Queue::<Conn>::new(limits(1, 0));
        let now = Instant::now();
        assert!(matches!(q.start(now), Start::Open));
        let a = ticket(q.start(now));
        q.release_slot();
        assert!(matches!(ready(a.wait()), Some(Grant::Slot)));
        assert_eq!(q.counts().total, 1);
        q.release_slot();
        assert_eq!(q.counts().total, 0);
    }

    #[test]
    fn sweep_grants_reserve_after_its_timeout_and_no_more() {
        let q = Queue::<Conn>::new(limits(1, 1));
        let t0 = Instant::now();
        assert!(matches!(q.start(t0), Start::Open));
        let a = ticket(q.start(t0));
        let b = ticket(q.start(t0));
        assert_eq!(q.sweep(t0), Some(t0 + Duration::from_secs(5)));
        let later = t0 + Duration::from_secs(5);
        // One reserve slot: the oldest waiter gets it; the next waits on.
        assert_eq!(q.sweep(later), Some(t0 + Duration::from_secs(120)));
        assert!(matches!(ready(a.wait()), Some(Grant::Slot)));
        assert_eq!(q.counts().total, 2);
        assert_eq!(q.counts().waiting, 1);
        drop(b);
    }

    #[test]
    fn sweep_turns_away_waiters_past_query_wait_timeout() {
        let mut l = limits(1, 0);
        l.wait_timeout = Duration::from_secs(2);
        let q = Queue::<Conn>::new(l);
        let t0 = Instant::now();
        assert!(matches!(q.start(t0), Start::Open));
        let a = ticket(q.start(t0));
        let b = ticket(q.start(t0 + Duration::from_secs(1)));
        assert_eq!(q.sweep(t0), Some(t0 + Duration::from_secs(2)));
        assert_eq!(
            q.sweep(t0 + Duration::from_secs(2)),
            Some(t0 + Duration::from_secs(3))
        );
        assert!(matches!(ready(a.wait()), Some(Grant::TimedOut)));
        assert_eq!(q.counts().waiting, 1);
        drop(b);
        assert_eq!(q.sweep(t0 + Duration::from_secs(9)), None);
    }

    #[test]
    fn zero_reserve_timeout_opens_reserve_at_once() {
        let mut l = limits(1, 1);
        l.reserve_timeout = Duration::ZERO;
        let q = Queue::<Conn>::new(l);
        let now = Instant::now();
        assert!(matches!(q.start(now), Start::Open));
        assert!(matches!(q.start(now), Start::Open));
        let _t = ticket(q.start(now));
    }
}
