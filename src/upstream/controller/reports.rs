//! Where the controller's words go in and out: probe results come in through
//! [`ProbeReports`] (the prober's sink), and the events of its steps go out on the bus or,
//! in a node group, to the group's task with the hosts this upstream sees down.

use super::Controller;
use crate::health::{self, prober::ProbeSink};
use crate::upstream::Control;
use crate::upstream::ServerHandle;
use crate::upstream::group::GroupMsg;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A prober's sink: its results become [`Control::Probe`] messages to the controller.
pub(super) struct ProbeReports {
    pub(super) server: Arc<ServerHandle>,
    pub(super) control: mpsc::Sender<Control>,
}

impl ProbeSink for ProbeReports {
    async fn suspected(&self) {
        self.server.suspected().await
    }

    async fn report(&self, result: Result<(), health::ProbeError>, at: Instant) -> bool {
        self.server.clear_suspicion(result.is_ok());
        let msg = Control::Probe {
            server: self.server.clone(),
            result,
            at,
        };
        self.control.send(msg).await.is_ok()
    }
}

impl Controller {
    /// Publishes the events of the flushed steps: on the bus, or, in a node group, to the
    /// group with the hosts this upstream now sees down (when they changed), so that the
    /// group moves its other members and publishes everything as one event.
    pub(super) fn send_events(&mut self, published: bool) {
        let Some((_, group)) = &self.group else {
            for ev in self.outgoing.drain(..) {
                crate::events::active_set_changed(&self.state.name, ev);
            }
            return;
        };
        let hosts = (published || self.reported_hosts.is_none())
            .then(|| self.state.down_hosts())
            .filter(|h| self.reported_hosts.as_ref() != Some(h));
        if hosts.is_none() && self.outgoing.is_empty() {
            return;
        }
        let down = match hosts {
            Some(h) => {
                self.reported_hosts = Some(h.clone());
                h
            }
            None => self.reported_hosts.clone().unwrap_or_default(),
        };
        let _ = group.send(GroupMsg::Report {
            upstream: self.state.name.clone(),
            commands: self.commands.clone(),
            down,
            events: std::mem::take(&mut self.outgoing),
        });
    }

    /// Leaves the node group, if in one: its other members forget what this one saw.
    pub(super) fn leave_group(&mut self) {
        if let Some((_, group)) = self.group.take() {
            let _ = group.send(GroupMsg::Leave {
                upstream: self.state.name.clone(),
            });
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.leave_group();
    }
}
