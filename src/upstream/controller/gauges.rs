//! The controller's per-server gauges: `mediagate_server_up`, `mediagate_upstream_active`
//! and `mediagate_server_admin_state`, resolved once per server and removed with it, set
//! from the state machine whenever the controller publishes a new routing snapshot.

use super::{Controller, key};
use crate::metrics::{Labels, child, labels};
use crate::upstream::ServerHandle;
use crate::upstream::state::AdminState;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashSet;
use std::sync::Arc;

/// Every admin state, in the order of the `state` label's series.
const ADMIN_STATES: [AdminState; 3] = [AdminState::Enable, AdminState::Drain, AdminState::Maint];

/// Per-server metric handles, resolved once.
pub(super) struct ServerMetrics {
    pub(super) handle: Arc<ServerHandle>,
    up_labels: Labels,
    active_labels: Labels,
    /// `mediagate_probes_total` series of this server (removed with it).
    probe_labels: [Labels; 4],
    /// `mediagate_server_admin_state{state}` series, one per [`ADMIN_STATES`].
    admin_labels: [Labels; 3],
    pub(super) up: Gauge,
    active: Gauge,
    admin: [Gauge; 3],
}

impl Controller {
    /// Adds the series of new servers and removes those of servers that left.
    pub(super) fn sync_metrics(&mut self) {
        let handles = self.state.handles();
        let listed: HashSet<usize> = handles.iter().map(key).collect();
        let m = &self.metrics;
        self.server_metrics.retain(|sm| {
            let keep = listed.contains(&key(&sm.handle));
            if !keep {
                m.server_up.remove(&sm.up_labels);
                m.upstream_active.remove(&sm.active_labels);
                for l in &sm.probe_labels {
                    m.probes.remove(l);
                }
                for l in &sm.admin_labels {
                    m.server_admin_state.remove(l);
                }
            }
            keep
        });
        let known: HashSet<usize> = self
            .server_metrics
            .iter()
            .map(|sm| key(&sm.handle))
            .collect();
        let name = self.state.name.as_str();
        for h in handles {
            if known.contains(&key(&h)) {
                continue;
            }
            let probe_labels = ["ok", "failed", "timeout", "local_error"].map(|result| {
                labels(&[("upstream", name), ("server", &h.label), ("result", result)])
            });
            let admin_labels = ADMIN_STATES.map(|state| {
                labels(&[
                    ("upstream", name),
                    ("server", &h.label),
                    ("state", state.as_str()),
                ])
            });
            let up_labels = labels(&[
                ("upstream", name),
                ("server", &h.label),
                ("tier", h.tier.as_str()),
            ]);
            let active_labels = labels(&[("upstream", name), ("server", &h.label)]);
            // A new server starts enabled (the state machine's default) until it says otherwise.
            let admin = admin_labels
                .clone()
                .map(|l| child(&m.server_admin_state, &l));
            admin[0].set(1);
            self.server_metrics.push(ServerMetrics {
                up: child(&m.server_up, &up_labels),
                active: child(&m.upstream_active, &active_labels),
                admin,
                up_labels,
                active_labels,
                probe_labels,
                admin_labels,
                handle: h,
            });
        }
    }

    /// Sets every server's gauges from the state machine (`active`: keys of the active set);
    /// a change of health is also an event for `/events` once the upstream is ready.
    pub(super) fn set_server_gauges(&self, active: &[Arc<ServerHandle>]) {
        let active: HashSet<usize> = active.iter().map(key).collect();
        for sm in &self.server_metrics {
            let idx = self.index.get(&key(&sm.handle)).copied();
            let up = idx.is_some_and(|i| self.state.is_up(i));
            if sm.up.get() != i64::from(up) && *self.ready.borrow() {
                let reason = self.state.view_reason(&sm.handle).filter(|_| !up);
                crate::events::server_health(
                    &self.state.name,
                    &sm.handle.label,
                    up,
                    reason.as_deref(),
                );
            }
            sm.up.set(i64::from(up));
            sm.active.set(i64::from(active.contains(&key(&sm.handle))));
            if let Some(admin) = idx.and_then(|i| self.state.admin_of(i)) {
                for (gauge, state) in sm.admin.iter().zip(ADMIN_STATES) {
                    gauge.set(i64::from(state == admin));
                }
            }
        }
    }
}
