//! Client side: the listener, one session task per client (startup, auth,
//! then relaying transactions to pooled servers), and cancel routing.

pub mod cancel;
mod fanout;
pub mod listener;
pub mod relay;
mod routing;
mod session;
pub mod sqlscan;
mod startup;
pub mod tracker;
pub use relay::{Dir, Progress, Relay, Statements};
