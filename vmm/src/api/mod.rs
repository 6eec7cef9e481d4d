//! The control API of a running VM (`evm run --api-sock PATH`): HTTP/1.1
//! with JSON bodies on a Unix socket, like Firecracker's and Cloud
//! Hypervisor's. Described by `openapi.yaml` (also served at
//! `GET /openapi.yaml`). `client` is the CLI's side (`evm status`, …).
//!
//! | request | does |
//! | --- | --- |
//! | `GET /status` | running/paused, current and last committed epoch, rates |
//! | `GET /epochs` | recent committed epochs (up to 1024) |
//! | `GET /metrics` | Prometheus text format |
//! | `PUT /checkpoint` | take an epoch now; answers once it is committed |
//! | `PUT /pause`, `PUT /resume` | park the vCPUs, or let them run |
//! | `PATCH /vm` `{"state": "paused"\|"running"}` | the same, Firecracker style |
//! | `PUT /stop` | commit a final epoch and exit (answers once committed) |
//!
//! Each connection is served on its own short-lived thread, one request
//! per connection; nothing a client sends can stop or harm the VM except
//! the requests above.

pub mod client;
pub mod http;
mod metrics;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::epoch::EpochNow;
use crate::gate::Gate;
use crate::telemetry::Telemetry;
use crate::vcpu::VmEvent;
use http::{Request, Response};

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("openapi.yaml");

/// How long `PUT /stop` waits for the final epoch.
const STOP_WAIT: Duration = Duration::from_secs(600);

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something else is at the path.
    #[error("--api-sock {}: exists and is not a socket; evm will not replace it", .0.display())]
    NotASocket(PathBuf),
    /// Another process serves the socket.
    #[error("--api-sock {}: another process is listening there", .0.display())]
    InUse(PathBuf),
    /// Binding failed.
    #[error("--api-sock {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the API acts on.
#[derive(Debug)]
pub struct Control {
    /// Counters and history.
    pub telemetry: Arc<Telemetry>,
    /// Pause and resume.
    pub gate: Arc<Gate>,
    /// Epochs on demand (`None` without a store).
    pub epochs: Option<EpochNow>,
    /// Where `PUT /stop` is reported to the main thread.
    pub events: Mutex<Sender<VmEvent>>,
}

/// How the main thread answers a `PUT /stop`.
#[derive(Debug, Default)]
pub struct StopReply {
    slot: Mutex<StopSlot>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct StopSlot {
    /// The final epoch (`Ok(None)`: no store), once the main thread knows.
    result: Option<Result<Option<u64>, String>>,
    /// Set by the API thread once the response is written.
    answered: bool,
    /// Whether an API client asked for the stop (so the main thread waits
    /// for its answer before exiting).
    asked: bool,
}

impl StopReply {
    fn lock(&self) -> std::sync::MutexGuard<'_, StopSlot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The main thread: the machine has stopped with this final epoch.
    /// Waits (briefly) until an API client that asked has its answer.
    pub fn stopped(&self, result: Result<Option<u64>, String>) {
        let mut s = self.lock();
        s.result = Some(result);
        self.cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(2);
        while s.asked && !s.answered {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn wait(&self) -> Option<Result<Option<u64>, String>> {
        let mut s = self.lock();
        let deadline = Instant::now() + STOP_WAIT;
        while s.result.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.result.clone()
    }

    fn answered(&self) {
        self.lock().answered = true;
        self.cv.notify_all();
    }
}

/// A bound, serving API socket; removes the socket file when dropped.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<StopReply>,
    thread: Option<JoinHandle<()>>,
}

/// A bound API socket not yet served; its file is removed if it is
/// dropped unserved (evm failed before the machine ran).
#[derive(Debug)]
pub struct Bound {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Bind `path` (replacing a stale socket nobody listens on).
pub fn bind(path: &Path) -> Result<Bound, ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ApiError::NotASocket(path.into())),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.into()));
            }
            std::fs::remove_file(path).map_err(|e| ApiError::Bind {
                path: path.into(),
                source: e,
            })?;
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind {
        path: path.into(),
        source: e,
    })?;
    Ok(Bound {
        listener: Some(listener),
        path: path.into(),
    })
}

