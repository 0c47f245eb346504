//! The admin API served on a stub [`Backend`]: the narrow interface is all it needs.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Stub {
    config: Arc<Config>,
    metrics: Metrics,
    token: Arc<Option<String>>,
    ready: AtomicBool,
    reloads: AtomicUsize,
}

impl Backend for Stub {
    fn config(&self) -> Arc<Config> {
        self.config.clone()
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn admin_token(&self) -> Arc<Option<String>> {
        self.token.clone()
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn draining(&self) -> bool {
        false
    }
    fn upstreams(&self) -> Arc<indexmap::IndexMap<String, Arc<UpstreamRuntime>>> {
        Arc::default()
    }
    fn listeners(&self) -> Vec<status::ListenerStatus> {
        Vec::new()
    }
    fn config_status(&self) -> status::ConfigStatus {
        status::ConfigStatus {
            path: "stub.yaml".into(),
            loaded_at: status::rfc3339(std::time::SystemTime::UNIX_EPOCH),
            last_reload_error: None,
        }
    }
    fn uptime(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn turn_allocations(&self) -> Option<usize> {
        None
    }
    fn cluster(&self) -> Option<Arc<Cluster>> {
        None
    }
    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async {
            self.reloads.fetch_add(1, Ordering::Relaxed);
            Err(vec!["stub: refused".to_string()])
        })
    }
}

#[tokio::test]
async fn the_api_runs_on_any_backend() {
    let config = crate::config::load_str(
        "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u: { primary: [127.0.0.1] }\n",
        "stub.yaml",
    )
    .expect("config");
    let stub = Arc::new(Stub {
        config: Arc::new(config),
        metrics: Metrics::new(),
        token: Arc::new(Some("t0ken".into())),
        ready: AtomicBool::new(false),
        reloads: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, stub.clone(), stop.clone()));
    let req = |method: &'static str, path: &'static str, token: Option<&'static str>| {
        let base = base.clone();
        async move {
            client::request(&base, method, path, None, token)
                .await
                .expect("request")
        }
    };

    assert_eq!(req("GET", "/readyz", None).await.0, 503);
    stub.ready.store(true, Ordering::Relaxed);
    assert_eq!(req("GET", "/readyz", None).await.0, 200);
    let (code, body) = req("GET", "/status", None).await;
    assert_eq!(code, 200);
    let st: status::Status = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(st.config.path, "stub.yaml");
    assert!(st.upstreams.is_empty() && st.cluster.is_none());

    assert_eq!(req("POST", "/reload", None).await.0, 401);
    assert_eq!(stub.reloads.load(Ordering::Relaxed), 0);
    let (code, body) = req("POST", "/reload", Some("t0ken")).await;
    assert_eq!(code, 422);
    assert!(body.contains("stub: refused"), "{body}");
    assert_eq!(stub.reloads.load(Ordering::Relaxed), 1);
    stop.cancel();
}
