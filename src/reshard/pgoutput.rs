//! Decoding of what logical replication sends: the replication protocol's CopyData
//! payloads (XLogData `w`, keepalive `k`) and inside XLogData the messages of PostgreSQL's
//! `pgoutput` plugin, protocol version 1 (Begin, Commit, Relation, Insert, Update, Delete,
//! Truncate, Message; Origin and Type are skipped). Pure functions over bytes.

/// A column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value (not sent).
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// Column names and whether each is part of the replica identity.
    pub columns: Vec<(String, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin,
    /// `end_lsn`: the position just past the transaction's commit.
    Commit {
        end_lsn: u64,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Value>,
    },
    /// `old`: the old key (`K`) or whole old row (`O`) when sent.
    Update {
        rel: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        rel: u32,
        old: Vec<Value>,
    },
    /// (CASCADE and RESTART IDENTITY are not applied: the tables a cascade reached come
    /// in the same message; sequences are set at the cutover.)
    Truncate {
        rels: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Emitted {
        prefix: String,
        content: Vec<u8>,
    },
    /// Origin, Type and anything else without effect on the data.
    Other,
}

/// A CopyData payload of a replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream<'a> {
    /// WAL data starting at `start`; `data` is one pgoutput message.
    XLogData { start: u64, data: &'a [u8] },
    /// The server's position; it wants a status update now if `reply`.
    Keepalive { wal_end: u64, reply: bool },
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or("truncated replication message")?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let rest = self.b.get(self.pos..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or("unterminated string in replication message")?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, String> {
        let n = self.u16()? as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    Value::Text(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|_| "replicated value is not UTF-8")?,
                    )
                }
                other => return Err(format!("unknown tuple value kind {other:#x}")),
            });
        }
        Ok(out)
    }
}

/// Parses a CopyData payload of the replication stream.
pub fn stream(payload: &[u8]) -> Result<Stream<'_>, String> {
    let mut c = Cursor { b: payload, pos: 0 };
    match c.u8()? {
        b'w' => {
            let start = c.u64()?;
            let _end = c.u64()?;
            let _time = c.u64()?;
            Ok(Stream::XLogData {
                start,
                data: &payload[c.pos..],
            })
        }
        b'k' => {
            let wal_end = c.u64()?;
            let _time = c.u64()?;
            let reply = c.u8()? == 1;
            Ok(Stream::Keepalive { wal_end, reply })
        }
        other => Err(format!("unknown replication message {other:#x}")),
    }
}

/// Parses one pgoutput message.
pub fn message(data: &[u8]) -> Result<Message, String> {
    let mut c = Cursor { b: data, pos: 0 };
    Ok(match c.u8()? {
        b'B' => Message::Begin,
        b'C' => {
            let _flags = c.u8()?;
            let _commit_lsn = c.u64()?;
            Message::Commit { end_lsn: c.u64()? }
        }
        b'R' => {
            let oid = c.u32()?;
            let schema = c.cstr()?;
            let name = c.cstr()?;
            let _identity = c.u8()?;
            let n = c.u16()? as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = c.u8()?;
                let col = c.cstr()?;
                let _type = c.u32()?;
                let _typmod = c.u32()?;
                columns.push((col, flags & 1 == 1));
            }
            Message::Relation(Relation {
                oid,
                schema,
                name,
                columns,
            })
        }
        b'I' => {
            let rel = c.u32()?;
            if c.u8()? != b'N' {
                return Err("Insert without a new tuple".into());
            }
            Message::Insert {
                rel,
                new: c.tuple()?,
            }
        }
        b'U' => {
            let rel = c.u32()?;
            let mut old = None;
            let mut kind = c.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(c.tuple()?);
                kind = c.u8()?;
            }
            if kind != b'N' {
                return Err("Update without a new tuple".into());
            }
            Message::Update {
                rel,
                old,
                new: c.tuple()?,
            }
        }
        b'D' => {
            let rel = c.u32()?;
            let kind = c.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err("Delete without an old tuple".into());
            }
            Message::Delete {
                rel,
                old: c.tuple()?,
            }
        }
        b'T' => {
            let n = c.u32()? as usize;
            let _options = c.u8()?;
            let mut rels = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                rels.push(c.u32()?);
            }
            Message::Truncate { rels }
        }
        b'M' => {
            let _flags = c.u8()?;
            let _lsn = c.u64()?;
            let prefix = c.cstr()?;
            let len = c.u32()? as usize;
            Message::Emitted {
                prefix,
                content: c.take(len)?.to_vec(),
            }
        }
        _ => Message::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn relation_and_changes_decode() {
        let mut r = vec![b'R'];
        r.extend_from_slice(&16384u32.to_be_bytes());
        r.extend_from_slice(b"public\0accounts\0");
        r.push(b'd');
        r.extend_from_slice(&2u16.to_be_bytes());
        r.push(1);
        r.extend_from_slice(b"aid\0");
        r.extend_from_slice(&20u32.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        r.push(0);
        r.extend_from_slice(b"balance\0");
        r.extend_from_slice(&20u32.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            message(&r).unwrap(),
            Message::Relation(Relation {
                oid: 16384,
                schema: "public".into(),
                name: "accounts".into(),
                columns: vec![("aid".into(), true), ("balance".into(), false)],
            })
        );
        let mut u = vec![b'U'];
        u.extend_from_slice(&16384u32.to_be_bytes());
        u.push(b'K');
        u.extend(tuple(&[Some("7"), None]));
        u.push(b'N');
        u.extend(tuple(&[Some("8"), Some("it's")]));
        assert_eq!(
            message(&u).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text("7".into()), Value::Null]),
                new: vec![Value::Text("8".into()), Value::Text("it's".into())],
            }
        );
        // Cut anywhere: an error, never a panic.
        for n in 0..u.len() {
            assert!(message(&u[..n]).is_err() || n == 0 && message(&u[..n]).is_err());
        }
    }

    #[test]
    fn stream_messages_decode() {
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        k.extend_from_slice(&0u64.to_be_bytes());
        k.push(1);
        assert_eq!(
            stream(&k).unwrap(),
            Stream::Keepalive {
                wal_end: 0x1_0000_0010,
                reply: true
            }
        );
        assert!(stream(&k[..5]).is_err());
    }
}
