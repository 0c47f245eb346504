//! Reload as a transaction: SIGHUP, a file change or `POST /reload`.
//!
//! [`AppState::reload`] reads and validates the file; [`AppState::prepare`] then builds
//! everything the new configuration needs *next to* the running one: its discovery
//! sources, controllers for new upstreams (through their first probe round), and every
//! new or changed listener, bound and registered but not yet reading; [`AppState::commit`]
//! swaps it all in. Any error while preparing drops what was built (see [`Prepared`]'s
//! `Drop`) and leaves the running state exactly as it was: listeners, upstream settings
//! and server lists, discovery, admin token and `/status`. Commit has no step that can
//! fail.
//!
//! Sockets: an address that a changed or removed listener holds and the new configuration
//! still uses (same protocol and address) is handed over: the new listener gets the very
//! same sockets, which never close, so a port cannot be lost to another process in
//! between and no queued datagram or connection is dropped. Only addresses nothing holds
//! are bound, and all of them before anything stops.
//!
//! `cluster:` and `events:` reload too. A changed cluster section gets a new member,
//! prepared inert (on the same peer socket when `listen` stays, see
//! `crate::cluster::Cluster::prepare`) and launched at commit in place of the old one; a
//! removed section stops the member (its peers drop it after their `peer_timeout`) and
//! clears the peers' health verdict. Webhooks are checked (URL, CA file) while preparing;
//! unchanged hooks keep running.

use super::*;
use crate::config::secret_files::{self, SecretFile};
use tokio::sync::{mpsc, watch};

/// A controller's command channel and the discovery list that feeds it.
type Feed = (mpsc::Sender<Control>, Option<watch::Receiver<Vec<Target>>>);

/// What a reload built, not serving yet. Dropped without [`AppState::commit`], it stops
/// everything it started; the running state never saw it.
pub(super) struct Prepared {
    config: Option<Config>,
    /// The new configuration's sources and the token of their feeders.
    discovery: Option<(Discovery, CancellationToken)>,
    feeds: Vec<Feed>,
    /// The upstream map after the commit.
    upstreams: IndexMap<String, Arc<UpstreamRuntime>>,
    /// Upstreams that stay, with their new settings and server lists.
    changes: Vec<(Arc<UpstreamRuntime>, UpstreamSpec, Vec<Target>)>,
    /// Upstreams this reload started.
    started: Vec<Arc<UpstreamRuntime>>,
    /// The listener list after the commit: running ones that stay as they are, and new ones.
    listeners: Vec<Arc<ListenerRuntime>>,
    /// Listeners this reload built; they read nothing before `start` fires.
    built: Vec<Arc<ListenerRuntime>>,
    start: CancellationToken,
    /// `events.webhooks` of the new configuration, checked.
    hooks: Option<crate::events::webhook::PreparedHooks>,
    /// What becomes of the cluster membership.
    cluster: ClusterChange,
    committed: bool,
}

/// The cluster membership after a reload.
enum ClusterChange {
    /// The section did not change (or is absent before and after).
    Keep,
    /// A new member (inert until the commit launches it).
    Replace(Arc<crate::cluster::Cluster>),
    /// The section was removed.
    Remove,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Handed-over sockets stay open: the running listener still holds them.
        for l in &self.built {
            l.stop();
        }
        for u in &self.started {
            u.stop();
        }
        if let ClusterChange::Replace(c) = &self.cluster {
            c.stop();
        }
        if let Some((discovery, feeders)) = self.discovery.take() {
            feeders.cancel();
            discovery.stop();
        }
    }
}

