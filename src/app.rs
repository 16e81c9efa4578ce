//! Wiring: everything a running proxy is made of, built in the order that
//! lets every configuration problem surface before a port is bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{Config, ConfigError, StoreConfig};
use crate::idempotency::limits::Limits;
use crate::idempotency::Engine;
use crate::metrics::Metrics;
use crate::proxy::Upstream;
use crate::server::worker::Workers;
use crate::service::Proxy;
use crate::store::{Store, StoreError};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the serving workers: {0}")]
    Workers(#[source] std::io::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A proxy ready to serve: config checked, TLS loaded, store open.
pub struct App {
    pub config: Config,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Metrics,
    store: Store,
    proxy: Proxy,
    engine: Engine,
    /// SIGHUP, listened to from `build` on: SIGHUP's default action is to
    /// terminate, so a reload sent as soon as the proxy reports that it is
    /// listening must already find the handler in place.
    hup: Option<Signal>,
}

/// The bound sockets; tests bind port 0 and read the addresses back.
pub struct Listeners {
    /// One `SO_REUSEPORT` socket per worker, all on the same address.
    pub main: Vec<std::net::TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let what = "server.listen";
        let mut addr = config.server.listen;
        let mut main = Vec::with_capacity(config.server.workers);
        for _ in 0..config.server.workers {
            let socket = reuse_port_listener(addr).map_err(|source| StartError::Bind { what, addr, source })?;
            // Port 0: the first socket picks the port, the others join it.
            addr = socket
                .local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })?;
            main.push(socket);
        }
        let admin_addr = config.server.admin_listen;
        let admin = TcpListener::bind(admin_addr).await.map_err(|source| StartError::Bind {
            what: "server.admin_listen",
            addr: admin_addr,
            source,
        })?;
        Ok(Listeners { main, admin })
    }

    pub fn main_addr(&self) -> std::io::Result<SocketAddr> {
        self.main[0].local_addr()
    }
}

/// A listening socket that other sockets of this process may bind too.
fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

impl App {
    /// Builds everything that can fail on bad configuration.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let file = config
            .source
            .as_ref()
            .map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        let tls = match &config.server.tls {
            Some(files) => Some(crate::tls::server_config(files, &file)?),
            None => None,
        };
        let upstream = Upstream::new(&config.upstream, &file, config.server.workers)?;
        let metrics = Metrics::new();
        let store = Store::open(&config.store, metrics.clone()).await?;
        let limits = Limits::new(config.server.max_keyed_requests, config.server.max_keyed_buffer);
        let engine = Engine::new(store.clone(), upstream.clone(), metrics.clone(), limits);
        let proxy = Proxy::new(
            config.rules.clone(),
            engine.clone(),
            upstream,
            metrics.clone(),
            config.server.status_path.as_deref(),
        );
        let hup = signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot install the SIGHUP handler; reload is off"))
            .ok();
        Ok(App {
            config,
            tls,
            metrics,
            store,
            proxy,
            engine,
            hup,
        })
    }

    /// Starts serving, then serves until `shutdown` resolves (see [`Running::until`]).
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        self.start(listeners)?.until(shutdown).await;
        Ok(())
    }

    /// Starts serving: the workers accept on `listeners.main` from now on.
    pub fn start(self, listeners: Listeners) -> Result<Running, StartError> {
        let workers = Workers::start(listeners.main, self.tls.clone(), &self.proxy, &self.config.server)
            .map_err(StartError::Workers)?;
        let stop = CancellationToken::new();
        let sweep_every = match &self.config.store {
            StoreConfig::Memory { sweep_interval } | StoreConfig::Sled { sweep_interval, .. } => Some(*sweep_interval),
            StoreConfig::Redis(_) => None,
        };
        if let Some(every) = sweep_every {
            self.store.spawn_sweeper(every, stop.clone());
        }
        let admin = tokio::spawn(admin::serve(
            listeners.admin,
            Admin {
                store: self.store.clone(),
                metrics: self.metrics.clone(),
            },
            stop.clone().cancelled_owned(),
        ));
        if let Some(hup) = self.hup {
            tokio::spawn(reload_on_sighup(
                hup,
                self.config.clone(),
                self.proxy.clone(),
                self.metrics.clone(),
                stop.clone(),
            ));
        }
        Ok(Running {
            grace: self.config.server.shutdown_grace,
            store: self.store,
            engine: self.engine,
            workers,
            admin,
            stop,
        })
    }
}

/// A serving proxy.
pub struct Running {
    grace: std::time::Duration,
    store: Store,
    engine: Engine,
    workers: Workers,
    admin: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Running {
    /// Serves until `shutdown` resolves, then drains within
    /// `server.shutdown_grace` and flushes the store.
    pub async fn until(mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        let started = tokio::time::Instant::now();
        self.workers.drain().await;
        // Detached leader tasks may outlive their client connections; they
        // run on the workers, which keep going until these are done.
        let left = self.grace.saturating_sub(started.elapsed().min(self.grace));
        if !self.engine.drain(left.max(std::time::Duration::from_millis(100))).await {
            tracing::warn!("shutdown grace elapsed with upstream calls still running");
        }
        self.workers.stop().await;
        self.stop.cancel();
        let _ = self.admin.await;
        match self.store.flush().await {
            Ok(()) => tracing::info!("store flushed; bye"),
            Err(e) => tracing::error!(error = %e, "final store flush failed"),
        }
    }
}

/// SIGHUP: re-read the config file and swap routes and `[idempotency]` for
/// requests that start afterwards. Listeners, TLS, upstream and store keep
/// their running settings (a restart applies those); an invalid file keeps
/// the running config.
async fn reload_on_sighup(mut hup: Signal, running: Config, proxy: Proxy, metrics: Metrics, stop: CancellationToken) {
    let Some(path) = running.source.clone() else {
        // Running on defaults: nothing to re-read, but answer the signal.
        loop {
            tokio::select! {
                _ = hup.recv() => tracing::warn!("SIGHUP ignored: no config file was loaded"),
                () = stop.cancelled() => return,
            }
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            () = stop.cancelled() => return,
        }
        match Config::load(&path, true, &running.overrides) {
            Ok(new) => {
                let changed = restart_needed(&running, &new);
                if !changed.is_empty() {
                    tracing::warn!(file = %path.display(), sections = %changed.join(", "), "reload: these settings changed in the file; they take effect on restart");
                }
                proxy.set_rules(new.rules.clone());
                metrics.reload(true);
                tracing::info!(file = %path.display(), routes = new.rules.routes.len(), "config reloaded");
            }
            Err(e) => {
                metrics.reload(false);
                tracing::error!(error = %e, "reload failed; keeping the running config");
            }
        }
    }
}

/// The sections whose changes a reload cannot apply (listeners, TLS,
/// timeouts, logging, upstream, store). Command-line overrides are applied
/// to both sides, so a listen address given by flag never counts as changed.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    [
        ("[server]", differs(&old.server, &new.server)),
        ("[upstream]", differs(&old.upstream, &new.upstream)),
        ("[store]", differs(&old.store, &new.store)),
    ]
    .into_iter()
    .filter_map(|(section, changed)| changed.then_some(section))
    .collect()
}
