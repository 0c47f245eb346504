//! `mediagate run`: start the balancer and react to signals (SIGHUP reloads; SIGTERM or
//! SIGINT drain and stop; a second one stops at once) and to edits of the config file.

use crate::app::App;
use crate::config::Config;
use anyhow::Result;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

/// How often the config file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Runs until a termination signal, then drains.
///
/// Reloads run in their own task, one at a time: signals are read all the while, so
/// SIGTERM starts the shutdown even while a reload is in progress (the reload is
/// abandoned; what it prepared is dropped), and SIGHUPs that arrive during a reload are
/// coalesced into one more reload after it.
pub async fn serve(cfg: Config, path: impl AsRef<Path>) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    for w in crate::config::advice::warnings(&cfg) {
        tracing::warn!(key = %w.path, "{}", w.message);
    }
    let app = App::start(cfg, path.as_ref().display().to_string()).await?;
    let watcher = tokio::spawn(app.state.clone().watch_file(FILE_POLL));
    // A stored permit, not a queue: any number of SIGHUPs during a reload make one more.
    let wanted = Arc::new(Notify::new());
    let reloader = tokio::spawn({
        let state = app.state.clone();
        let wanted = wanted.clone();
        async move {
            loop {
                wanted.notified().await;
                let _ = state.reload().await;
            }
        }
    });
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                wanted.notify_one();
            }
        }
    }
    reloader.abort();
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