impl AppState {
    /// Reloads the configuration file: validates it, prepares everything it needs, and
    /// only then commits. On any error the running configuration keeps serving unchanged
    /// and the errors are returned (and shown in `/status`). Unchanged listeners keep
    /// their sockets and sessions. One reload at a time.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = match std::fs::read_to_string(&self.config_path) {
            Ok(text) => {
                self.seen_hash.store(hash_text(&text), Ordering::Relaxed);
                // Off the runtime's threads: a file of thousands of servers takes a while.
                let path = self.config_path.clone();
                tokio::task::spawn_blocking(move || {
                    config::load_str(&text, &path).map_err(|errors| {
                        errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>()
                    })
                })
                .await
                .unwrap_or_else(|e| Err(vec![format!("configuration loader failed: {e}")]))
            }
            Err(e) => Err(vec![format!(
                "{}: cannot read the file: {e}",
                self.config_path
            )]),
        };
        // A configuration whose own descriptors exceed the open-file limit cannot run:
        // refused before anything is prepared.
        let loaded = loaded.and_then(|new| {
            let plan = crate::fdbudget::Plan::new(
                &new,
                crate::fdbudget::current_limit(),
                &super::fd_consumers(&new),
            );
            match plan.refusal() {
                Some(why) => Err(vec![why]),
                None => Ok(new),
            }
        });
        let result = match loaded {
            Ok(new) => self.apply(new).await.map_err(|e| vec![format!("{e:#}")]),
            Err(errors) => Err(errors),
        };
        // The secret files as this attempt read them (loaded), or as they are now (rejected:
        // not tried again until one changes).
        let seen = match &result {
            Ok(()) => self.config.load().secret_files.clone(),
            Err(_) => self
                .seen_secrets()
                .iter()
                .map(|f| SecretFile {
                    path: f.path.clone(),
                    hash: secret_files::fingerprint(&f.path),
                })
                .collect(),
        };
        *self.seen_secrets() = seen;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        child(
            &self.metrics.config_reloads,
            &labels(&[("result", outcome)]),
        )
        .inc();
        match &result {
            Ok(()) => {
                let config = self.config.load();
                crate::fdbudget::apply(&config, &super::fd_consumers(&config)); // the fd budget follows the config
                self.last_reload_error.store(Arc::new(None));
                self.loaded_at.store(Arc::new(SystemTime::now()));
                tracing::info!(path = %self.config_path, "configuration reloaded");
                crate::logging::apply_config(&config.log);
                give_memory_back();
            }
            Err(errors) => {
                for e in errors {
                    tracing::error!("reload rejected, keeping the running configuration: {e}");
                }
                self.last_reload_error
                    .store(Arc::new(Some(errors.join("; "))));
            }
        }
        result
    }

    /// Reloads when the file's content, or that of a secret file it names (`*_file` keys),
    /// changed since it was last loaded. Polling (rather than inotify) also sees the atomic
    /// symlink swap a mounted ConfigMap or Secret does.
    pub async fn watch_file(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.draining.load(Ordering::Acquire) {
                return;
            }
            let now = file_hash(&self.config_path);
            if now != 0 && now != self.seen_hash.load(Ordering::Relaxed) {
                tracing::info!(path = %self.config_path, "configuration file changed");
                let _ = self.reload().await;
                continue;
            }
            let changed = self
                .seen_secrets()
                .iter()
                .find(|f| secret_files::fingerprint(&f.path) != f.hash)
                .map(|f| f.path.clone());
            if let Some(path) = changed {
                tracing::info!(path = %path, "secret file changed");
                let _ = self.reload().await;
            }
        }
    }

    fn seen_secrets(&self) -> std::sync::MutexGuard<'_, Vec<SecretFile>> {
        self.seen_secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn apply(&self, new: Config) -> Result<()> {
        if self.draining.load(Ordering::Acquire) {
            return Err(anyhow!("shutting down: reload refused"));
        }
        let old = self.config.load_full();
        let restart_part_differs = match (&new.turn, &old.turn) {
            (Some(n), Some(o)) => turn_restart_part_differs(n, o),
            (n, o) => n.is_some() != o.is_some(),
        };
        if restart_part_differs {
            tracing::warn!(
                "changes to the turn section (but turn.auth and turn.ice) take effect at the next restart"
            );
        }
        if new.admin.listen != old.admin.listen {
            tracing::warn!(old = %old.admin.listen, new = %new.admin.listen, "admin.listen changes take effect at the next restart");
        }
        let began = Instant::now();
        let prepared = self.prepare(new).await?;
        if self.draining.load(Ordering::Acquire) {
            // The shutdown began meanwhile: drop what was prepared.
            return Err(anyhow!("shutting down: reload abandoned"));
        }
        let prepared_in = began.elapsed();
        self.commit(prepared).await;
        tracing::info!(
            prepare_ms = prepared_in.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "reload committed"
        );
        Ok(())
    }

    /// Builds everything `new` needs beside the running state; every step that can fail
    /// (sources, binds, fds, threads, a new upstream's first probe round) happens here.
    async fn prepare(&self, new: Config) -> Result<Prepared> {
        let discovery = Discovery::start(&new, &self.metrics).await?;
        let mut p = Prepared {
            config: None,
            discovery: Some((discovery, CancellationToken::new())),
            feeds: Vec::new(),
            upstreams: IndexMap::new(),
            changes: Vec::new(),
            started: Vec::new(),
            listeners: Vec::new(),
            built: Vec::new(),
            start: CancellationToken::new(),
            hooks: None,
            cluster: ClusterChange::Keep,
            committed: false,
        };
        let Some((discovery, _)) = &p.discovery else {
            unreachable!("set above");
        };

        // Upstreams: the ones that stay get their new settings at commit; new ones start
        // now (probing, routing nothing until a listener uses them).
        let current = self.upstreams.load_full();
        for (name, ucfg) in &new.upstreams {
            let spec = spec_for(&new, name, ucfg);
            let (list, feed) = subscribe(discovery, name);
            let rt = match current.get(name) {
                Some(rt) => {
                    p.changes.push((rt.clone(), spec, list));
                    rt.clone()
                }
                None => {
                    let rt = Arc::new(UpstreamRuntime::start(
                        name,
                        spec,
                        list,
                        &self.metrics,
                        &self.node_groups,
                    ));
                    p.started.push(rt.clone());
                    rt
                }
            };
            p.feeds.push((rt.control(), feed));
            p.upstreams.insert(name.clone(), rt);
        }

        // Listeners: identical ones stay as they are; the others are built on sockets
        // handed over from the listeners they replace, or bound now.
        let running = self.listeners.load_full();
        let kept: Vec<Option<Arc<ListenerRuntime>>> = new
            .listeners
            .iter()
            .map(|l| running.iter().find(|r| r.config == *l).cloned())
            .collect();
        let replaced: Vec<&Arc<ListenerRuntime>> = running
            .iter()
            .filter(|r| !kept.iter().flatten().any(|k| Arc::ptr_eq(k, r)))
            .collect();
        let held = |l: &ListenerConfig| -> Vec<Bound> {
            replaced
                .iter()
                .filter(|r| r.config.protocol == l.protocol)
                .map(|r| r.sockets.clone())
                .collect()
        };
        for (l, kept) in new.listeners.iter().zip(kept) {
            if let Some(r) = kept {
                p.listeners.push(r);
                continue;
            }
            let sockets = bind_listener(l, &held)?;
            let route = p
                .upstreams
                .get(&l.upstream)
                .ok_or_else(|| anyhow!("listener {}: unknown upstream {}", l.name, l.upstream))?
                .route
                .clone();
            let rt = self.serve_listener(l, route, sockets, p.start.clone())?;
            p.built.push(rt.clone());
            p.listeners.push(rt);
        }

        // Webhooks: URLs and CA files.
        p.hooks = Some(self.hooks.prepare(&new.events.webhooks)?);
        // The cluster member, last of what can fail: built inert, launched at commit.
        let running = self.cluster.load_full();
        p.cluster = match (&new.cluster, running) {
            (Some(c), Some(r)) if r.config() == c => ClusterChange::Keep,
            (Some(c), r) => ClusterChange::Replace(
                crate::cluster::Cluster::prepare(c, self.cluster_metrics.clone(), r.as_deref())
                    .await?,
            ),
            (None, Some(_)) => ClusterChange::Remove,
            (None, None) => ClusterChange::Keep,
        };

        // For new upstreams too: their first probe round before they route anything.
        for u in &p.started {
            u.wait_ready().await;
        }
        p.config = Some(new);
        Ok(p)
    }

    /// Swaps the prepared state in. Nothing here can fail: upstream controllers take their
    /// new settings on their command channel (served before probe results), and the new
    /// listeners start on sockets that are already bound.
    async fn commit(&self, mut p: Prepared) {
        p.committed = true;
        let mut new = p.config.take().expect("prepared config");
        if let Some(hooks) = p.hooks.take() {
            self.hooks.commit(hooks);
        }
        self.reload_turn_auth(&mut new).await;
        for (rt, spec, list) in std::mem::take(&mut p.changes) {
            if let Err(e) = rt.reload(spec, list).await {
                tracing::warn!(upstream = %rt.name, error = %e, "upstream did not take the new settings");
            }
        }
        let previous = self
            .upstreams
            .swap(Arc::new(std::mem::take(&mut p.upstreams)));

        // The old sources stop feeding; the new ones take over.
        let (discovery, feeders) = p.discovery.take().expect("prepared discovery");
        if let Some((old, old_feeders)) = self
            .discovery
            .lock()
            .await
            .replace((discovery, feeders.clone()))
        {
            old_feeders.cancel();
            old.stop();
        }
        for (control, feed) in std::mem::take(&mut p.feeds) {
            spawn_feeder(feed, control, feeders.clone());
        }

        // New listeners start reading first, then the ones they replace stop: a
        // handed-over socket is never without a reader.
        p.start.cancel();
        for l in &p.built {
            tracing::info!(listener = %l.config.name, listen = %l.config.listen, "listener started");
        }
        let listeners = Arc::new(std::mem::take(&mut p.listeners));
        let running = self.listeners.swap(listeners.clone());
        for r in running.iter() {
            if !listeners.iter().any(|k| Arc::ptr_eq(k, r)) {
                tracing::info!(listener = %r.config.name, "stopping listener (changed or removed)");
                r.stop();
            }
        }

        // Upstreams no longer named anywhere stop last, after no listener uses them.
        for (name, rt) in previous.iter() {
            if !new.upstreams.contains_key(name) {
                rt.stop();
            }
        }
        // TURN never relays to the gateway's own proxy listeners, as they are now.
        if let Some(policy) = &self.turn_policy {
            policy.set_proxy_listeners(&new.listeners);
        }
        // The cluster member last: it reads the upstreams as they are now.
        match std::mem::replace(&mut p.cluster, ClusterChange::Keep) {
            ClusterChange::Keep => {}
            ClusterChange::Replace(c) => {
                let previous = self.cluster.load_full();
                c.launch(self.upstreams_fn(), previous).await;
                self.cluster.store(Some(c));
            }
            ClusterChange::Remove => {
                if let Some(old) = self.cluster.swap(None) {
                    old.stop();
                    tracing::info!(node = %old.node_id, "cluster member stopped (section removed)");
                }
                // Without peers, only this replica's own probes count.
                for u in self.upstreams.load().values() {
                    let _ = u
                        .control()
                        .send(Control::PeerDown(Default::default()))
                        .await;
                }
                self.cluster_metrics.clear();
            }
        }
        self.admin_token.store(Arc::new(new.admin.token.clone()));
        self.config.store(Arc::new(new));
    }
}

