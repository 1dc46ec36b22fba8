//! Server side: connections to PostgreSQL, their login, and the pools that
//! lend them to clients.

pub mod cap;
pub mod catalog;
pub mod conn;
pub mod login;
mod maintenance;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod queue;
pub mod twophase;
pub mod walsample;

pub use conn::{ServerConn, Target};
pub use pool::{CheckoutError, Pool, PoolSettings};