impl ApiServer {
    /// Serve the bound socket for `ctl`.
    pub fn spawn(mut bound: Bound, ctl: Control) -> std::io::Result<Self> {
        let path = bound.path.clone();
        let Some(listener) = bound.listener.take() else {
            return Err(std::io::Error::other("API socket already served"));
        };
        let stop = Arc::new(StopReply::default());
        let ctl = Arc::new(ctl);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, ctl, stop2))?;
        log::info!("control API on {}", path.display());
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Where the main thread reports the end of the machine.
    pub fn stop_reply(&self) -> Arc<StopReply> {
        self.stop.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The accept loop blocks in accept(); the process is about to end,
        // so it is left there rather than woken.
        drop(self.thread.take());
    }
}

fn accept_loop(listener: UnixListener, ctl: Arc<Control>, stop: Arc<StopReply>) {
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control API: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let (ctl, stop) = (ctl.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || serve(&mut stream, &ctl, &stop));
        if let Err(e) = spawned {
            log::warn!("control API: cannot start a connection thread: {e}");
        }
    }
}

fn serve(stream: &mut UnixStream, ctl: &Control, stop: &StopReply) {
    let resp = match http::read_request(stream) {
        Ok(req) => {
            log::debug!("control API: {} {}", req.method, req.path);
            let is_stop = req.path == "/stop" && req.method == "PUT";
            let resp = route(&req, ctl, stop);
            if is_stop {
                let _ = http::write_response(stream, &resp);
                stop.answered();
                return;
            }
            resp
        }
        Err(e) => match e.response() {
            Some(r) => {
                log::info!("control API: {e}");
                r
            }
            None => return,
        },
    };
    if let Err(e) = http::write_response(stream, &resp) {
        log::debug!("control API: writing a response: {e}");
    }
}

/// The body as a JSON object (empty body: `{}`), or a 400.
fn body_object(req: &Request) -> Result<serde_json::Map<String, Value>, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Response::error(400, "the body must be a JSON object")),
        Err(e) => Err(Response::error(400, format!("malformed JSON body: {e}"))),
    }
}

/// A body with no fields (empty, or `{}`), or a 400.
fn no_fields(req: &Request) -> Result<(), Response> {
    let m = body_object(req)?;
    match m.keys().next() {
        None => Ok(()),
        Some(k) => Err(Response::error(
            400,
            format!(
                "unknown field {k:?}: {} {} takes no fields",
                req.method, req.path
            ),
        )),
    }
}

fn route(req: &Request, ctl: &Control, stop: &StopReply) -> Response {
    let allowed = match req.path.as_str() {
        "/status" | "/epochs" | "/metrics" | "/openapi.yaml" => "GET",
        "/checkpoint" | "/pause" | "/resume" | "/stop" => "PUT",
        "/vm" => "PATCH",
        other => return Response::error(404, format!("no such resource {other:?}")),
    };
    if req.method != allowed {
        let mut r = Response::error(405, format!("{} {}: use {allowed}", req.method, req.path));
        r.headers.push(("Allow", allowed.to_string()));
        return r;
    }
    let result = match req.path.as_str() {
        "/status" => Ok(Response::json(200, &status(ctl))),
        "/epochs" => Ok(Response::json(200, &epochs(ctl))),
        "/metrics" => Ok(Response::text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(ctl),
        )),
        "/openapi.yaml" => Ok(Response::text(200, "application/yaml", OPENAPI.to_string())),
        "/checkpoint" => no_fields(req).map(|()| checkpoint(ctl)),
        "/pause" => no_fields(req).map(|()| set_state(ctl, true)),
        "/resume" => no_fields(req).map(|()| set_state(ctl, false)),
        "/vm" => patch_vm(req, ctl),
        "/stop" => no_fields(req).map(|()| stop_vm(ctl, stop)),
        _ => Err(Response::error(404, "no such resource")),
    };
    result.unwrap_or_else(|r| r)
}

