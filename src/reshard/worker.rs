//! One worker per old shard: creates its replication slot (exporting a snapshot), copies
//! the shard's rows as of that snapshot to the new shards — each row to the shard the new
//! hash names, through the sharded COPY splitter — then streams every change committed
//! after the snapshot from the slot and applies it the same way, until the reshard ends.
//!
//! Exactly once: the slot's snapshot is the state its stream starts after, so a row is
//! either in the copy or in the stream, never both, never neither.

use super::apply::{self, Layout, Out, Rel};
use super::conn::{self, Result};
use super::pgoutput::{self, Message, Stream};
use super::plan::Table;
use super::Progress;
use crate::backend::params::quote_literal;
use crate::backend::{Pool, ServerConn};
use crate::router::copy::{CopyFormat, CopyOptions, RowSplitter};
use crate::router::{parse_key, shard_for, KeyValue};
use crate::wire::tag;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The prefix of the logical messages the cutover emits to mark "everything before here".
pub const MARKER_PREFIX: &str = "weir_reshard";

/// Buffered COPY data per new shard before it is sent.
const COPY_CHUNK: usize = 256 * 1024;
/// Statements applied in one round trip at most.
const MAX_BATCH: usize = 5_000;
/// Replicated bytes behind one round trip at most (a batch of big rows is flushed early).
const MAX_BATCH_BYTES: usize = 8 << 20;

/// What the coordinator sees of a worker.
pub struct WorkerState {
    pub old_shard: usize,
    /// Its rows are copied (it then waits for `post_data`).
    pub copied: AtomicBool,
    /// Streaming changes.
    pub streaming: AtomicBool,
    /// The last marker (see [`MARKER_PREFIX`]) whose preceding changes are committed.
    pub marker: watch::Sender<u64>,
}

impl WorkerState {
    pub fn new(old_shard: usize) -> Arc<WorkerState> {
        Arc::new(WorkerState {
            old_shard,
            copied: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
            marker: watch::channel(0).0,
        })
    }
}

/// What every worker of a job shares.
pub struct Job {
    pub progress: Arc<Progress>,
    pub tables: Vec<Table>,
    pub old_shards: usize,
    pub new_pools: Vec<Arc<Pool>>,
    /// Slot and publication name of old shard `i`: `{names}_{i}`.
    pub names: String,
    pub cancel: CancellationToken,
    /// Set once the indexes and constraints are on the new shards (streaming starts then).
    pub post_data: watch::Receiver<bool>,
}

impl Job {
    pub fn slot(&self, shard: usize) -> String {
        format!("{}_{shard}", self.names)
    }

    /// Tables old shard `shard` holds rows of.
    pub fn tables_of(&self, shard: usize) -> impl Iterator<Item = &Table> {
        self.tables.iter().filter(move |t| t.on_old_shard(shard))
    }
}

/// Runs old shard `state.old_shard`'s copy and stream until cancelled or failed.
pub async fn run(job: Arc<Job>, state: Arc<WorkerState>, pool: Arc<Pool>) -> Result<()> {
    let shard = state.old_shard;
    let mut params = conn::SESSION.to_vec();
    params.push(("replication", "database"));
    let mut repl = pool
        .connect_unpooled_with(&params)
        .await
        .map_err(|e| format!("replication connection to old shard {shard}: {e}"))?;
    let slot = job.slot(shard);
    let row = conn::query(
        &mut repl,
        &format!("CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput EXPORT_SNAPSHOT"),
    )
    .await
    .map_err(|e| format!("creating replication slot on old shard {shard}: {e}"))?;
    let row = row.into_iter().next().unwrap_or_default();
    let consistent = row
        .get(1)
        .cloned()
        .flatten()
        .and_then(|l| crate::router::wal::parse_lsn(&l))
        .ok_or("CREATE_REPLICATION_SLOT returned no consistent point")?;
    let snapshot = row
        .get(2)
        .cloned()
        .flatten()
        .ok_or("CREATE_REPLICATION_SLOT returned no snapshot")?;

    let mut targets = Vec::with_capacity(job.new_pools.len());
    for (j, p) in job.new_pools.iter().enumerate() {
        let mut c = p
            .connect_unpooled_with(conn::SESSION)
            .await
            .map_err(|e| format!("connection to new shard {j}: {e}"))?;
        // Replicated changes must not fire the new shards' triggers (or foreign-key
        // checks, which run before the rows of other old shards arrived).
        conn::query(&mut c, "SET session_replication_role = replica")
            .await
            .map_err(|e| {
                format!("new shard {j}: {e} (RESHARD applies changes as a superuser would)")
            })?;
        targets.push(c);
    }
    let mut source = pool
        .connect_unpooled_with(conn::SESSION)
        .await
        .map_err(|e| format!("connection to old shard {shard}: {e}"))?;
    conn::query(
        &mut source,
        &format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&snapshot)
        ),
    )
    .await?;
    let copying = async {
        for table in job.tables_of(shard) {
            copy_table(&job, shard, table, &mut source, &mut targets).await?;
            job.progress.tables_done.fetch_add(1, Ordering::Relaxed);
        }
        conn::query(&mut source, "COMMIT").await.map(|_| ())
    };
    tokio::select! {
        r = copying => r?,
        _ = job.cancel.cancelled() => return Ok(()),
    }
    drop(source);
    state.copied.store(true, Ordering::Release);

    let mut post = job.post_data.clone();
    tokio::select! {
        r = post.wait_for(|done| *done) => { r.map_err(|_| "reshard ended")?; }
        _ = job.cancel.cancelled() => return Ok(()),
    }
    stream(&job, &state, &mut repl, consistent, targets).await
}

