//! The command line of SPEC §1.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Overrides, DEFAULT_CONFIG_PATH};

#[derive(Debug, Parser)]
#[command(
    name = "idemproxy",
    version,
    about = "A reverse proxy that makes any HTTP API safe to retry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Validate the config and print the resolved routes.
    Check(ConfigArg),
    /// Print the idempotency OpenAPI components, or an API's OpenAPI document
    /// with them added to the operations the configured routes cover.
    Openapi(OpenapiArgs),
}

#[derive(Debug, Args)]
pub struct OpenapiArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The upstream API's OpenAPI document (YAML or JSON)
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Config file [default: $IDEMPROXY_CONFIG, else config/idemproxy.toml]
    #[arg(long, env = "IDEMPROXY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// The file to read, and whether the user named it (only the default
    /// path may be absent).
    pub fn path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Overrides server.listen
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Overrides server.admin_listen
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Overrides upstream.url
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Overrides store.path (sled; ignored by the other backends)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
}

impl RunArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            upstream: self.upstream.clone(),
            data_dir: self.data_dir.clone(),
        }
    }
}
