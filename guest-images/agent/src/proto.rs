//! The verification protocol: the agent listens on a Unix stream socket
//! (`/run/evm-agent.sock`, or `$EVM_AGENT_SOCK`); a client sends one request
//! line and reads one reply line:
//!
//! | request | reply |
//! | --- | --- |
//! | `verify` | `EVM-AGENT VERIFY OK boot_id=<uuid> uptime=<s> counter=<n> dirty_pages=<checked> disk_seq=<durable>/<issued>` or `EVM-AGENT VERIFY FAIL <what>[; <what>...]` |
//! | `status` | `EVM-AGENT STATUS boot_id=<uuid> uptime=<s> workload=<w> counter=<n> dirty_gen=<g> disk_seq=<durable>/<issued> paused=<yes/no>` |
//! | `pause`  | `EVM-AGENT PAUSED` (dirty and disk writers stopped; for tests) |
//! | `resume` | `EVM-AGENT RESUMED` |
//!
//! Values of workloads not running, and disk sequence numbers before the
//! first record, are `-`.
//!
//! The same binary is the client: `evm-agent verify|status|pause|resume`
//! prints the reply and exits 0 (1 for `VERIFY FAIL`, 2 when it cannot ask).

use crate::console::error_chain;
use crate::say;
use crate::sys;
use crate::workload::{Status, Verdict, Workloads};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/evm-agent.sock";
/// How long the agent waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the reply (a check of a big buffer on a
/// slow emulated machine can take a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// A client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Verify,
    Status,
    Pause,
    Resume,
}

impl Request {
    pub fn parse(s: &str) -> Option<Request> {
        Some(match s {
            "verify" => Request::Verify,
            "status" => Request::Status,
            "pause" => Request::Pause,
            "resume" => Request::Resume,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Request::Verify => "verify",
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
        }
    }
}

/// The socket path: `$EVM_AGENT_SOCK` or the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os("EVM_AGENT_SOCK").map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// Why the agent cannot serve.
#[derive(Debug)]
pub enum ServeError {
    AlreadyServed(PathBuf),
    Bind { path: PathBuf, source: io::Error },
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::AlreadyServed(p) => {
                write!(f, "another agent already answers on {}", p.display())
            }
            ServeError::Bind { path, .. } => write!(f, "cannot listen on {}", path.display()),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::Bind { source, .. } => Some(source),
            ServeError::AlreadyServed(_) => None,
        }
    }
}

fn disk_seq(d: Option<u64>, i: Option<u64>) -> String {
    let s = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    format!("{}/{}", s(d), s(i))
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The reply line (without newline) to `verify`.
pub fn verify_reply(v: &Verdict, boot_id: &str, uptime: &str) -> String {
    if v.failures.is_empty() {
        format!(
            "EVM-AGENT VERIFY OK boot_id={boot_id} uptime={uptime} counter={} dirty_pages={} disk_seq={}",
            opt(v.counter),
            v.dirty_pages,
            disk_seq(v.disk_durable, v.disk_issued)
        )
    } else {
        // One line, whatever the messages hold.
        let what = v.failures.join("; ").replace(['\n', '\r'], " ");
        format!("EVM-AGENT VERIFY FAIL {what}")
    }
}

/// The reply line (without newline) to `status`.
pub fn status_reply(s: &Status, boot_id: &str, uptime: &str, workload: &str) -> String {
    format!(
        "EVM-AGENT STATUS boot_id={boot_id} uptime={uptime} workload={workload} counter={} dirty_gen={} disk_seq={} paused={}",
        opt(s.counter),
        opt(s.dirty_gen),
        disk_seq(s.disk_durable, s.disk_issued),
        if s.paused { "yes" } else { "no" }
    )
}

/// What the server answers with.
#[derive(Debug)]
pub struct Agent {
    pub boot_id: String,
    pub workload: String,
    pub workloads: Workloads,
}

impl Agent {
    pub fn answer(&self, request: &str) -> String {
        let uptime = sys::uptime();
        match Request::parse(request) {
            Some(Request::Verify) => verify_reply(&self.workloads.verify(), &self.boot_id, &uptime),
            Some(Request::Status) => status_reply(
                &self.workloads.status(),
                &self.boot_id,
                &uptime,
                &self.workload,
            ),
            Some(Request::Pause) => {
                self.workloads.pause(true);
                "EVM-AGENT PAUSED".to_string()
            }
            Some(Request::Resume) => {
                self.workloads.pause(false);
                "EVM-AGENT RESUMED".to_string()
            }
            None => format!(
                "EVM-AGENT ERROR unknown request '{}'",
                request.escape_default()
            ),
        }
    }
}

/// Binds the socket and answers requests on a new thread, one at a time.
pub fn serve(path: &Path, agent: Arc<Agent>) -> Result<(), ServeError> {
    if UnixStream::connect(path).is_ok() {
        return Err(ServeError::AlreadyServed(path.to_path_buf()));
    }
    // A stale socket from an agent that is gone.
    let _ = std::fs::remove_file(path);
    let bind_err = |source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("verify-server".to_string())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = handle(stream, &agent) {
                            say!("ERROR verify request: {}", error_chain(&e));
                        }
                    }
                    // E.g. out of file descriptors: do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .map_err(bind_err)?;
    Ok(())
}