/// Copies one table's rows of old shard `shard` (inside the slot's snapshot) to the new
/// shards: text COPY out, rows split by key, one COPY in per new shard that gets rows.
async fn copy_table(
    job: &Job,
    shard: usize,
    table: &Table,
    source: &mut ServerConn,
    targets: &mut [ServerConn],
) -> Result<()> {
    let cols = table.column_list();
    let name = table.qualified();
    conn::copy_out_start(source, &format!("COPY {name} {cols} TO STDOUT")).await?;
    let into = format!("COPY {name} {cols} FROM STDIN");
    let n = targets.len();
    let mut started = vec![false; n];
    let mut out: Vec<BytesMut> = (0..n).map(|_| BytesMut::new()).collect();
    let mut splitter = table
        .key
        .map(|(k, _)| RowSplitter::new(&CopyOptions::new(CopyFormat::Text), k, 1 << 30));
    let mut rows = Vec::new();
    let mut count = 0u64;
    loop {
        let chunk = tokio::select! {
            c = conn::copy_out_next(source) => c?,
            _ = job.cancel.cancelled() => return Err("cancelled".into()),
        };
        let Some(chunk) = chunk else { break };
        let data = crate::wire::body(&chunk);
        match (&mut splitter, table.key) {
            (Some(sp), Some((_, kt))) => {
                sp.push(data, &mut rows)
                    .map_err(|e| e.message().to_string())?;
                for row in rows.drain(..) {
                    let key = match &row.key {
                        None => KeyValue::Null,
                        Some(k) => {
                            let text = std::str::from_utf8(k)
                                .map_err(|_| format!("{name}: key is not UTF-8"))?;
                            parse_key(kt, text).map_err(|e| format!("{name}: {e}"))?
                        }
                    };
                    let to = shard_for(kt, &key, n as u64).map_err(|e| e.to_string())? as usize;
                    crate::wire::build::put_copy_data(&mut out[to], &row.bytes);
                    count += 1;
                }
            }
            _ => {
                // Unsharded: shard 0's rows go to new shard 0 as they are.
                crate::wire::build::put_copy_data(&mut out[0], data);
                count += data.iter().filter(|&&b| b == b'\n').count() as u64;
            }
        }
        for j in 0..n {
            if out[j].len() >= COPY_CHUNK {
                if !started[j] {
                    conn::copy_in_start(&mut targets[j], &into).await?;
                    started[j] = true;
                }
                let bytes = out[j].split();
                conn::send(&mut targets[j], &bytes).await?;
            }
        }
        job.progress.rows_copied.fetch_add(count, Ordering::Relaxed);
        count = 0;
    }
    if let Some(sp) = &mut splitter {
        sp.finish(&mut rows).map_err(|e| e.message().to_string())?;
        if !rows.is_empty() {
            return Err(format!("{name}: COPY data ended inside a row"));
        }
    }
    for j in 0..n {
        if out[j].is_empty() && !started[j] {
            continue;
        }
        if !started[j] {
            conn::copy_in_start(&mut targets[j], &into).await?;
        }
        let bytes = out[j].split();
        conn::send(&mut targets[j], &bytes).await?;
        conn::copy_in_end(&mut targets[j], &[])
            .await
            .map_err(|e| format!("copying {name} from old shard {shard} to new shard {j}: {e}"))?;
    }
    Ok(())
}

