//! `cluster.state_configmap` against kube's mock service (tower-test): a missing
//! ConfigMap reads as none, a save is a server-side apply of `state.json` by field
//! manager `mediagate`, and what was saved reads back.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use mediagate::cluster::kube_state::{ConfigMapStore, KEY};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<Full<Bytes>>>;

/// A fake API server holding one ConfigMap (or none); records the PATCH requests.
fn serve(mut handle: Handle, patches: Arc<Mutex<Vec<(String, String, Value)>>>) {
    tokio::spawn(async move {
        let mut stored: Option<Value> = None;
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().to_string();
            let method = req.method().clone();
            let ctype = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            assert!(
                path.starts_with("/api/v1/namespaces/media/configmaps/mediagate-state"),
                "{path}"
            );
            let (status, out) = match method.as_str() {
                "GET" => match &stored {
                    Some(cm) => (StatusCode::OK, cm.clone()),
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                               "message":"configmaps \"mediagate-state\" not found",
                               "reason":"NotFound","code":404}),
                    ),
                },
                "PATCH" => {
                    let v: Value = serde_json::from_slice(&body).expect("apply body is JSON");
                    patches
                        .lock()
                        .unwrap()
                        .push((path.clone(), ctype, v.clone()));
                    let mut cm = v;
                    cm["metadata"]["namespace"] = json!("media");
                    stored = Some(cm.clone());
                    (StatusCode::OK, cm)
                }
                other => panic!("unexpected {other} {path}"),
            };
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(out.to_string())))
                    .unwrap(),
            );
        }
    });
}

#[tokio::test]
async fn admin_states_round_trip_through_a_configmap() {
    let (service, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let patches = Arc::new(Mutex::new(Vec::new()));
    serve(handle, patches.clone());
    let client = kube::Client::new(service, "default");
    let store = ConfigMapStore::new(client, "media", "mediagate-state");

    assert_eq!(store.load().await.unwrap(), None, "no ConfigMap yet");
    let json = r#"{"media":{"10.0.0.1:8000":{"at_ms":1,"state":"drain","origin":"r1"}}}"#;
    store.save(json).await.unwrap();
    {
        let p = patches.lock().unwrap();
        assert_eq!(p.len(), 1);
        let (path, ctype, body) = &p[0];
        assert!(path.contains("fieldManager=mediagate"), "{path}");
        assert!(path.contains("force=true"), "{path}");
        assert_eq!(ctype, "application/apply-patch+yaml");
        assert_eq!(body["kind"], "ConfigMap");
        assert_eq!(body["data"][KEY], json);
    }
    assert_eq!(store.load().await.unwrap().as_deref(), Some(json));
}
