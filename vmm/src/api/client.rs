//! The CLI's side of the control API: `evm status|checkpoint|pause|resume|stop
//! --api-sock PATH` (and `evm top`'s requests). One request per connection;
//! `httparse` reads the response head.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Errors talking to a running evm.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No file at the path.
    #[error("--api-sock {}: no such socket (is `evm run --api-sock` running?)", .0.display())]
    NoSocket(PathBuf),
    /// A socket file nobody serves.
    #[error("--api-sock {}: nobody is listening (the evm that made it has ended)", .0.display())]
    NotListening(PathBuf),
    /// Some other connect or I/O failure.
    #[error("--api-sock {}: {what}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Connecting, sending or receiving.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP or not JSON.
    #[error("--api-sock {}: not an evm API answer: {detail}", path.display())]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The API answered with an error.
    #[error("--api-sock {}: {message} (HTTP {status})", path.display())]
    Api {
        /// The socket.
        path: PathBuf,
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// Send one request and read the whole response.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let io = |what: &'static str| {
        move |e: std::io::Error| ClientError::Io {
            path: sock.into(),
            what,
            source: e,
        }
    };
    let mut s = UnixStream::connect(sock).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ClientError::NoSocket(sock.into()),
        std::io::ErrorKind::ConnectionRefused => ClientError::NotListening(sock.into()),
        _ => io("connecting")(e),
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("connecting"))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io("connecting"))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(io("sending the request"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(io("reading the response"))?;
    parse_reply(sock, &raw)
}

fn parse_reply(sock: &Path, raw: &[u8]) -> Result<Reply, ClientError> {
    let bad = |detail: String| ClientError::BadResponse {
        path: sock.into(),
        detail,
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if raw.is_empty() => {
            return Err(bad("the connection closed without an answer".into()));
        }
        Ok(httparse::Status::Partial) => return Err(bad("the answer was cut short".into())),
        Err(e) => return Err(bad(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let mut body = raw[head..].to_vec();
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    if let Some(n) = length {
        if body.len() < n {
            return Err(bad(format!("body of {} bytes, {n} announced", body.len())));
        }
        body.truncate(n);
    }
    Ok(Reply { status, body })
}

/// A request whose answer is JSON; an error status becomes `ClientError::Api`.
pub fn json(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let r = call(sock, method, path, body, timeout)?;
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| ClientError::BadResponse {
        path: sock.into(),
        detail: format!("HTTP {} with a body that is not JSON ({e})", r.status),
    })?;
    if !(200..300).contains(&r.status) {
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_string();
        return Err(ClientError::Api {
            path: sock.into(),
            status: r.status,
            message,
        });
    }
    Ok(v)
}

/// Status and reads: answered at once.
pub const QUICK: Duration = Duration::from_secs(30);
/// Checkpoint and stop: answered once an epoch is committed.
pub const SLOW: Duration = Duration::from_secs(600);

fn opt_u64(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_u64)
        .map_or_else(|| "-".to_string(), |n| n.to_string())
}

fn f64_of(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for k in path {
        cur = match cur.get(k) {
            Some(x) => x,
            None => return 0.0,
        };
    }
    cur.as_f64().unwrap_or(0.0)
}

/// `evm status`: the status as text (or the JSON document).
pub fn status_text(v: &Value) -> String {
    let mib = |b: f64| b / f64::from(1u32 << 20);
    let mut out = String::new();
    let state = v.get("state").and_then(Value::as_str).unwrap_or("?");
    out.push_str(&format!("state            {state}\n"));
    out.push_str(&format!(
        "vcpus            {}\nmemory           {:.0} MiB\nuptime           {:.1} s\n",
        opt_u64(v, "vcpus"),
        mib(f64_of(v, &["mem_bytes"])),
        f64_of(v, &["uptime_s"])
    ));
    match v.get("store").and_then(Value::as_str) {
        Some(store) => {
            out.push_str(&format!("store            {store}\n"));
            out.push_str(&format!(
                "interval         {} ms\nlast committed   {}\ncurrent epoch    {}\ncommitted (run)  {}\nfailures         {}{}\n",
                opt_u64(v, "interval_ms"),
                opt_u64(v, "last_committed_epoch"),
                opt_u64(v, "current_epoch"),
                opt_u64(v, "epochs_committed"),
                opt_u64(v, "checkpoint_failures"),
                if v.get("checkpoints_failing").and_then(Value::as_bool) == Some(true) {
                    " (failing now)"
                } else {
                    ""
                }
            ));
            out.push_str(&format!(
                "log              {:.1}% of {:.0} MiB (migrates at {:.0}%), home epoch {}, {} migrations\n",
                100.0 * f64_of(v, &["log", "log_fill"]),
                mib(f64_of(v, &["log", "log_bytes"])),
                100.0 * f64_of(v, &["log", "migrate_threshold"]),
                v.get("log")
                    .map(|l| opt_u64(l, "home_epoch"))
                    .unwrap_or_else(|| "-".into()),
                opt_u64(v, "migrations"),
            ));
            out.push_str(&format!(
                "last 60 s        {:.2} epochs/s, dirty {:.2} MiB/s, log {:.2} MiB/s, freeze p50 {} µs, max {} µs\n",
                f64_of(v, &["rates", "epochs_per_s"]),
                mib(f64_of(v, &["rates", "dirty_bytes_per_s"])),
                mib(f64_of(v, &["rates", "log_bytes_per_s"])),
                f64_of(v, &["rates", "freeze_us_p50"]),
                f64_of(v, &["rates", "freeze_us_max"]),
            ));
        }
        None => out.push_str("store            none (--no-store)\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_errors_name_the_socket() {
        let p = Path::new("/s");
        let r = parse_reply(p, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let e = parse_reply(p, b"").unwrap_err().to_string();
        assert!(e.starts_with("--api-sock /s: not an evm API answer"), "{e}");
        assert!(parse_reply(p, b"SSH-2.0\r\n\r\n").is_err());
        let e = call(
            Path::new("/nonexistent/evm.sock"),
            "GET",
            "/status",
            None,
            QUICK,
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::NoSocket(_)), "{e}");
    }

    #[test]
    fn status_text_reads_a_status() {
        let v = serde_json::json!({
            "state": "paused", "vcpus": 2, "mem_bytes": 536870912u64, "uptime_s": 3.5,
            "store": "/s", "interval_ms": 1000, "last_committed_epoch": 7, "current_epoch": 8,
            "epochs_committed": 3, "checkpoint_failures": 0, "checkpoints_failing": false,
            "log": {"log_fill": 0.25, "log_bytes": 1073741824u64, "migrate_threshold": 0.5, "home_epoch": 2},
            "migrations": 1, "rates": {"epochs_per_s": 1.0}
        });
        let t = status_text(&v);
        assert!(t.contains("state            paused\n"), "{t}");
        assert!(t.contains("last committed   7\n"), "{t}");
        assert!(t.contains("25.0% of 1024 MiB"), "{t}");
        let t = status_text(&serde_json::json!({"state": "running", "store": null}));
        assert!(t.contains("none (--no-store)"), "{t}");
    }
}