/// Streams the slot's changes and applies them, batching what arrives together into one
/// round trip per new shard; reports its position to the server after each batch.
async fn stream(
    job: &Job,
    state: &WorkerState,
    repl: &mut ServerConn,
    from: u64,
    mut targets: Vec<ServerConn>,
) -> Result<()> {
    let shard = state.old_shard;
    let slot = job.slot(shard);
    let start = format!(
        "START_REPLICATION SLOT \"{slot}\" LOGICAL {} (proto_version '1', publication_names '\"{slot}\"', messages 'true')",
        crate::router::wal::format_lsn(from)
    );
    conn::start_expecting(repl, &start, tag::COPY_BOTH_RESPONSE)
        .await
        .map_err(|e| format!("START_REPLICATION on old shard {shard}: {e}"))?;
    state.streaming.store(true, Ordering::Release);
    let layout = Layout {
        old_shard: shard,
        old_shards: job.old_shards,
        new_shards: targets.len(),
    };
    let mut rels: HashMap<u32, Rel> = HashMap::new();
    let mut out: Vec<Out> = vec![Out::new(); targets.len()];
    let mut pending = 0usize;
    let mut pending_bytes = 0usize;
    let mut in_tx = false;
    // Position of the last commit seen, and of everything committed on the new shards.
    let mut seen = from;
    let mut flushed = from;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut marker: Option<u64> = None;
    loop {
        let msg = tokio::select! {
            m = conn::recv(repl) => Some(m?),
            _ = tick.tick() => None,
            _ = job.cancel.cancelled() => return Ok(()),
        };
        let Some(msg) = msg else {
            conn::send(repl, &conn::status_update(flushed)).await?;
            continue;
        };
        match msg[0] {
            b'd' => {}
            tag::ERROR_RESPONSE => {
                return Err(format!(
                    "replication from old shard {shard}: {}",
                    conn::error_text(&msg)
                ))
            }
            b'c' => return Err(format!("old shard {shard} ended replication")),
            _ => continue,
        }
        match pgoutput::stream(crate::wire::body(&msg))? {
            Stream::Keepalive { wal_end, reply } => {
                if !in_tx && pending == 0 && wal_end > flushed {
                    // Nothing of ours before this position is left to apply.
                    flushed = wal_end;
                    seen = seen.max(wal_end);
                }
                if reply {
                    conn::send(repl, &conn::status_update(flushed)).await?;
                }
            }
            Stream::XLogData { data, .. } => match pgoutput::message(data).inspect(|_| {
                pending_bytes += data.len();
            })? {
                Message::Begin => in_tx = true,
                Message::Commit { end_lsn } => {
                    in_tx = false;
                    seen = end_lsn;
                }
                Message::Relation(r) => {
                    let rel = Rel::new(&r, &job.tables)?;
                    rels.insert(r.oid, rel);
                }
                Message::Insert { rel, new } => {
                    apply::insert(rel_of(&rels, rel)?, &layout, &new, &mut out)?;
                    pending += 1;
                }
                Message::Update { rel, old, new } => {
                    apply::update(rel_of(&rels, rel)?, &layout, old.as_deref(), &new, &mut out)?;
                    pending += 1;
                }
                Message::Delete { rel, old } => {
                    apply::delete(rel_of(&rels, rel)?, &layout, &old, &mut out)?;
                    pending += 1;
                }
                Message::Truncate { rels: ids } => {
                    let list: Vec<&Rel> = ids
                        .iter()
                        .map(|id| rel_of(&rels, *id))
                        .collect::<Result<_>>()?;
                    apply::truncate(&list, &layout, &mut out)?;
                    pending += 1;
                }
                Message::Emitted { prefix, content } if prefix == MARKER_PREFIX => {
                    marker = std::str::from_utf8(&content)
                        .ok()
                        .and_then(|s| s.parse().ok());
                }
                _ => {}
            },
        }
        let idle = !conn::has_buffered_message(repl);
        let full = pending >= MAX_BATCH || pending_bytes >= MAX_BATCH_BYTES;
        if pending > 0 && ((!in_tx && idle) || full || marker.is_some()) {
            apply_batch(&mut targets, &mut out).await?;
            job.progress
                .changes_applied
                .fetch_add(pending as u64, Ordering::Relaxed);
            pending = 0;
            pending_bytes = 0;
            if !in_tx {
                flushed = seen;
            }
            conn::send(repl, &conn::status_update(flushed)).await?;
        } else if pending == 0 && !in_tx && seen > flushed {
            // Transactions that touched nothing of ours.
            flushed = seen;
        }
        if pending == 0 {
            pending_bytes = 0;
        }
        if let Some(token) = marker.take() {
            tracing::debug!(shard, token, "reshard marker applied");
            state.marker.send_replace(token);
        }
    }
}

fn rel_of(rels: &HashMap<u32, Rel>, id: u32) -> Result<&Rel> {
    rels.get(&id)
        .ok_or_else(|| format!("change for relation {id} before its description"))
}

/// Sends each new shard its statements as one implicit transaction, all shards at once.
async fn apply_batch(targets: &mut [ServerConn], out: &mut [Out]) -> Result<()> {
    let mut sent = vec![false; targets.len()];
    for (j, stmts) in out.iter_mut().enumerate() {
        if stmts.is_empty() {
            continue;
        }
        let mut sql = stmts.join(";\n");
        sql.push(';');
        stmts.clear();
        conn::start(&mut targets[j], &sql).await?;
        sent[j] = true;
    }
    for (j, t) in targets.iter_mut().enumerate() {
        if sent[j] {
            conn::finish(t)
                .await
                .map_err(|e| format!("applying changes on new shard {j}: {e}"))?;
        }
    }
    Ok(())
}
