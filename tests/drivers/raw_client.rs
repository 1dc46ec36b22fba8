//! A bare PostgreSQL wire-protocol client for tests that need what no driver lets them do:
//! choosing protocol-level statement names, parsing the same name twice, binding a name that
//! was never parsed, and seeing every reply of an extended-protocol batch.
//!
//! It logs in with SCRAM-SHA-256 (or a cleartext or no password), queues frontend messages,
//! and `sync` sends them with a Sync and collects the replies up to ReadyForQuery.
#![allow(dead_code)]

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One backend message, reduced to what tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    ParameterDescription,
    RowDescription(usize),
    DataRow(Vec<Option<String>>),
    CommandComplete(String),
    Error {
        code: String,
        message: String,
    },
    ReadyForQuery(u8),
    /// Anything else, by its tag byte.
    Other(u8),
}

impl Reply {
    /// The SQLSTATE of an ErrorResponse.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Reply::Error { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A logged-in connection with a queue of frontend messages not yet sent.
pub struct RawClient {
    stream: TcpStream,
    inbox: BytesMut,
    outbox: BytesMut,
}

impl RawClient {
    /// Connects to 127.0.0.1:`port` and logs in; panics on any failure.
    pub async fn connect(port: u16, user: &str, password: &str, db: &str) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("raw client: connect to port {port}: {e}"));
        let mut client = RawClient {
            stream,
            inbox: BytesMut::new(),
            outbox: BytesMut::new(),
        };
        client.startup(user, db).await;
        client.authenticate(password).await;
        let replies = client.read_until_ready().await;
        assert!(
            !replies.iter().any(|r| r.error_code().is_some()),
            "raw client: login failed: {replies:?}"
        );
        client
    }

    async fn startup(&mut self, user: &str, db: &str) {
        let mut body = BytesMut::new();
        body.put_i32(196_608); // protocol 3.0
        for (key, value) in [("user", user), ("database", db)] {
            put_cstr(&mut body, key);
            put_cstr(&mut body, value);
        }
        body.put_u8(0);
        let mut msg = BytesMut::new();
        msg.put_i32(body.len() as i32 + 4);
        msg.extend_from_slice(&body);
        self.write_all(&msg).await;
    }

    /// Answers Authentication requests until AuthenticationOk.
    async fn authenticate(&mut self, password: &str) {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = self.read_message().await;
            assert_eq!(
                tag, b'R',
                "raw client: expected Authentication, got {:?}",
                tag as char
            );
            match body.get_i32() {
                0 => return,
                3 => {
                    let mut msg = start(b'p');
                    put_cstr(&mut msg, password);
                    self.write_all(&finish(msg)).await;
                }
                10 => {
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    let mut msg = start(b'p');
                    put_cstr(&mut msg, "SCRAM-SHA-256");
                    msg.put_i32(s.message().len() as i32);
                    msg.extend_from_slice(s.message());
                    self.write_all(&finish(msg)).await;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().expect("SASLContinue before SASL");
                    s.update(&body)
                        .expect("raw client: SCRAM server-first message");
                    let mut msg = start(b'p');
                    msg.extend_from_slice(s.message());
                    self.write_all(&finish(msg)).await;
                }
                12 => {
                    let s = scram.as_mut().expect("SASLFinal before SASL");
                    s.finish(&body).expect("raw client: SCRAM server signature");
                }
                other => panic!("raw client: unsupported authentication request {other}"),
            }
        }
    }

    /// Gives up the logged-in socket, for tests that write frames no driver would send.
    pub fn into_stream(self) -> TcpStream {
        assert!(
            self.inbox.is_empty() && self.outbox.is_empty(),
            "raw client: unread or unsent bytes when giving up the socket"
        );
        self.stream
    }

    /// Queues Parse of `sql` as statement `name` (no parameter types given).
    pub fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        let mut msg = start(b'P');
        put_cstr(&mut msg, name);
        put_cstr(&mut msg, sql);
        msg.put_i16(0);
        self.outbox.extend_from_slice(&finish(msg));
        self
    }

    /// Queues Bind of statement `name` to the unnamed portal with text parameters.
    pub fn bind(&mut self, name: &str, params: &[&str]) -> &mut Self {
        let mut msg = start(b'B');
        put_cstr(&mut msg, "");
        put_cstr(&mut msg, name);
        msg.put_i16(0); // all parameters in text format
        msg.put_i16(params.len() as i16);
        for p in params {
            msg.put_i32(p.len() as i32);
            msg.extend_from_slice(p.as_bytes());
        }
        msg.put_i16(0); // all results in text format
        self.outbox.extend_from_slice(&finish(msg));
        self
    }

    /// Queues Execute of the unnamed portal, all rows.
    pub fn execute(&mut self) -> &mut Self {
        let mut msg = start(b'E');
        put_cstr(&mut msg, "");
        msg.put_i32(0);
        self.outbox.extend_from_slice(&finish(msg));
        self
    }

    /// Queues Describe of statement `name`.
    pub fn describe_statement(&mut self, name: &str) -> &mut Self {
        self.target(b'D', name)
    }

    /// Queues Close of statement `name`.
    pub fn close_statement(&mut self, name: &str) -> &mut Self {
        self.target(b'C', name)
    }

    fn target(&mut self, tag: u8, name: &str) -> &mut Self {
        let mut msg = start(tag);
        msg.put_u8(b'S');
        put_cstr(&mut msg, name);
        self.outbox.extend_from_slice(&finish(msg));
        self
    }

    /// Sends the queued messages and a Sync; returns every reply up to ReadyForQuery.
    pub async fn sync(&mut self) -> Vec<Reply> {
        self.outbox.extend_from_slice(&finish(start(b'S')));
        let out = std::mem::take(&mut self.outbox);
        self.write_all(&out).await;
        self.read_until_ready().await
    }

    /// Sends one simple Query; returns every reply up to ReadyForQuery.
    pub async fn simple_query(&mut self, sql: &str) -> Vec<Reply> {
        let mut msg = start(b'Q');
        put_cstr(&mut msg, sql);
        self.write_all(&finish(msg)).await;
        self.read_until_ready().await
    }

    /// Sends one simple Query without reading its replies.
    pub async fn send_query(&mut self, sql: &str) {
        let mut msg = start(b'Q');
        put_cstr(&mut msg, sql);
        self.write_all(&finish(msg)).await;
    }

    /// Sends one message with `tag` and `body` as it is (CopyData, CopyDone, CopyFail…).
    pub async fn send_message(&mut self, tag: u8, body: &[u8]) {
        let mut msg = start(tag);
        msg.put_slice(body);
        self.write_all(&finish(msg)).await;
    }

    /// The next reply (ParameterStatus, BackendKeyData and notices skipped).
    pub async fn next_reply(&mut self) -> Reply {
        loop {
            let (tag, body) = self.read_message().await;
            let reply = decode(tag, body);
            if !matches!(reply, Reply::Other(b'S' | b'K' | b'N')) {
                return reply;
            }
        }
    }

    /// Every reply up to ReadyForQuery.
    pub async fn replies(&mut self) -> Vec<Reply> {
        self.read_until_ready().await
    }

    async fn read_until_ready(&mut self) -> Vec<Reply> {
        let mut replies = Vec::new();
        loop {
            let (tag, body) = self.read_message().await;
            let reply = decode(tag, body);
            let done = matches!(reply, Reply::ReadyForQuery(_));
            // ParameterStatus, BackendKeyData and notices are not what tests compare.
            if !matches!(reply, Reply::Other(b'S' | b'K' | b'N')) {
                replies.push(reply);
            }
            if done {
                return replies;
            }
        }
    }

    async fn read_message(&mut self) -> (u8, BytesMut) {
        loop {
            if self.inbox.len() >= 5 {
                let len = i32::from_be_bytes(self.inbox[1..5].try_into().unwrap()) as usize;
                if self.inbox.len() > len {
                    let tag = self.inbox[0];
                    self.inbox.advance(5);
                    return (tag, self.inbox.split_to(len - 4));
                }
            }
            let n = self
                .stream
                .read_buf(&mut self.inbox)
                .await
                .unwrap_or_else(|e| panic!("raw client: read: {e}"));
            assert!(n > 0, "raw client: server closed the connection");
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("raw client: write: {e}"));
    }
}

