//! The relay's message scanners under arbitrary bytes.
//!
//! A socket hands the relay a stream in whatever pieces TCP and TLS produce, and the relay
//! writes onward whatever it has scanned whenever the peer can take it. So scanning must not
//! depend on where a read ended or how much was flushed in between: a stream fed in any
//! pieces, with any partial flushes, must leave the same bytes forwarded, the same bytes
//! waiting, and the same protocol state as the stream scanned in one go. [`World`] is one
//! relay (client scanner, then server scanner over the replies, sharing the tracker as a
//! session does); [`split_equals_whole`] runs two of them and compares.

use crate::backend::params::ParamSet;
use crate::backend::prepared::{self, ClientStatements, Registry, ServerStatements};
use crate::frontend::relay::{Relay, Statements};
use crate::frontend::sqlscan::Seen;
use crate::router::route::BindParams;
use crate::wire::{self, WireError};
use bytes::{Buf, BytesMut};

/// The scanners stream a message over 64 KiB onward before it is complete (by design: it is
/// not buffered whole), so for such messages what is observed does depend on the split.
/// Streams up to this size cannot hold a complete message that big.
const SPLIT_LIMIT: usize = 64 * 1024;

/// Walks `data` as a sequence of tagged messages, reading every body the way Weir does.
pub fn frames(data: &[u8]) {
    let mut rest = data;
    loop {
        match wire::header(rest) {
            Ok(Some(h)) => {
                assert!(h.total >= 5 && h.total <= wire::MAX_MESSAGE_LEN + 1);
                let Some(msg) = rest.get(..h.total) else {
                    return;
                };
                read_body(msg);
                rest = &rest[h.total..];
            }
            Ok(None) => {
                assert!(rest.len() < 5, "a header is read once 5 bytes are there");
                return;
            }
            Err(_) => return,
        }
    }
}

/// Every body reader Weir applies to a complete message, whatever its tag.
fn read_body(msg: &[u8]) {
    assert_eq!(wire::body(msg).len(), msg.len() - 5);
    let _ = wire::error_fields(msg);
    let _ = wire::parameter_status(msg);
    if let Some((_, rest)) = prepared::parse_parts(msg) {
        let _ = prepared::parse_query(rest);
    }
    let _ = prepared::bind_parts(msg);
    let _ = prepared::target_parts(msg);
    if let Some(params) = BindParams::parse(msg) {
        for n in 0..=17 {
            let _ = params.get(n);
        }
    }
    for pos in [0, 5, msg.len(), msg.len() + 1] {
        let _ = wire::cstr(msg, pos);
    }
}

/// What the split-check derives from the first bytes of its input.
struct Plan<'a> {
    capacity: usize,
    budget: usize,
    client: &'a [u8],
    server: &'a [u8],
    pieces: Pieces,
}

/// Input layout: flags, seed, a big-endian u16 where the client stream ends, then the client
/// stream followed by the server's replies. Flags: bits 0-1 `max_prepared_statements`,
/// bit 2 a scan budget of 16 × seed bytes (a sharded session's routed unit).
fn plan(data: &[u8]) -> Option<Plan<'_>> {
    let (&flags, rest) = data.split_first()?;
    let (&seed, rest) = rest.split_first()?;
    let (cut, stream) = rest.split_first_chunk::<2>()?;
    let cut = usize::from(u16::from_be_bytes(*cut)) % (stream.len() + 1);
    let (client, server) = stream.split_at(cut);
    Some(Plan {
        capacity: usize::from(flags & 3),
        budget: if flags & 4 != 0 {
            usize::from(seed) * 16
        } else {
            usize::MAX
        },
        client,
        server,
        pieces: Pieces::new(flags, seed, stream.len()),
    })
}

/// Builds a [`super::frame_scanner`] input from a client stream and the server's replies.
pub fn input(flags: u8, seed: u8, client: &[u8], server: &[u8]) -> Vec<u8> {
    let cut = u16::try_from(client.len()).unwrap_or(u16::MAX);
    let mut out = vec![flags, seed];
    out.extend_from_slice(&cut.to_be_bytes());
    out.extend_from_slice(client);
    out.extend_from_slice(server);
    out
}

