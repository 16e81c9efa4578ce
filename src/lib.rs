//! placeholder
pub mod body;
pub mod config;
pub mod metrics;
pub mod problem;
pub mod proxy;
pub mod shutdown;
pub mod store;
pub mod tls;
