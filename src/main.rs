//! The `idemproxy` binary: parse the command line, load the config, set up
//! logging, bind, and hand over to the library.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

/// mimalloc: a proxy allocates and frees many small buffers per request on
/// every worker thread; mimalloc's per-thread heaps make that measurably
/// cheaper than glibc malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::task::{Context, Waker};

use clap::Parser;
use idemproxy::app::{App, Listeners, StartError};
use idemproxy::cli::{Cli, Command};
use idemproxy::config::{Config, LogFormat, Overrides};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Call(args) => idemproxy::call::main(args),
        Command::Check(arg) => {
            let (path, explicit) = arg.path();
            match Config::load(&path, explicit, &Overrides::default()).and_then(|c| {
                idemproxy::proxy::Upstream::check(&c)?;
                Ok(c)
            }) {
                Ok(config) => {
                    print!("{}", config.describe());
                    println!("config OK");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("idemproxy: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Openapi(args) => {
            let (path, explicit) = args.config.path();
            let rules = match Config::load_rules(&path, explicit) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("idemproxy: {e}");
                    return ExitCode::from(2);
                }
            };
            let spec = match &args.spec {
                None => None,
                Some(p) => match std::fs::read_to_string(p) {
                    Ok(text) => Some((p.display().to_string(), text)),
                    Err(e) => {
                        eprintln!(
                            "idemproxy: {}",
                            idemproxy::openapi::OpenApiError::Read(p.display().to_string(), e)
                        );
                        return ExitCode::from(2);
                    }
                },
            };
            match idemproxy::openapi::render(&rules, spec.as_ref().map(|(n, t)| (n.as_str(), t.as_str()))) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("idemproxy: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run(args) => {
            let (path, explicit) = args.config.path();
            let config = match Config::load(&path, explicit, &args.overrides()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("idemproxy: {e}");
                    return ExitCode::from(2);
                }
            };
            let format = config.server.log_format;
            init_logging(format);
            // The control runtime: startup, admin, signals, the store's
            // background work. Requests are served by `server.workers`
            // threads of their own (see `idemproxy::server::worker`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                match start(config).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        // Through the log, so a JSON-logging process writes
                        // nothing but JSON once its config is read.
                        match format {
                            LogFormat::Text => eprintln!("idemproxy: {e}"),
                            LogFormat::Json => tracing::error!(error = %e, "idemproxy could not start"),
                        }
                        ExitCode::from(2)
                    }
                }
            })
        }
    }
}

async fn start(config: Config) -> Result<(), StartError> {
    let app = App::build(config).await?;
    let shutdown = shutdown_armed();
    let listeners = Listeners::bind(&app.config).await?;
    let (main, admin) = (listeners.main_addr(), listeners.admin.local_addr());
    let (format, upstream) = (app.config.server.log_format, app.config.upstream.url.clone());
    let running = app.start(listeners)?;
    if let (Ok(main), Ok(admin)) = (main, admin) {
        // One machine-readable line on stdout: scripts and tests read the
        // bound ports from it when they asked for port 0. With JSON logs it
        // is a JSON object like every other line.
        match format {
            LogFormat::Text => println!("idemproxy listening on {main} admin {admin}"),
            LogFormat::Json => println!(
                "{}",
                serde_json::json!({"event": "listening", "main": main.to_string(), "admin": admin.to_string()})
            ),
        }
        tracing::info!(%main, %admin, %upstream, "idemproxy started");
    }
    running.until(shutdown).await;
    Ok(())
}

/// The shutdown future with its signal handlers already installed.
///
/// A signal future registers its handlers on its first poll; until then
/// SIGTERM and SIGINT keep their default action and kill the process. Whoever
/// starts us (a supervisor, a test) may signal as soon as it reads the
/// listening line, so the handlers must exist before that line is printed:
/// poll the future once here. (SIGHUP's handler is installed by `App::build`.)
fn shutdown_armed() -> Pin<Box<impl Future<Output = ()>>> {
    let mut shutdown = Box::pin(idemproxy::shutdown::signal());
    let _ = shutdown.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    shutdown
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The access log (one event per request, target `idemproxy::access`) is
    // on by default with JSON logs, which are meant for machines; with text
    // logs it is opt-in: IDEMPROXY_LOG=info,idemproxy::access=info.
    let default = match format {
        LogFormat::Json => "info",
        LogFormat::Text => "info,idemproxy::access=off",
    };
    let filter = EnvFilter::try_from_env("IDEMPROXY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}