/// Feeds the input's streams whole to one relay and in pieces to another, and asserts both
/// end in the same state.
pub fn split_equals_whole(data: &[u8]) {
    if data.len() > SPLIT_LIMIT {
        return;
    }
    let Some(mut plan) = plan(data) else {
        return;
    };
    let mut whole = World::new(plan.capacity, plan.budget);
    whole.feed_client(plan.client);
    whole.end_client();
    whole.feed_server(plan.server);

    let mut split = World::new(plan.capacity, plan.budget);
    for piece in plan.pieces.split(plan.client) {
        split.feed_client(piece);
        let n = plan.pieces.below(split.relay.up.ready);
        split.flush_up(n);
    }
    split.end_client();
    for piece in plan.pieces.split(plan.server) {
        split.feed_server(piece);
        let n = plan.pieces.below(split.relay.down.ready);
        split.flush_down(n);
    }
    assert_eq!(
        whole.summary(),
        split.summary(),
        "scanning in pieces differs from scanning whole"
    );
}

/// Piece sizes and flush amounts, from a small generator seeded by the input.
struct Pieces {
    state: u64,
    max: usize,
}

impl Pieces {
    fn new(flags: u8, seed: u8, len: usize) -> Pieces {
        let max = match seed & 3 {
            0 => 1,
            1 => 7,
            2 => 64,
            _ => 1024,
        };
        let state = (u64::from(flags) << 40 | u64::from(seed) << 32 | len as u64) | 1;
        Pieces { state, max }
    }

    /// xorshift64: deterministic, so a failing input reproduces.
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// A number in `0..=n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % (n as u64 + 1)) as usize
    }

    fn split<'a>(&mut self, mut stream: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !stream.is_empty() {
            let n = (1 + self.below(self.max - 1)).min(stream.len());
            let (piece, rest) = stream.split_at(n);
            out.push(piece);
            stream = rest;
        }
        out
    }
}

/// One relay's state: what a session keeps across reads.
#[derive(Default)]
struct World {
    capacity: usize,
    stmts: ClientStatements,
    registry: Registry,
    prepared: ServerStatements,
    relay: Relay,
    cbuf: BytesMut,
    up_sent: Vec<u8>,
    sbuf: BytesMut,
    down_sent: Vec<u8>,
    server_params: ParamSet,
    client_params: ParamSet,
    /// The first protocol error; the session closes then, so nothing more is scanned.
    error: Option<String>,
}

fn describe(e: &WireError) -> String {
    format!("{e:?}")
}

/// What must not depend on how the streams arrived.
#[derive(Debug, PartialEq)]
struct Summary {
    up_scanned: Vec<u8>,
    up_waiting: Vec<u8>,
    up_pass: usize,
    down_scanned: Vec<u8>,
    down_waiting: Vec<u8>,
    down_pass: usize,
    progress: String,
    tracker: String,
    seen: Seen,
    skip_to_sync: bool,
    server_statements: usize,
    registry: usize,
    server_params: ParamSet,
    client_params: ParamSet,
    error: Option<String>,
}

impl World {
    fn new(capacity: usize, budget: usize) -> World {
        World {
            capacity,
            relay: Relay::new(budget),
            ..World::default()
        }
    }

    fn feed_client(&mut self, piece: &[u8]) {
        self.cbuf.extend_from_slice(piece);
        if self.error.is_some() {
            return;
        }
        let scanned = self.relay.scan_client(
            &mut self.cbuf,
            Statements {
                client: &mut self.stmts,
                registry: &self.registry,
                server: &mut self.prepared,
                capacity: self.capacity,
            },
        );
        self.error = scanned.err().as_ref().map(describe);
        assert!(
            self.relay.up.ready <= self.cbuf.len(),
            "scanned past the buffer"
        );
    }

    /// As the session does after scanning client bytes: Weir's own answers go out at the
    /// current boundary of the server's stream.
    fn end_client(&mut self) {
        if self.error.is_none() {
            self.relay.insert_fakes(&mut self.sbuf);
        }
    }

