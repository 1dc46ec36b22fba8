//! Cost of relaying one pgbench-like transaction through the relay's scanners, without
//! sockets: the client's messages are scanned (tags, lengths, statement names, the SQL of
//! Query/Parse for session state, the prepared-statement rewrite), then the server's
//! answers (ReadyForQuery, ParameterStatus, what Weir swallows or inserts), then both are
//! "written" (the buffers advance). One iteration is one `SELECT abalance … WHERE aid = $1`
//! transaction in each of pgbench's three protocols:
//!
//! - simple: `Query` → RowDescription, DataRow, CommandComplete, ReadyForQuery
//! - extended (libpq's PQexecParams): Parse(unnamed), Bind, Describe(portal), Execute, Sync
//!   → ParseComplete, BindComplete, RowDescription, DataRow, CommandComplete, ReadyForQuery
//! - prepared: Bind("P0_1"), Execute, Sync → BindComplete, DataRow, CommandComplete,
//!   ReadyForQuery (the client's statement is renamed to Weir's; the server has it)
//!
//! Run: `cargo bench --bench relay`.

use bytes::{Buf, BufMut, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use weir::backend::params::ParamSet;
use weir::backend::prepared::{ClientStatements, Registry, ServerStatements};
use weir::frontend::relay::{Relay, Statements};
use weir::wire::{build, TxStatus};

const SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
const SIMPLE_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";

#[path = "support/messages.rs"]
mod messages;

use messages::parse;

fn bind(stmt: &str) -> BytesMut {
    messages::bind(stmt, "48213")
}

fn short(tag: u8) -> [u8; 5] {
    [tag, 0, 0, 0, 4]
}

const DESCRIBE_PORTAL: &[u8] = b"D\0\0\0\x06P\0";
const EXECUTE: &[u8] = b"E\0\0\0\x09\0\0\0\0\0";

/// The server's answer to the SELECT itself.
fn result_rows(out: &mut BytesMut, describe: bool) {
    if describe {
        out.put(build::row_description(&[("abalance", 23, 4)]));
    }
    out.put(build::data_row(&[Some("-4211")]));
    out.put(build::command_complete("SELECT 1"));
    out.put(build::ready_for_query(TxStatus::Idle));
}

struct Stream {
    client: BytesMut,
    server: BytesMut,
}

fn simple() -> Stream {
    let mut server = BytesMut::new();
    result_rows(&mut server, true);
    Stream {
        client: build::query(SIMPLE_SQL),
        server,
    }
}

fn extended() -> Stream {
    let mut client = parse("", SQL);
    client.put(bind(""));
    client.put_slice(DESCRIBE_PORTAL);
    client.put_slice(EXECUTE);
    client.put_slice(&short(b'S'));
    let mut server = BytesMut::new();
    server.put_slice(&short(b'1'));
    server.put_slice(&short(b'2'));
    result_rows(&mut server, true);
    Stream { client, server }
}

fn prepared_run() -> Stream {
    let mut client = bind("P0_1");
    client.put_slice(EXECUTE);
    client.put_slice(&short(b'S'));
    let mut server = BytesMut::new();
    server.put_slice(&short(b'2'));
    result_rows(&mut server, false);
    Stream { client, server }
}

/// What a session keeps across transactions.
#[derive(Default)]
struct Session {
    stmts: ClientStatements,
    registry: Registry,
    server_stmts: ServerStatements,
    server_params: ParamSet,
    client_params: ParamSet,
    cbuf: BytesMut,
    sbuf: BytesMut,
}

impl Session {
    /// One transaction: client bytes in, scanned and written; server bytes in, scanned and
    /// written. Returns the bytes the client got (so nothing is optimised away).
    fn transaction(&mut self, s: &Stream) -> usize {
        let mut relay = Relay::new(usize::MAX);
        self.cbuf.extend_from_slice(&s.client);
        relay
            .scan_client(
                &mut self.cbuf,
                Statements {
                    client: &mut self.stmts,
                    registry: &self.registry,
                    server: &mut self.server_stmts,
                    capacity: 200,
                },
            )
            .expect("client stream scans");
        relay.insert_fakes(&mut self.sbuf);
        self.cbuf.advance(relay.up.ready);
        relay.up.ready = 0;
        self.sbuf.extend_from_slice(&s.server);
        let idle = relay
            .scan_server(
                &mut self.sbuf,
                &mut self.server_params,
                &mut self.server_stmts,
                &mut self.client_params,
                &mut self.stmts,
            )
            .expect("server stream scans");
        assert!(idle && relay.at_rest(), "the transaction ended");
        let n = relay.down.ready;
        self.sbuf.advance(n);
        relay.down.ready = 0;
        n
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay one transaction");
    group.throughput(Throughput::Elements(1));
    for (name, stream) in [("simple", simple()), ("extended", extended())] {
        let mut s = Session::default();
        group.bench_function(name, |b| b.iter(|| black_box(s.transaction(&stream))));
    }
    // Prepared: the client prepared "P0_1" once and the server holds Weir's statement.
    let mut s = Session::default();
    let mut setup = parse("P0_1", SQL);
    setup.put_slice(&short(b'S'));
    let mut answer = BytesMut::new();
    answer.put_slice(&short(b'1'));
    answer.put(build::ready_for_query(TxStatus::Idle));
    s.transaction(&Stream {
        client: setup,
        server: answer,
    });
    let stream = prepared_run();
    group.bench_function("prepared", |b| b.iter(|| black_box(s.transaction(&stream))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