fn decode(tag: u8, mut body: BytesMut) -> Reply {
    match tag {
        b'1' => Reply::ParseComplete,
        b'2' => Reply::BindComplete,
        b'3' => Reply::CloseComplete,
        b'n' => Reply::NoData,
        b't' => Reply::ParameterDescription,
        b'T' => Reply::RowDescription(body.get_i16() as usize),
        b'D' => {
            let n = body.get_i16();
            let values = (0..n)
                .map(|_| {
                    let len = body.get_i32();
                    (len >= 0)
                        .then(|| String::from_utf8_lossy(&body.split_to(len as usize)).into_owned())
                })
                .collect();
            Reply::DataRow(values)
        }
        b'C' => Reply::CommandComplete(cstr(&body)),
        b'E' => {
            let (mut code, mut message) = (String::new(), String::new());
            while body.first().is_some_and(|&t| t != 0) {
                let field = body.get_u8();
                let value = cstr(&body);
                body.advance(value.len() + 1);
                match field {
                    b'C' => code = value,
                    b'M' => message = value,
                    _ => {}
                }
            }
            Reply::Error { code, message }
        }
        b'Z' => Reply::ReadyForQuery(body[0]),
        other => Reply::Other(other),
    }
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.put_u8(0);
}

/// A message with its tag and a length placeholder.
fn start(tag: u8) -> BytesMut {
    let mut msg = BytesMut::new();
    msg.put_u8(tag);
    msg.put_i32(0);
    msg
}

/// Fills in the length of a message from `start`.
fn finish(mut msg: BytesMut) -> BytesMut {
    let len = (msg.len() - 1) as i32;
    msg[1..5].copy_from_slice(&len.to_be_bytes());
    msg
}
