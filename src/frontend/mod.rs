//! Client side: the listener, one session task per client (startup, auth,
//! then relaying transactions to pooled servers), and cancel routing.

pub mod cancel;
mod fanout;
pub mod listener;
mod relay;
mod routing;
mod session;
pub mod sqlscan;
mod startup;
pub mod tracker;
