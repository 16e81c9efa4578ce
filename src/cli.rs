//! The command line of SPEC §1 and of `idemproxy call` (SPEC §8).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Call an HTTP API the retry-safe way: one idempotency key for every
    /// retry of the operation, and one JSON report of what happened.
    Call(CallArgs),
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

/// `idemproxy call`: the flags follow curl's where curl has one.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The URL to call (http:// or https://)
    pub url: String,
    /// The method [default: POST with -d, else GET]
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    pub method: Option<String>,
    /// The request body, sent byte for byte; @FILE reads it from FILE, @- from stdin
    #[arg(short = 'd', long = "data", value_name = "DATA")]
    pub data: Option<String>,
    /// A request header, 'Name: value' (repeatable)
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// The idempotency key to send (reuse it to repeat the same operation)
    #[arg(long, value_name = "K", conflicts_with = "key_from_inputs")]
    pub idempotency_key: Option<String>,
    /// Derive a stable key from the method, URL, body and --scope
    #[arg(long)]
    pub key_from_inputs: bool,
    /// Goes into the derived key: the same inputs in another scope are another operation
    #[arg(long, value_name = "S", requires = "key_from_inputs")]
    pub scope: Option<String>,
    /// The name of the idempotency key header
    #[arg(long, value_name = "NAME", default_value = "Idempotency-Key")]
    pub key_header: String,
    /// Retries after the first attempt, always with the same key
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    /// Limit for one attempt, from connecting to the last byte of the response
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Wait for an original still in flight instead of giving up on it
    #[arg(long)]
    pub wait: bool,
    /// Send nothing to the API: ask the status endpoint what the call would do
    #[arg(long)]
    pub dry_run: bool,
    /// The proxy's key status endpoint (server.status_path), for --dry-run
    #[arg(long, value_name = "PATH", default_value = "/_idempotency")]
    pub status_path: String,
    /// What to print on stdout [default: json when stdout is not a terminal, else raw]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
    /// Trust only the CA certificates in this PEM file (instead of the system roots)
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
}

/// `--output`: one JSON report, or the response body as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Raw,
}
