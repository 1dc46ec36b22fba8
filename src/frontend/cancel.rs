//! CancelRequest routing. Each client gets its own BackendKeyData from Weir
//! (`FrontendKey`); while it holds a server, its entry points at that server's
//! real key (`BackendKey`), so a cancel reaches the query it was meant for.

use crate::config::Address;
use crate::wire::build;
use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// The key Weir hands a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub pid: i32,
    pub secret: i32,
}

/// A server's real key, and where that server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub address: Address,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
pub struct CancelEntry {
    target: Mutex<Option<BackendKey>>,
}

impl CancelEntry {
    pub fn attach(&self, key: BackendKey) {
        *self.target.lock() = Some(key);
    }
    pub fn detach(&self) {
        *self.target.lock() = None;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, (i32, Arc<CancelEntry>)>>,
}

impl CancelRegistry {
    /// Registers a new client and returns its key and entry.
    pub fn register(&self) -> (FrontendKey, Arc<CancelEntry>) {
        let mut rng = rand::thread_rng();
        let entry = Arc::new(CancelEntry::default());
        let mut map = self.map.lock();
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(pid) {
                let secret = rng.gen();
                v.insert((secret, entry.clone()));
                return (FrontendKey { pid, secret }, entry);
            }
        }
    }

    pub fn unregister(&self, key: FrontendKey) {
        self.map.lock().remove(&key.pid);
    }

    /// The server to cancel for a client's key, if the secret matches and the
    /// client currently holds a server.
    pub fn lookup(&self, key: FrontendKey) -> Option<BackendKey> {
        let map = self.map.lock();
        let (secret, entry) = map.get(&key.pid)?;
        if *secret != key.secret {
            return None;
        }
        let target = entry.target.lock().clone();
        target
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest to the server (a new connection, as the protocol asks).
pub async fn forward(key: BackendKey) {
    match crate::backend::conn::dial(&key.address).await {
        Ok(mut s) => {
            let _ = s
                .write_all(&build::cancel_request(key.pid, key.secret))
                .await;
            let _ = s.shutdown().await;
        }
        Err(e) => {
            tracing::warn!(address = %key.address, error = %e, "cancel request could not reach server")
        }
    }
}
