//! `cluster.state_configmap`: the admin states kept where Kubernetes keeps state, in a
//! ConfigMap (key `state.json`, the same JSON as `cluster.state_file`), read at start
//! and written (server-side apply, field manager `mediagate`) after each change. RBAC:
//! `get`, `create` and `patch` on that ConfigMap (manifests/mediagate/cluster-peers.yaml).

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use std::collections::BTreeMap;

/// The key of the ConfigMap that holds the states.
pub const KEY: &str = "state.json";

/// Where the pod's namespace is written by Kubernetes.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// A ConfigMap holding the admin states.
pub struct ConfigMapStore {
    api: Api<ConfigMap>,
    name: String,
}

/// `namespace/name` or `name` (the pod's own namespace, else `default`).
pub fn split_ref(reference: &str) -> (String, String) {
    match reference.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (
            std::fs::read_to_string(NAMESPACE_FILE)
                .map(|s| s.trim().to_string())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            reference.to_string(),
        ),
    }
}

impl ConfigMapStore {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        ConfigMapStore {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }

    /// The stored JSON, if the ConfigMap and its key exist.
    pub async fn load(&self) -> Result<Option<String>> {
        let cm = self
            .api
            .get_opt(&self.name)
            .await
            .with_context(|| format!("get ConfigMap {}", self.name))?;
        Ok(cm.and_then(|cm| cm.data).and_then(|mut d| d.remove(KEY)))
    }

    /// Creates or updates the ConfigMap with `json`.
    pub async fn save(&self, json: &str) -> Result<()> {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    "mediagate".to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(KEY.to_string(), json.to_string())])),
            ..Default::default()
        };
        self.api
            .patch(
                &self.name,
                &PatchParams::apply("mediagate").force(),
                &Patch::Apply(&cm),
            )
            .await
            .with_context(|| format!("apply ConfigMap {}", self.name))?;
        Ok(())
    }
}
