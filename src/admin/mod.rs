//! The admin HTTP API (axum, see docs/admin-api.md): health, readiness, metrics, status and the POST
//! endpoints that send commands to upstream controllers. It only reads snapshots and sends
//! messages; it never sits on the data path.
//!
//! It sees the running balancer through [`Backend`], a narrow interface the application
//! implements (`crate::app`), so this module does not depend on the application's types.

pub mod client;
pub mod conns;
pub mod status;
#[cfg(test)]
mod tests;

use crate::cluster::{AdminOutcome, Cluster};
use crate::config::Config;
use crate::metrics::{Metrics, child, labels};
use crate::upstream::{AdminState, UpstreamRuntime};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A reload's outcome: the errors that rejected it.
pub type ReloadFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Vec<String>>> + Send + 'a>>;

/// What the admin API reads from and asks of the running balancer.
pub trait Backend: Send + Sync + 'static {
    /// The configuration in force.
    fn config(&self) -> Arc<Config>;
    /// The metrics registry.
    fn metrics(&self) -> &Metrics;
    /// The admin token in force (a reload may change it).
    fn admin_token(&self) -> Arc<Option<String>>;
    /// Serving traffic (after the first probe round).
    fn ready(&self) -> bool;
    /// Shutting down.
    fn draining(&self) -> bool;
    /// The upstreams, in configuration order.
    fn upstreams(&self) -> Arc<indexmap::IndexMap<String, Arc<UpstreamRuntime>>>;
    /// The listeners as `/status` shows them.
    fn listeners(&self) -> Vec<status::ListenerStatus>;
    /// The configuration file, when it was loaded and the last reload error.
    fn config_status(&self) -> status::ConfigStatus;
    /// Time since start.
    fn uptime(&self) -> Duration;
    /// TURN allocations, when the TURN service runs.
    fn turn_allocations(&self) -> Option<usize>;
    /// The cluster membership in force, when `cluster:` is set.
    fn cluster(&self) -> Option<Arc<Cluster>>;
    /// Reloads the configuration file (a transaction: all or nothing).
    fn reload(&self) -> ReloadFuture<'_>;
}

#[derive(Clone)]
struct Ctx {
    app: Arc<dyn Backend>,
    /// `GET /events` streams open now (`admin.max_event_streams`).
    event_streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// The router, without a listener (tests use it directly).
///
/// Routes that change state sit behind the bearer-token check when `admin.token` is set.
/// `/ice` hands out credentials and checks its own tokens (the admin token or
/// `turn.ice.token`, see `ice`) so that it can be exposed to web pages with CORS. The
/// check is a middleware, so it runs before any extractor: an unauthenticated request is
/// answered 401 without its body being read.
pub fn router(app: Arc<dyn Backend>) -> Router {
    let ctx = Ctx {
        app,
        event_streams: Arc::default(),
    };
    let guarded = Router::new()
        .route("/upstreams/{name}/servers/{server}/state", post(set_state))
        .route("/upstreams/{name}/failback", post(failback))
        .route("/reload", post(reload))
        .route("/log-level", post(set_log_level))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_handler))
        .route("/events", get(events_stream))
        .route("/log-level", get(log_level))
        .route("/ice", get(ice).options(ice_preflight))
        .merge(guarded)
        .with_state(ctx)
}

/// Middleware: `401` unless the request carries the admin token (when one is set).
async fn require_token(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    match authorize(&ctx, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => *r,
    }
}

/// Serves the API on `listener` until `stop` fires, within `admin.max_connections` and
/// `admin.header_read_timeout` (see `conns`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<dyn Backend>,
    stop: CancellationToken,
) {
    let admin = app.config().admin.clone();
    let limits = conns::Limits {
        max_connections: admin.max_connections,
        header_read_timeout: admin.header_read_timeout.get(),
    };
    let metrics = app.metrics().clone();
    conns::serve(listener, router(app), limits, metrics, stop).await;
}

