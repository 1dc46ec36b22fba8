//! Cost of Weir's prepared-statement rewrite on the client → server path:
//! a Bind naming a client statement is renamed to the Weir-wide statement,
//! with or without the Parse prepended for a server that lacks it.
//! Compared with an unnamed Bind, which passes through untouched.
//!
//! Run: `cargo bench --bench prepared`.

use bytes::{BufMut, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use weir::backend::prepared::{self, ClientStatements, Registry, ServerStatements};
use weir::frontend::relay::{Relay, Statements};

fn parse_msg(name: &str, q: &str) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(b'P');
    b.put_i32((4 + name.len() + 1 + q.len() + 1 + 2) as i32);
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(q.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    b
}

fn bind_msg(stmt: &str) -> BytesMut {
    let mut out = BytesMut::new();
    // one text parameter "12345"
    let mut rest = BytesMut::new();
    rest.put_i16(0);
    rest.put_i16(1);
    rest.put_i32(5);
    rest.put_slice(b"12345");
    rest.put_i16(0);
    prepared::put_bind(&mut out, "", stmt, &rest);
    out
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
