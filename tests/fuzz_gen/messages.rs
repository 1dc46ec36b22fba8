//! Protocol input: client message streams with plausible server replies (for the relay's
//! split property), startup packets, and SCRAM exchanges.

use super::pick;
use crate::mutate;
use rand::rngs::StdRng;
use rand::Rng;
use weir::wire::{build, TxStatus};

const QUERIES: &[&str] = &[
    "select 1",
    "SELECT * FROM orders WHERE customer_id = 42",
    "SET search_path = app, public",
    "SET LOCAL statement_timeout = 5",
    "set time zone 'UTC'",
    "RESET ALL",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "deallocate prepare s1",
    "PREPARE p AS select $1::int",
    "ALTER TABLE t ADD COLUMN c int",
    "CREATE OR REPLACE VIEW v AS select 1",
    "LISTEN chan",
    "select pg_advisory_lock(1)",
    "create temp table tmp(a int)",
    "DECLARE c CURSOR WITH HOLD FOR select 1",
    "BEGIN",
    "COMMIT",
    "COPY t FROM STDIN",
    "select 'it''s'; select $$dollar$$",
    "/* weir: shard=1 */ select 1",
    "",
];

const NAMES: &[&str] = &["", "", "s1", "s2", "s3", "weir_1"];

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// One frontend message of the extended or simple protocol, and its kind for replying.
fn client_message(rng: &mut StdRng) -> (u8, Vec<u8>) {
    let mut body = Vec::new();
    let tag = match rng.gen_range(0..20) {
        0..=2 => {
            cstr(&mut body, pick(rng, QUERIES));
            b'Q'
        }
        3..=5 => {
            cstr(&mut body, pick(rng, NAMES));
            cstr(&mut body, pick(rng, QUERIES));
            let types = rng.gen_range(0..3u16);
            body.extend_from_slice(&types.to_be_bytes());
            for _ in 0..types {
                body.extend_from_slice(&rng.gen_range(16..30u32).to_be_bytes());
            }
            b'P'
        }
        6..=8 => {
            bind_body(rng, &mut body);
            b'B'
        }
        9 | 10 => {
            body.push(if rng.gen_bool(0.5) { b'S' } else { b'P' });
            cstr(&mut body, pick(rng, NAMES));
            if rng.gen_bool(0.5) {
                b'D'
            } else {
                b'C'
            }
        }
        11 | 12 => {
            cstr(&mut body, "");
            body.extend_from_slice(&rng.gen_range(0..3i32).to_be_bytes());
            b'E'
        }
        13 | 14 => b'S',
        15 => b'H',
        16 => {
            let n = rng.gen_range(0..40);
            body.extend((0..n).map(|_| rng.gen::<u8>()));
            *[b'd', b'c', b'f'].get(rng.gen_range(0..3)).unwrap_or(&b'd')
        }
        17 => {
            body.extend_from_slice(&1247u32.to_be_bytes());
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            b'F'
        }
        18 if rng.gen_bool(0.2) => b'X',
        18 => {
            cstr(&mut body, "secret");
            b'p'
        }
        _ => {
            cstr(&mut body, pick(rng, QUERIES));
            b'Q'
        }
    };
    (tag, message(tag, &body))
}

fn bind_body(rng: &mut StdRng, body: &mut Vec<u8>) {
    cstr(body, "");
    cstr(body, pick(rng, NAMES));
    let formats = rng.gen_range(0..3u16);
    body.extend_from_slice(&formats.to_be_bytes());
    for _ in 0..formats {
        body.extend_from_slice(&rng.gen_range(0..2u16).to_be_bytes());
    }
    let params = rng.gen_range(0..3u16);
    body.extend_from_slice(&params.to_be_bytes());
    for _ in 0..params {
        if rng.gen_bool(0.2) {
            body.extend_from_slice(&(-1i32).to_be_bytes());
        } else {
            let value = rng.gen_range(-5..100_000i64).to_string();
            body.extend_from_slice(&(value.len() as i32).to_be_bytes());
            body.extend_from_slice(value.as_bytes());
        }
    }
    body.extend_from_slice(&0u16.to_be_bytes());
}