fn state_name(ctl: &Control) -> &'static str {
    if ctl.gate.paused() {
        "paused"
    } else {
        "running"
    }
}

fn status(ctl: &Control) -> Value {
    let t = &ctl.telemetry;
    let c = t.lock();
    let rates = metrics::rates(&c.history, std::time::SystemTime::now());
    json!({
        "state": state_name(ctl),
        "vcpus": t.vcpus,
        "mem_bytes": t.mem_bytes,
        "uptime_s": t.uptime().as_secs_f64(),
        "store": t.store.as_ref().map(|p| p.display().to_string()),
        "interval_ms": t.interval.as_millis() as u64,
        "last_committed_epoch": c.last_committed,
        "current_epoch": t.store.as_ref().map(|_| c.last_committed.unwrap_or(0) + 1),
        "epochs_committed": c.committed,
        "checkpoint_failures": c.failures,
        "checkpoints_failing": c.failing,
        "last_error": c.last_error,
        "migrations": c.migrations,
        "log": t.store.as_ref().map(|_| c.log),
        "rates": rates,
    })
}

fn epochs(ctl: &Control) -> Value {
    let c = ctl.telemetry.lock();
    json!({
        "home_epoch": ctl.telemetry.store.as_ref().map(|_| c.log.home_epoch),
        "last_committed_epoch": c.last_committed,
        "epochs": c.history.iter().collect::<Vec<_>>(),
    })
}

fn checkpoint(ctl: &Control) -> Response {
    let Some(epochs) = &ctl.epochs else {
        return Response::error(
            409,
            "this VM runs without a store (--no-store): nothing to checkpoint",
        );
    };
    match epochs.checkpoint_now() {
        Ok(epoch) => Response::json(200, &json!({ "epoch": epoch })),
        Err(e) => Response::error(500, format!("checkpoint failed: {e}")),
    }
}

fn set_state(ctl: &Control, pause: bool) -> Response {
    let changed = if pause {
        match ctl.gate.pause() {
            Ok(c) => c,
            Err(e) => return Response::error(409, e.to_string()),
        }
    } else {
        ctl.gate.resume()
    };
    if changed {
        log::info!("control API: {}", if pause { "paused" } else { "resumed" });
    }
    Response::json(
        200,
        &json!({ "state": state_name(ctl), "changed": changed }),
    )
}

fn patch_vm(req: &Request, ctl: &Control) -> Result<Response, Response> {
    let mut m = body_object(req)?;
    let state = m.remove("state").ok_or_else(|| {
        Response::error(400, "PATCH /vm needs {\"state\": \"paused\" | \"running\"}")
    })?;
    if let Some(k) = m.keys().next() {
        return Err(Response::error(
            400,
            format!("unknown field {k:?} in PATCH /vm"),
        ));
    }
    match state.as_str() {
        Some("paused") => Ok(set_state(ctl, true)),
        Some("running") => Ok(set_state(ctl, false)),
        _ => Err(Response::error(
            400,
            format!("\"state\": {state} is not \"paused\" or \"running\""),
        )),
    }
}

fn stop_vm(ctl: &Control, stop: &StopReply) -> Response {
    stop.lock().asked = true;
    let sent = ctl
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(VmEvent::ApiStop);
    if sent.is_err() {
        return Response::error(409, "the machine is already stopping");
    }
    match stop.wait() {
        Some(Ok(epoch)) => Response::json(200, &json!({ "stopped": true, "final_epoch": epoch })),
        Some(Err(e)) => Response::error(500, e),
        None => Response::error(503, "the final epoch did not finish in time"),
    }
}

#[cfg(test)]
mod tests;
