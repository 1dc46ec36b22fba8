//! Cost of Weir's prepared-statement rewrite on the client → server path:
//! a Bind naming a client statement is renamed to the Weir-wide statement,
//! with or without the Parse prepended for a server that lacks it.
//! Compared with an unnamed Bind, which passes through untouched.
//!
//! Run: `cargo bench --bench prepared`.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use weir::backend::prepared::{ClientStatements, Registry, ServerStatements};
use weir::frontend::relay::{Relay, Statements};

#[path = "support/messages.rs"]
mod messages;

fn parse_msg(name: &str, q: &str) -> BytesMut {
    messages::parse(name, q)
}

fn bind_msg(stmt: &str) -> BytesMut {
    messages::bind(stmt, "12345")
}

struct World {
    stmts: ClientStatements,
    registry: Registry,
    server: ServerStatements,
}

fn run(w: &mut World, input: &[u8]) -> usize {
    let mut buf = BytesMut::from(input);
    let mut relay = Relay::new(usize::MAX);
    let _ = relay.scan_client(
        &mut buf,
        Statements {
            client: &mut w.stmts,
            registry: &w.registry,
            server: &mut w.server,
            capacity: 200,
        },
    );
    relay.up.ready
}

fn bench(c: &mut Criterion) {
    let query = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let mut w = World {
        stmts: ClientStatements::default(),
        registry: Registry::default(),
        server: ServerStatements::default(),
    };
    // The client prepares "P0_1" once; the server holds it afterwards.
    run(&mut w, &parse_msg("P0_1", query));
    let mut named = bind_msg("P0_1");
    named.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
    let mut unnamed = bind_msg("");
    unnamed.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");

    c.bench_function("bind_unnamed_passthrough", |b| {
        b.iter(|| run(&mut w, black_box(&unnamed)))
    });
    c.bench_function("bind_named_server_has_it", |b| {
        b.iter(|| run(&mut w, black_box(&named)))
    });
    c.bench_function("bind_named_reprepare", |b| {
        b.iter(|| {
            // A server that lacks the statement: Parse is prepended.
            w.server = ServerStatements::default();
            run(&mut w, black_box(&named))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