/// `GET /events`: Server-Sent Events, one `data:` JSON object per event (see
/// `crate::events`), the SSE event name being its `kind` and its id `<boot>-<seq>`. A
/// subscriber that reconnects with `Last-Event-ID` first gets what it missed from the
/// last `events::HISTORY` events, or one `reset` event when they no longer reach back (or
/// it reached another process). A subscriber more than `events::BUS_CAPACITY` events
/// behind is disconnected (it reconnects with its `Last-Event-ID`); nothing waits for a
/// slow reader. Needs `admin.token` or `admin.events_token` when either is set; at most
/// `admin.max_event_streams` streams at once.
async fn events_stream(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use std::sync::atomic::Ordering;
    let cfg = ctx.app.config();
    let admin_token = ctx.app.admin_token();
    let tokens: Vec<&str> = [admin_token.as_deref(), cfg.admin.events_token.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    if !tokens.is_empty() {
        let given = bearer(&headers);
        if !given.is_some_and(|g| {
            tokens
                .iter()
                .any(|t| constant_time_eq(g.as_bytes(), t.as_bytes()))
        }) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    let cap = cfg
        .admin
        .max_event_streams
        .min(cfg.admin.max_connections.saturating_sub(1))
        .max(1);
    let open = ctx.event_streams.fetch_add(1, Ordering::AcqRel);
    let slot = StreamSlot(ctx.event_streams.clone());
    if open >= cap {
        drop(slot);
        child(
            &ctx.app.metrics().admin_closed,
            &labels(&[("reason", "event_streams")]),
        )
        .inc();
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{cap} event streams are open (admin.max_event_streams)"),
        );
    }
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (replay, rx) = crate::events::subscribe_after(last.as_deref());
    let first: Vec<Event> = match replay {
        crate::events::Replay::Missed(missed) => {
            missed.iter().map(|(_, json)| sse_event(json)).collect()
        }
        crate::events::Replay::Reset { reason } => vec![
            Event::default()
                .event("reset")
                .data(serde_json::json!({ "kind": "reset", "reason": reason }).to_string()),
        ],
    };
    let live = futures_util::stream::unfold((rx, slot), |(mut rx, slot)| async move {
        let json = rx.recv().await.ok()?;
        Some((sse_event(&json), (rx, slot)))
    });
    let stream = futures_util::stream::iter(first)
        .chain(live)
        .map(Ok::<_, std::convert::Infallible>);
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Read by the connection loop: a live stream is never an idle connection.
    resp.extensions_mut().insert(conns::Streaming);
    resp
}

/// One event as SSE: its `kind` as the event name, `<boot>-<seq>` as the id.
fn sse_event(json: &str) -> axum::response::sse::Event {
    let v = serde_json::from_str::<serde_json::Value>(json).unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or("event").to_string();
    let seq = v["seq"].as_u64().unwrap_or(0);
    axum::response::sse::Event::default()
        .event(kind)
        .id(crate::events::event_id(seq))
        .data(json)
}

/// Holds one of `admin.max_event_streams` while its stream lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    if ctx.app.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if ctx.app.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

/// `GET /metrics`: the Prometheus text format 0.0.4, or OpenMetrics when `Accept` asks
/// for `application/openmetrics-text`.
async fn metrics(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (content_type, body) = if crate::metrics::wants_openmetrics(accept) {
        (crate::metrics::OPENMETRICS_TYPE, ctx.app.metrics().encode())
    } else {
        (
            crate::metrics::PROMETHEUS_TYPE,
            ctx.app.metrics().encode_prometheus(),
        )
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[derive(Deserialize)]
struct LevelBody {
    level: String,
}

/// `GET /log-level`: the log filter in force.
async fn log_level() -> Response {
    Json(serde_json::json!({ "level": crate::logging::current_level() })).into_response()
}

/// `POST /log-level` `{"level":"debug"}` (or directives such as `info,mediagate=debug`):
/// changes the log filter until the next change or a reload that changes `log.level`.
async fn set_log_level(body: axum::body::Bytes) -> Response {
    let body: LevelBody = match json_body(&body, "{\"level\":\"debug\"}") {
        Ok(b) => b,
        Err(e) => return *e,
    };
    match crate::logging::set_level(&body.level) {
        Ok(level) => {
            tracing::info!(%level, "log level changed through the admin API");
            Json(serde_json::json!({ "level": level })).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn status_handler(State(ctx): State<Ctx>) -> Response {
    Json(status::build(ctx.app.as_ref())).into_response()
}

#[derive(Deserialize)]
struct StateBody {
    state: String,
}

/// A JSON request body, whatever its `Content-Type` says (`curl -d` sends
/// `application/x-www-form-urlencoded`): a body that does not parse gets a 400 showing
/// the expected shape.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON such as {shape}: {e}"),
        ))
    })
}

/// The one server of `up` that `server` names (its `ip:port`, or a bare IP that only
/// one server has), or the error to answer: 404 when none, 409 listing them when a bare
/// IP names several (a node with several ports).
fn resolve_server(up: &UpstreamRuntime, name: &str, server: &str) -> Result<String, Box<Response>> {
    let view = up.view();
    let exact: Vec<&str> = view
        .servers
        .iter()
        .filter(|s| s.handle.label == server)
        .map(|s| s.handle.label.as_str())
        .collect();
    let matches: Vec<&str> = if exact.is_empty() {
        view.servers
            .iter()
            .filter(|s| s.handle.ip.to_string() == server)
            .map(|s| s.handle.label.as_str())
            .collect()
    } else {
        exact
    };
    match matches.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!(
                "no server {server} in upstream {name} (servers: {})",
                view.servers
                    .iter()
                    .map(|s| s.handle.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))),
        many => Err(Box::new(error(
            StatusCode::CONFLICT,
            format!(
                "{server} is {} servers of upstream {name}: {}; name one as ip:port",
                many.len(),
                many.join(", ")
            ),
        ))),
    }
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = ctx.app.admin_token();
    let Some(want) = token.as_deref() else {
        return Ok(());
    };
    match bearer(headers) {
        Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
        _ => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))),
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's case does not
/// matter, RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn set_state(
    State(ctx): State<Ctx>,
    Path((name, server)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let body: StateBody = match json_body(&body, "{\"state\":\"enable\"|\"drain\"|\"maint\"}") {
        Ok(b) => b,
        Err(e) => return *e,
    };
    let state: AdminState = match body.state.parse() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(up) = ctx.app.upstreams().get(&name).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {name}"));
    };
    // A bare IP is accepted when it names one server; from here on the server is its
    // ip:port (in the event, the cluster message and the answer).
    let server = match resolve_server(&up, &name, &server) {
        Ok(label) => label,
        Err(e) => return *e,
    };
    // With a cluster, the state is the cluster's: published for every replica, applied
    // here by the cluster like a peer's, and answered 200 only once it holds.
    if let Some(c) = ctx.app.cluster() {
        let done = serde_json::json!({
            "upstream": name, "server": server, "state": state.as_str()
        });
        return match c.set_admin(&up, &server, state).await {
            AdminOutcome::Applied => Json(done).into_response(),
            AdminOutcome::Superseded(w) => error(
                StatusCode::CONFLICT,
                format!(
                    "a newer action wins on the cluster: {} by {} (version {}); this one is not applied",
                    w.state.as_str(),
                    w.origin,
                    w.version
                ),
            ),
            AdminOutcome::Unconfirmed(waiting) => {
                let mut body = done;
                body["pending"] = serde_json::json!(waiting);
                (StatusCode::ACCEPTED, Json(body)).into_response()
            }
        };
    }
    match up.set_admin(&server, state).await {
        Ok(()) => Json(serde_json::json!({
            "upstream": name, "server": server, "state": state.as_str()
        }))
        .into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn failback(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    let Some(up) = ctx.app.upstreams().get(&name).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {name}"));
    };
    match up.failback_now().await {
        Ok(()) => {
            if let Some(c) = ctx.app.cluster() {
                c.failback_requested(&name).await;
            }
            Json(serde_json::json!({
                "upstream": name, "active": up.view().active
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn reload(State(ctx): State<Ctx>) -> Response {
    match ctx.app.reload().await {
        Ok(()) => Json(serde_json::json!({ "result": "ok" })).into_response(),
        Err(errors) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({ "result": "error", "errors": errors })),
        )
            .into_response(),
    }
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, when
/// `turn.ice.cors_origins` allows it (`*` allows every origin).
fn cors_origin(turn: &crate::config::TurnConfig, headers: &HeaderMap) -> Option<String> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    let allowed = &turn.ice.cors_origins;
    if allowed.iter().any(|o| o == "*") {
        Some("*".to_string())
    } else if allowed.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
        Some(origin.to_string())
    } else {
        None
    }
}

/// The CORS headers of an `/ice` answer for `origin` (None: not an allowed origin), and
/// what every `/ice` answer carries: `Vary: Origin` (the answer depends on it, so a cache
/// must not serve one origin's answer to another) and `Cache-Control: no-store` (it holds
/// credentials).
fn with_cors(mut r: Response, origin: Option<String>) -> Response {
    let h = r.headers_mut();
    h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if let Some(o) = origin.and_then(|o| header::HeaderValue::from_str(&o).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
    }
    r
}

/// `OPTIONS /ice`: the CORS preflight, answered without a token (browsers send none)
/// for origins in `turn.ice.cors_origins`; 403 for others.
async fn ice_preflight(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    let config = ctx.app.config();
    let origin = config.turn.as_ref().and_then(|t| cors_origin(t, &headers));
    let Some(origin) = origin else {
        return error(StatusCode::FORBIDDEN, "origin not in turn.ice.cors_origins");
    };
    let mut r = with_cors(StatusCode::NO_CONTENT.into_response(), Some(origin));
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::HeaderValue::from_static("GET, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::HeaderValue::from_static("authorization"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        header::HeaderValue::from_static("600"),
    );
    r
}

/// `GET /ice?service=turn&username=U&ttl=SECONDS&iceTransportPolicy=relay&listener=L`: a
/// browser-ready ICE configuration (STUNner's auth-service parameters, see
/// `turn::IceRequest`). When `admin.token` or `turn.ice.token` is set, a bearer token is
/// needed and either one is accepted.
async fn ice(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Response {
    let config = ctx.app.config();
    let Some(turn) = &config.turn else {
        return error(
            StatusCode::NOT_FOUND,
            "no turn section in the configuration",
        );
    };
    let origin = cors_origin(turn, &headers);
    let ice_token_ok = turn.ice.token.as_deref().is_some_and(|want| {
        bearer(&headers).is_some_and(|t| constant_time_eq(t.as_bytes(), want.as_bytes()))
    });
    let admin_ok = authorize(&ctx, &headers).is_ok();
    // No admin token but an /ice token: the /ice token is required.
    let needs_ice_token = turn.ice.token.is_some() && ctx.app.admin_token().is_none();
    if !ice_token_ok && (!admin_ok || needs_ice_token) {
        return with_cors(
            error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"),
            origin,
        );
    }
    let Ok(axum::extract::Query(pairs)) = query else {
        return with_cors(
            error(StatusCode::BAD_REQUEST, "unreadable query string"),
            origin,
        );
    };
    let r = match crate::turn::IceRequest::from_query(&pairs)
        .and_then(|req| crate::turn::ice_config_for(turn, &req, std::time::SystemTime::now()))
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    };
    with_cors(r, origin)
}