fn handle(stream: UnixStream, agent: &Agent) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream).take(256).read_line(&mut line)?;
    if line.is_empty() {
        // A probe that connected and left (see `serve`).
        return Ok(());
    }
    let reply = agent.answer(line.trim());
    (&stream).write_all(format!("{reply}\n").as_bytes())
}

/// Sends `request` to the agent at `path` and returns its reply line.
pub fn ask(path: &Path, request: Request) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.write_all(format!("{}\n", request.name()).as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.take(64 * 1024).read_to_string(&mut reply)?;
    let reply = reply.trim_end().to_string();
    if reply.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without a reply",
        ));
    }
    Ok(reply)
}

/// The CLI: asks, prints the reply on stdout, and maps it to an exit code.
pub fn client(request: Request) -> ExitCode {
    let path = socket_path();
    let reply = match ask(&path, request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "evm-agent: cannot ask the agent at {} to {}: {e}",
                path.display(),
                request.name()
            );
            return ExitCode::from(2);
        }
    };
    let _ = std::io::stdout()
        .lock()
        .write_all(format!("{reply}\n").as_bytes());
    if reply.starts_with("EVM-AGENT VERIFY FAIL") {
        ExitCode::from(1)
    } else if reply.starts_with("EVM-AGENT ERROR") {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_formatted() {
        let ok = Verdict {
            counter: None,
            dirty_pages: 1024,
            disk_durable: Some(5),
            disk_issued: Some(5),
            failures: vec![],
        };
        assert_eq!(
            verify_reply(&ok, "b", "1.50"),
            "EVM-AGENT VERIFY OK boot_id=b uptime=1.50 counter=- dirty_pages=1024 disk_seq=5/5"
        );
        let bad = Verdict {
            failures: vec!["one".into(), "two\nlines".into()],
            ..ok
        };
        assert_eq!(
            verify_reply(&bad, "b", "1"),
            "EVM-AGENT VERIFY FAIL one; two lines"
        );
        let s = Status {
            counter: Some(3),
            dirty_gen: None,
            disk_durable: None,
            disk_issued: None,
            paused: false,
        };
        assert_eq!(
            status_reply(&s, "b", "2.00", "counter"),
            "EVM-AGENT STATUS boot_id=b uptime=2.00 workload=counter counter=3 dirty_gen=- disk_seq=-/- paused=no"
        );
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Verify,
            Request::Status,
            Request::Pause,
            Request::Resume,
        ] {
            assert_eq!(Request::parse(r.name()), Some(r));
        }
        assert_eq!(Request::parse("VERIFY"), None);
    }

    #[test]
    fn server_answers_and_rejects_a_second_server() {
        let dir = std::env::temp_dir().join(format!("evm-agent-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("s.sock");
        let agent = Arc::new(Agent {
            boot_id: "id".into(),
            workload: "shell".into(),
            workloads: Workloads::default(),
        });
        serve(&path, Arc::clone(&agent)).expect("serve");
        let reply = ask(&path, Request::Verify).expect("reply");
        assert!(
            reply.starts_with("EVM-AGENT VERIFY OK boot_id=id "),
            "{reply}"
        );
        assert!(
            reply.ends_with(" counter=- dirty_pages=0 disk_seq=-/-"),
            "{reply}"
        );
        assert_eq!(
            ask(&path, Request::Pause).expect("reply"),
            "EVM-AGENT PAUSED"
        );
        assert!(
            ask(&path, Request::Status)
                .expect("reply")
                .ends_with("paused=yes")
        );
        assert_eq!(
            ask(&path, Request::Resume).expect("reply"),
            "EVM-AGENT RESUMED"
        );
        let mut raw = UnixStream::connect(&path).expect("connect");
        raw.write_all(b"bogus\n").expect("send");
        let mut r = String::new();
        raw.read_to_string(&mut r).expect("read");
        assert_eq!(r, "EVM-AGENT ERROR unknown request 'bogus'\n");
        assert!(matches!(
            serve(&path, agent),
            Err(ServeError::AlreadyServed(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
