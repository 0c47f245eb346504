//! `mediagate run`: start the balancer and react to signals (SIGHUP reloads; SIGTERM or
//! SIGINT drain and stop; a second one stops at once) and to edits of the config file.

use crate::app::App;
use crate::config::Config;
use anyhow::Result;
use std::path::Path;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// How often the config file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Runs until a termination signal, then drains (SPEC §11).
pub async fn serve(cfg: Config, path: impl AsRef<Path>) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let app = App::start(cfg, path.as_ref().display().to_string()).await?;
    let watcher = tokio::spawn(app.state.clone().watch_file(FILE_POLL));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let _ = app.state.reload().await;
            }
        }
    }
    watcher.abort();
    let second = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    app.shutdown(second).await;
    Ok(())
}
