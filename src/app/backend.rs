//! The running balancer as the admin API sees it: [`admin::Backend`] for [`AppState`].

use super::*;
use crate::admin::status::{ConfigStatus, ListenerStatus, rfc3339};

impl admin::Backend for AppState {
    fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn admin_token(&self) -> Arc<Option<String>> {
        self.admin_token.load_full()
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn upstreams(&self) -> Arc<IndexMap<String, Arc<UpstreamRuntime>>> {
        self.upstreams.load_full()
    }

    fn listeners(&self) -> Vec<ListenerStatus> {
        self.listeners
            .load()
            .iter()
            .map(|l| ListenerStatus {
                name: l.config.name.clone(),
                protocol: l.config.protocol.to_string(),
                listen: l.config.listen.to_string(),
                upstream: l.config.upstream.clone(),
                sessions: l.sessions(),
            })
            .collect()
    }

    fn config_status(&self) -> ConfigStatus {
        ConfigStatus {
            path: self.config_path.clone(),
            loaded_at: rfc3339(**self.loaded_at.load()),
            last_reload_error: (**self.last_reload_error.load()).clone(),
        }
    }

    fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn turn_allocations(&self) -> Option<usize> {
        self.turn
            .try_lock()
            .ok()
            .and_then(|t| t.as_ref().map(|t| t.allocations()))
    }

    fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.cluster.load_full()
    }

    fn reload(&self) -> admin::ReloadFuture<'_> {
        Box::pin(AppState::reload(self))
    }
}
