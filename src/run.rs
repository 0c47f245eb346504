//! `mediagate run`: start the balancer and react to signals (SIGTERM/SIGINT drain and
//! stop; a second one stops at once).

use crate::app::App;
use crate::config::Config;
use anyhow::Result;
use std::path::Path;
use tokio::signal::unix::{SignalKind, signal};

/// Runs until a termination signal, then drains (SPEC §11).
pub async fn serve(cfg: Config, path: impl AsRef<Path>) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let app = App::start(cfg, path.as_ref().display().to_string()).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let second = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    app.shutdown(second).await;
    Ok(())
}