/// What PostgreSQL would answer to the client message `tag`, with the odd error.
fn reply(rng: &mut StdRng, tag: u8, out: &mut Vec<u8>) {
    let error = rng.gen_bool(0.08);
    if error && tag != b'S' && tag != b'H' {
        let text = if rng.gen_bool(0.3) {
            "cached plan must not change result type"
        } else {
            "boom"
        };
        out.extend_from_slice(&build::error("ERROR", "XX000", text));
        if tag == b'Q' {
            out.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        }
        return;
    }
    match tag {
        b'Q' => {
            rows(rng, out);
            if rng.gen_bool(0.2) {
                out.extend_from_slice(&build::parameter_status(
                    pick(rng, &["TimeZone", "application_name", "search_path"]),
                    pick(rng, &["UTC", "app", "x"]),
                ));
            }
            let status = [TxStatus::Idle, TxStatus::InBlock, TxStatus::Failed]
                .get(rng.gen_range(0..3))
                .copied()
                .unwrap_or_default();
            out.extend_from_slice(&build::ready_for_query(status));
        }
        b'P' => out.extend_from_slice(&message(b'1', &[])),
        b'B' => out.extend_from_slice(&message(b'2', &[])),
        b'C' => out.extend_from_slice(&message(b'3', &[])),
        b'D' => {
            out.extend_from_slice(&message(b't', &[0, 0]));
            out.extend_from_slice(&build::row_description(&[("a", 23, 4)]));
        }
        b'E' => rows(rng, out),
        b'S' => out.extend_from_slice(&build::ready_for_query(TxStatus::Idle)),
        b'F' => {
            out.extend_from_slice(&message(b'V', &[0, 0, 0, 1, b'x']));
            out.extend_from_slice(&build::ready_for_query(TxStatus::Idle));
        }
        b'd' if rng.gen_bool(0.3) => out.extend_from_slice(&message(b'G', &[0, 0, 0])),
        _ => {}
    }
}

fn rows(rng: &mut StdRng, out: &mut Vec<u8>) {
    out.extend_from_slice(&build::row_description(&[("n", 23, 4)]));
    for _ in 0..rng.gen_range(0..3) {
        out.extend_from_slice(&build::data_row(&[Some("1"), None]));
    }
    out.extend_from_slice(&build::command_complete("SELECT 1"));
}

/// A `frame_scanner` input: a client stream and the server's replies to it.
pub fn relay_input(rng: &mut StdRng) -> Vec<u8> {
    let mut client = Vec::new();
    let mut server = Vec::new();
    for _ in 0..rng.gen_range(0..24) {
        let (tag, m) = client_message(rng);
        client.extend_from_slice(&m);
        reply(rng, tag, &mut server);
    }
    if rng.gen_bool(0.15) {
        client = mutate(rng, client);
    }
    if rng.gen_bool(0.15) {
        server = mutate(rng, server);
    }
    weir::fuzzing::frame_scanner_input(rng.gen(), rng.gen(), &client, &server)
}

const PARAMS: &[&str] = &[
    "user",
    "database",
    "application_name",
    "options",
    "client_encoding",
    "replication",
    "search_path",
    "x",
];

/// A `startup_packet` input: StartupMessage, CancelRequest, SSL/GSS requests, other versions.
pub fn startup_input(rng: &mut StdRng) -> Vec<u8> {
    let packet = match rng.gen_range(0..6) {
        0..=2 => {
            let n = rng.gen_range(0..5);
            let values: Vec<String> = (0..n)
                .map(|i| format!("v{i}-{}", rng.gen::<u16>()))
                .collect();
            let params: Vec<(&str, &str)> = values
                .iter()
                .map(|v| (pick(rng, PARAMS), v.as_str()))
                .collect();
            build::startup(&params).to_vec()
        }
        3 => build::cancel_request(rng.gen(), rng.gen()).to_vec(),
        4 => {
            let code: i32 = *[80_877_103, 80_877_104, 131_072, rng.gen()]
                .get(rng.gen_range(0..4))
                .unwrap_or(&0);
            let mut p = 8i32.to_be_bytes().to_vec();
            p.extend_from_slice(&code.to_be_bytes());
            p
        }
        _ => (0..rng.gen_range(0..24)).map(|_| rng.gen()).collect(),
    };
    if rng.gen_bool(0.3) {
        mutate(rng, packet)
    } else {
        packet
    }
}

/// A `scram_messages` input (see the target for the layout).
pub fn scram_input(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..4) {
        0 => vec![1, 0],
        1 => {
            let mut v = vec![1, 1];
            let pw = pick(
                rng,
                &[
                    "pencil ",
                    "Pencil",
                    "pen\u{ad}cil",
                    "wrong",
                    "",
                    "p\u{e9}ncil",
                ],
            );
            v.extend_from_slice(pw.as_bytes());
            v
        }
        _ => {
            let first = pick(
                rng,
                &[
                    "n,,n=,r=rOprNGfwEbeRWgbNEkqO",
                    "y,,n=user,r=abc",
                    "n,,r=",
                    "p=tls-server-end-point,,n=,r=x",
                    "n,a=admin,n=,r=x",
                    "n,,n=,",
                    "garbage",
                ],
            );
            let last = pick(
                rng,
                &[
                    "c=biws,r=x,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                    "c=biws,r=x,p=AAAA",
                    "c=biws,r=x,p=!!",
                    "c=biws,r=x",
                    "r=,p=",
                    "",
                ],
            );
            let mut v = vec![0];
            v.extend_from_slice(first.as_bytes());
            v.push(0);
            v.extend_from_slice(last.as_bytes());
            if rng.gen_bool(0.3) {
                mutate(rng, v)
            } else {
                v
            }
        }
    }
}
