//! Checkout and check-in cost of the pool's lending queue, without sockets: uncontended
//! (an idle connection is there), and with 1,000 clients queued for 20 connections, which
//! is what every transaction pays at 1,000 clients. Run: `cargo bench --bench pool`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir::backend::queue::{Grant, Limits, Pooled, Queue, Start};

/// Which client opened it (read so the hand-offs are not optimised away).
struct Conn(u64);

impl Pooled for Conn {
    type Failure = ();
    fn is_alive(&self) -> bool {
        true
    }
}

fn limits(pool_size: usize) -> Limits {
    Limits {
        pool_size,
        reserve_size: 5,
        reserve_timeout: Duration::from_secs(5),
        wait_timeout: Duration::from_secs(120),
    }
}

async fn checkout(q: &Queue<Conn>, n: u64) -> Conn {
    match q.start(Instant::now()) {
        Start::Idle(c) => c,
        Start::Open => Conn(n),
        Start::Wait(t) => match t.wait().await {
            Grant::Conn(c) => c,
            Grant::Slot => Conn(n),
            Grant::TimedOut | Grant::Failed(()) => panic!("turned away in a benchmark"),
        },
    }
}

fn uncontended(c: &mut Criterion) {
    let q = Queue::<Conn>::new(limits(20));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("pool: checkout + checkin, idle connection ready", |b| {
        b.iter(|| {
            let conn = rt.block_on(checkout(&q, 0));
            black_box(conn.0);
            q.checkin(conn);
        })
    });
}

/// `clients` tasks each do checkout → yield → checkin `rounds` times on a pool of 20.
fn contended(workers: usize, clients: u64, rounds: u64) -> Duration {
    let rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .build()
    }
    .expect("runtime");
    rt.block_on(async {
        let q = Arc::new(Queue::<Conn>::new(limits(20)));
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let q = q.clone();
                tokio::spawn(async move {
                    for _ in 0..rounds {
                        let conn = checkout(&q, i).await;
                        tokio::task::yield_now().await; // the transaction
                        q.checkin(conn);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        start.elapsed()
    })
}

fn queued(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool: 1000 clients queued on 20 connections");
    for workers in [1, 2] {
        g.bench_function(format!("{workers} worker(s), per hand-off"), |b| {
            b.iter_custom(|iters| {
                let rounds = iters.div_ceil(1000).max(1);
                let took = contended(workers, 1000, rounds);
                took.mul_f64(iters as f64 / (rounds * 1000) as f64)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = uncontended, queued
}
criterion_main!(benches);
