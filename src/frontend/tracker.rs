//! Which response the server owes for each message a client sent, so Weir can
//! answer some messages itself (a Close, a Parse the server already has) and
//! swallow the responses to messages it added (a prepended Parse) while the
//! client still sees exactly the sequence PostgreSQL would have sent.

use crate::backend::prepared::{ServerStatements, Stmt};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug)]
pub enum Expect {
    /// A Parse the client sent (statement and the client's name for it when
    /// it is a Weir-wide one).
    Parse(Option<Arc<Stmt>>, Option<Box<str>>),
    /// A Bind of a Weir-wide statement (or unnamed, `None`).
    Bind(Option<Arc<Stmt>>),
    /// A Describe (of a Weir-wide statement, when it is one).
    Describe(Option<Arc<Stmt>>),
    Execute,
    Close,
    Sync,
    /// A simple Query or FunctionCall: answered up to ReadyForQuery.
    Simple,
    /// A response Weir gives in the server's stead, at this position.
    Fake(Bytes),
    /// A message Weir added: its response is not the client's to see.
    SwallowParse(Arc<Stmt>),
    /// A Close Weir added to evict a statement from the server.
    SwallowClose(Arc<Stmt>),
    /// A Sync Weir added to close a batch the client left open.
    SwallowSync,
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop,
}

#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
    /// Client statement names (and their statement ids) whose Parse failed on
    /// the server: the client side forgets them.
    pub failed_parses: Vec<(Box<str>, u64)>,
}

pub const CACHED_PLAN: &str = "cached plan must not change result type";

impl Tracker {
    pub fn push(&mut self, e: Expect) {
        self.queue.push_back(e);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn front_is_fake(&self) -> bool {
        matches!(self.queue.front(), Some(Expect::Fake(_)))
    }

    pub fn pop_back(&mut self) {
        self.queue.pop_back();
    }

    /// Drops the last `n` Syncs still owed: the server ignored them (they
    /// reached it in copy-in mode).
    pub fn forget_syncs(&mut self, mut n: usize) {
        let mut i = self.queue.len();
        while n > 0 && i > 0 {
            i -= 1;
            if matches!(self.queue[i], Expect::Sync) {
                self.queue.remove(i);
                n -= 1;
            }
        }
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// Fakes now at the front: nothing the server owes comes before them.
    pub fn take_fakes(&mut self, out: &mut Vec<Bytes>) {
        while let Some(Expect::Fake(_)) = self.queue.front() {
            if let Some(Expect::Fake(b)) = self.queue.pop_front() {
                out.push(b);
            }
        }
    }

    /// Accounts for one server message with tag `tag` (error message text in
    /// `error` for an ErrorResponse).
    pub fn on_server(
        &mut self,
        tag: u8,
        error: Option<&str>,
        server: &mut ServerStatements,
    ) -> Verdict {
        match tag {
            b'1' => match self.queue.pop_front() {
                Some(Expect::SwallowParse(_)) => Verdict::Drop,
                _ => Verdict::Forward,
            },
            b'3' => match self.queue.pop_front() {
                Some(Expect::SwallowClose(_)) => Verdict::Drop,
                _ => Verdict::Forward,
            },
            b'2' => {
                self.pop_if(|e| matches!(e, Expect::Bind(_)));
                Verdict::Forward
            }
            b'T' | b'n' => {
                self.pop_if(|e| matches!(e, Expect::Describe(_)));
                Verdict::Forward
            }
            b'C' | b'I' | b's' => {
                self.pop_if(|e| matches!(e, Expect::Execute));
                Verdict::Forward
            }
            b'Z' => match self.queue.front() {
                Some(Expect::SwallowSync) => {
                    self.queue.pop_front();
                    Verdict::Drop
                }
                _ => {
                    self.pop_if(|e| matches!(e, Expect::Sync | Expect::Simple));
                    Verdict::Forward
                }
            },
            b'E' => {
                self.on_error(error.unwrap_or_default(), server);
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    fn pop_if(&mut self, pred: impl Fn(&Expect) -> bool) {
        if self.queue.front().is_some_and(pred) {
            self.queue.pop_front();
        }
    }

    /// After an error in the extended protocol PostgreSQL skips everything up
    /// to Sync: no responses for those messages, so none from Weir either, and
    /// statements whose Parse was skipped were never created.
    fn on_error(&mut self, message: &str, server: &mut ServerStatements) {
        match self.queue.front() {
            None | Some(Expect::Simple) | Some(Expect::Sync) | Some(Expect::SwallowSync) => return,
            _ => {}
        }
        let mut first = true;
        while let Some(front) = self.queue.front() {
            if matches!(front, Expect::Sync | Expect::Simple | Expect::SwallowSync) {
                break;
            }
            match self.queue.pop_front() {
                Some(Expect::Parse(Some(s), name)) => {
                    server.remove(s.id);
                    if let Some(name) = name {
                        self.failed_parses.push((name, s.id));
                    }
                }
                Some(Expect::SwallowParse(s)) => server.remove(s.id),
                Some(Expect::SwallowClose(s)) => {
                    // The eviction did not happen; the server still holds it.
                    server.insert(s, usize::MAX);
                }
                Some(Expect::Bind(Some(s))) | Some(Expect::Describe(Some(s)))
                    if first && message.contains(CACHED_PLAN) =>
                {
                    // Its result type changed: its clients keep getting this
                    // error (as on PostgreSQL), a new Parse gets a new statement.
                    s.retire();
                }
                _ => {}
            }
            first = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::prepared::Registry;

    #[test]
    fn swallows_prepended_parse_and_fakes_close() {
        let reg = Registry::default();
        let s = reg.intern(b"select 1\0\0\0");
        let mut server = ServerStatements::default();
        let mut t = Tracker::default();
        t.push(Expect::SwallowParse(s.clone()));
        t.push(Expect::Bind(Some(s.clone())));
        t.push(Expect::Execute);
        t.push(Expect::Fake(Bytes::from_static(b"3\0\0\0\x04")));
        t.push(Expect::Sync);
        assert_eq!(t.on_server(b'1', None, &mut server), Verdict::Drop);
        assert_eq!(t.on_server(b'2', None, &mut server), Verdict::Forward);
        assert_eq!(t.on_server(b'D', None, &mut server), Verdict::Forward);
        assert_eq!(t.on_server(b'C', None, &mut server), Verdict::Forward);
        let mut fakes = Vec::new();
        t.take_fakes(&mut fakes);
        assert_eq!(fakes.len(), 1);
        assert_eq!(t.on_server(b'Z', None, &mut server), Verdict::Forward);
        assert!(t.is_empty());
    }

    #[test]
    fn error_skips_to_sync_and_forgets_unparsed_statements() {
        let reg = Registry::default();
        let s = reg.intern(b"select x\0\0\0");
        let mut server = ServerStatements::default();
        server.insert(s.clone(), 10);
        let mut t = Tracker::default();
        t.push(Expect::SwallowParse(s.clone()));
        t.push(Expect::Bind(Some(s.clone())));
        t.push(Expect::Fake(Bytes::from_static(b"3\0\0\0\x04")));
        t.push(Expect::Sync);
        t.on_server(b'E', Some("syntax error"), &mut server);
        assert!(!server.contains(s.id));
        let mut fakes = Vec::new();
        t.take_fakes(&mut fakes);
        assert!(fakes.is_empty(), "skipped Close gets no CloseComplete");
        t.on_server(b'Z', None, &mut server);
        assert!(t.is_empty());
    }
}