    fn feed_server(&mut self, piece: &[u8]) {
        self.sbuf.extend_from_slice(piece);
        if self.error.is_some() {
            return;
        }
        let scanned = self.relay.scan_server(
            &mut self.sbuf,
            &mut self.server_params,
            &mut self.prepared,
            &mut self.client_params,
            &mut self.stmts,
        );
        self.error = scanned.err().as_ref().map(describe);
        assert!(
            self.relay.down.ready <= self.sbuf.len(),
            "scanned past the buffer"
        );
    }

    /// Writes `n` scanned client bytes onward, as a partial socket write would.
    fn flush_up(&mut self, n: usize) {
        let n = n.min(self.relay.up.ready);
        self.up_sent.extend_from_slice(&self.cbuf[..n]);
        self.cbuf.advance(n);
        self.relay.up.ready -= n;
    }

    fn flush_down(&mut self, n: usize) {
        let n = n.min(self.relay.down.ready);
        self.down_sent.extend_from_slice(&self.sbuf[..n]);
        self.sbuf.advance(n);
        self.relay.down.ready -= n;
    }

    fn summary(&self) -> Summary {
        let joined = |sent: &[u8], buf: &BytesMut, ready: usize| {
            let mut all = sent.to_vec();
            all.extend_from_slice(&buf[..ready]);
            (all, buf[ready..].to_vec())
        };
        let (up_scanned, up_waiting) = joined(&self.up_sent, &self.cbuf, self.relay.up.ready);
        let (down_scanned, down_waiting) =
            joined(&self.down_sent, &self.sbuf, self.relay.down.ready);
        Summary {
            up_scanned,
            up_waiting,
            up_pass: self.relay.up.pass,
            down_scanned,
            down_waiting,
            down_pass: self.relay.down.pass,
            progress: format!("{:?}", self.relay.progress),
            tracker: format!("{:?}", self.relay.tracker),
            seen: self.relay.seen.clone(),
            skip_to_sync: self.relay.skip_to_sync,
            server_statements: self.prepared.len(),
            registry: self.registry.len(),
            server_params: self.server_params.clone(),
            client_params: self.client_params.clone(),
            error: self.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::build;

    fn parse(name: &str, q: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for s in [name, q] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
        body.extend_from_slice(&[0, 0]);
        let mut m = vec![b'P'];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn batch() -> (Vec<u8>, Vec<u8>) {
        let mut client = build::query("SET search_path = a").to_vec();
        client.extend_from_slice(&parse("s1", "select 1"));
        client.extend_from_slice(b"S\0\0\0\x04");
        let mut server = build::command_complete("SET").to_vec();
        server.extend_from_slice(&build::parameter_status("TimeZone", "UTC"));
        server.extend_from_slice(&build::ready_for_query(crate::wire::TxStatus::Idle));
        server.extend_from_slice(b"1\0\0\0\x04");
        server.extend_from_slice(&build::ready_for_query(crate::wire::TxStatus::Idle));
        (client, server)
    }

    #[test]
    fn a_batch_fed_byte_by_byte_scans_as_it_does_whole() {
        let (client, server) = batch();
        // Seed 0: one-byte pieces; flags 2: named statements on.
        let data = input(2, 0, &client, &server);
        let plan = plan(&data).unwrap();
        assert_eq!((plan.client, plan.server), (&client[..], &server[..]));
        split_equals_whole(&data);

        let mut whole = World::new(2, usize::MAX);
        whole.feed_client(&client);
        whole.end_client();
        whole.feed_server(&server);
        let s = whole.summary();
        assert_eq!(s.error, None);
        assert!(
            s.up_scanned.len() > client.len() / 2,
            "the batch was forwarded"
        );
        assert_eq!(s.seen.params, vec!["search_path".to_string()]);
        assert_eq!(s.down_scanned.len(), server.len());
    }

    #[test]
    fn a_summary_tells_different_streams_apart() {
        let (client, _) = batch();
        let mut a = World::new(2, usize::MAX);
        a.feed_client(&client);
        let mut b = World::new(2, usize::MAX);
        b.feed_client(&client[..client.len() - 5]);
        assert_ne!(a.summary(), b.summary());
    }
}
