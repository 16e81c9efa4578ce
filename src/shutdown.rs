//! The shutdown signal: SIGTERM or SIGINT, whichever comes first.

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, draining"),
        _ = int.recv() => tracing::info!("SIGINT received, draining"),
    }
}
