//! The admin HTTP API (SPEC §9, axum): health, readiness, metrics, status and the POST
//! endpoints that send commands to upstream controllers. It only reads snapshots and sends
//! messages; it never sits on the data path.

pub mod client;
pub mod conns;
pub mod status;

use crate::app::AppState;
use crate::upstream::AdminState;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Ctx {
    app: Arc<AppState>,
}

/// The router, without a listener (tests use it directly).
///
/// Routes that change state or hand out credentials (`/ice`) sit behind the bearer-token
/// check when `admin.token` is set. The check is a middleware, so it runs before any
/// extractor: an unauthenticated request is answered 401 without its body being read.
pub fn router(app: Arc<AppState>) -> Router {
    let ctx = Ctx { app };
    let guarded = Router::new()
        .route("/ice", get(ice))
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
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<AppState>, stop: CancellationToken) {
    let admin = app.config.load().admin.clone();
    let limits = conns::Limits {
        max_connections: admin.max_connections,
        header_read_timeout: admin.header_read_timeout.get(),
    };
    let metrics = app.metrics.clone();
    conns::serve(listener, router(app), limits, metrics, stop).await;
}

/// `GET /events`: Server-Sent Events, one `data:` JSON object per event (see
/// `crate::events`), the SSE event name being its `kind`. A subscriber more than
/// `events::BUS_CAPACITY` events behind is disconnected (it reconnects and reads
/// `/status` to catch up); nothing waits for a slow reader.
async fn events_stream() -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = crate::events::subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let json = rx.recv().await.ok()?;
        let kind = serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v["kind"].as_str().map(str::to_string))
            .unwrap_or_else(|| "event".into());
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().event(kind).data(&*json)),
            rx,
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    if ctx.app.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if ctx.app.ready.load(Ordering::Acquire) {
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
        (crate::metrics::OPENMETRICS_TYPE, ctx.app.metrics.encode())
    } else {
        (
            crate::metrics::PROMETHEUS_TYPE,
            ctx.app.metrics.encode_prometheus(),
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
async fn set_log_level(
    body: Result<Json<LevelBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be JSON: {\"level\":\"debug\"}",
        );
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
    Json(status::build(&ctx.app)).into_response()
}

#[derive(Deserialize)]
struct StateBody {
    state: String,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = ctx.app.admin_token.load();
    let Some(want) = token.as_deref() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
        _ => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn set_state(
    State(ctx): State<Ctx>,
    Path((name, server)): Path<(String, String)>,
    body: Result<Json<StateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be JSON: {\"state\":\"enable\"|\"drain\"|\"maint\"}",
        );
    };
    let state: AdminState = match body.state.parse() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(up) = ctx.app.upstreams.load().get(&name).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {name}"));
    };
    match up.set_admin(&server, state).await {
        Ok(()) => {
            if let Some(c) = &ctx.app.cluster {
                // The peers know servers by label; the API also takes a bare IP.
                let label = up
                    .view()
                    .servers
                    .iter()
                    .find(|s| s.handle.label == server || s.handle.ip.to_string() == server)
                    .map(|s| s.handle.label.clone())
                    .unwrap_or_else(|| server.clone());
                c.admin_changed(&name, &label, state).await;
            }
            Json(serde_json::json!({
                "upstream": name, "server": server, "state": state.as_str()
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn failback(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    let Some(up) = ctx.app.upstreams.load().get(&name).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {name}"));
    };
    match up.failback_now().await {
        Ok(()) => {
            if let Some(c) = &ctx.app.cluster {
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

#[derive(Deserialize)]
struct IceQuery {
    #[serde(default)]
    username: String,
    ttl: Option<u64>,
}

/// `GET /ice?username=U&ttl=SECONDS`: a browser-ready ICE configuration (SPEC §7).
async fn ice(
    State(ctx): State<Ctx>,
    query: Result<axum::extract::Query<IceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "query must be ?username=NAME&ttl=SECONDS",
        );
    };
    let config = ctx.app.config.load();
    let Some(turn) = &config.turn else {
        return error(
            StatusCode::NOT_FOUND,
            "no turn section in the configuration",
        );
    };
    let ttl = q.ttl.map(std::time::Duration::from_secs);
    match crate::turn::ice_config(turn, &q.username, ttl, std::time::SystemTime::now()) {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}
