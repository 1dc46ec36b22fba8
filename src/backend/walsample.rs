//! Samples the WAL position of every server of a sharded database on a short interval
//! (`replica_lsn_interval`) for `router::wal`: a primary's insert position, a replica's
//! replay position, and whether each is in recovery. One task and one connection (outside
//! the pool's slots) per server; the tasks end when the router is dropped (reload).

use super::{Pool, ServerConn};
use crate::router::route::ShardRouter;
use crate::router::wal::parse_lsn;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// One query for either role: `p<insert lsn>` on a primary, `r<replay lsn>` in recovery.
const SAMPLE_SQL: &str = "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() \
     THEN 'r' || coalesce(pg_catalog.pg_last_wal_replay_lsn()::text, '0/0') \
     ELSE 'p' || pg_catalog.pg_current_wal_insert_lsn()::text END";

/// Starts the sampling tasks of `router`: `pools` are (shard, replica, pool) of every server.
pub fn start(router: &Arc<ShardRouter>, pools: Vec<(usize, Option<usize>, Arc<Pool>)>) {
    for (shard, replica, pool) in pools {
        tokio::spawn(sample_server(Arc::downgrade(router), pool, shard, replica));
    }
}

async fn sample_server(
    router: Weak<ShardRouter>,
    pool: Arc<Pool>,
    shard: usize,
    replica: Option<usize>,
) {
    let Some(wal) = router.upgrade().map(|r| r.wal.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(wal.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<ServerConn> = None;
    let mut failing = false;
    // A sample slower than this is given up (the server is treated as not answering).
    let limit = (wal.interval * 100).max(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if router
            .upgrade()
            .is_none_or(|r| r.retired.load(std::sync::atomic::Ordering::Relaxed))
        {
            return;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match tokio::time::timeout(limit, pool.connect_unpooled()).await {
                Ok(Ok(c)) => conn.insert(c),
                other => {
                    if !failing {
                        let error = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_string(),
                        };
                        tracing::warn!(database = %pool.settings.database, shard, ?replica, %error, "cannot sample WAL position");
                        failing = true;
                    }
                    // Not every tick: a server that is down is retried once a second.
                    tokio::time::sleep(Duration::from_secs(1).saturating_sub(wal.interval)).await;
                    continue;
                }
            },
        };
        let seq = match replica {
            None => wal.start_sample(shard),
            Some(_) => 0,
        };
        let value = match tokio::time::timeout(limit, c.query_row(SAMPLE_SQL)).await {
            Ok(Ok(row)) => row.into_iter().next().flatten(),
            _ => None,
        };
        let Some(value) = value else {
            conn = None;
            continue;
        };
        if failing {
            tracing::info!(database = %pool.settings.database, shard, ?replica, "WAL sampling resumed");
            failing = false;
        }
        let (role, lsn) = value.split_at(1.min(value.len()));
        let Some(lsn) = parse_lsn(lsn) else {
            conn = None;
            continue;
        };
        let in_recovery = role == "r";
        match replica {
            None => wal.primary_sampled(shard, seq, lsn, in_recovery),
            Some(r) => wal.replica_sampled(shard, r, in_recovery.then_some(lsn)),
        }
    }
}