/// The part of a `turn` section that only a restart applies: all of it but `auth` (the
/// running service takes new credentials) and `ice` (read per `/ice` request).
fn turn_restart_part_differs(a: &crate::config::TurnConfig, b: &crate::config::TurnConfig) -> bool {
    let mut b = b.clone();
    b.auth = a.auth.clone();
    b.ice = a.ice.clone();
    *a != b
}

impl AppState {
    /// The running TURN service takes the new `turn.auth` (secret rotation: `/ice` signs
    /// with the new first secret and the service verifies with every new secret at once).
    /// The `turn` section stored for `/ice` and `/config` is the one that runs: the new
    /// `auth` (if the service took it) and `ice`, everything else as started.
    async fn reload_turn_auth(&self, new: &mut Config) {
        let old = self.config.load_full();
        let Some(running) = old.turn.as_ref() else {
            new.turn = None;
            return;
        };
        let mut stored = running.clone();
        if let Some(wanted) = new.turn.as_ref() {
            stored.ice = wanted.ice.clone();
            if wanted.auth != running.auth
                && let Some(svc) = self.turn.lock().await.as_ref()
            {
                match svc.set_auth(&wanted.auth) {
                    Ok(()) => {
                        tracing::info!("TURN credentials (turn.auth) reloaded");
                        stored.auth = wanted.auth.clone();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TURN credentials not reloaded; the previous ones stay in force")
                    }
                }
            }
        }
        new.turn = Some(stored);
    }
}

/// FNV-1a of the file's content (0 when unreadable).
pub(super) fn file_hash(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| hash_text(&t))
        .unwrap_or(0)
}

fn hash_text(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) | 1
}

/// After a reload: what the old configuration held (servers, their probers and metrics,
/// listeners' tables) is freed as its tasks wind down over the next moments, but glibc's
/// allocator keeps freed memory for the process (a reload to 10,000 servers and back kept
/// ~90 MB resident). Trims the heaps once the old tasks have ended, a few times as they
/// do. A no-op with other C libraries.
fn give_memory_back() {
    tokio::spawn(async {
        for wait in [
            Duration::from_millis(200),
            Duration::from_secs(1),
            Duration::from_secs(3),
        ] {
            tokio::time::sleep(wait).await;
            let _ = tokio::task::spawn_blocking(trim_heaps).await;
        }
    });
}

/// Returns the allocator's free memory to the system (glibc's `malloc_trim`).
fn trim_heaps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and may run at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
