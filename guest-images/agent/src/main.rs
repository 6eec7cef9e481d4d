//! evm-agent: the in-guest agent of evm's test guests.
//!
//! Started by the initramfs as PID 1 (`exec /sbin/evm-agent`), it prints the
//! ready line, runs the workload named on the kernel command line on
//! background threads, answers verification requests on a Unix socket, and
//! keeps a shell on the console. Run with a request as its first argument
//! (`evm-agent verify|status|pause|resume`, or called `evm-verify` /
//! `evm-status`) it is the client of that socket instead. See
//! `guest-images/agent/README.md`.

mod cmdline;
mod console;
mod hash;
mod init;
mod proto;
mod sys;
mod workload;

use console::error_chain;
use proto::{Agent, Request};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: evm-agent                  run the agent (as PID 1 in the guest)
       evm-agent verify|status|pause|resume   ask the running agent
env: EVM_AGENT_SOCK (socket, default /run/evm-agent.sock),
     EVM_AGENT_CMDLINE (use instead of /proc/cmdline)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let by_name = match name.as_str() {
        "evm-verify" => Some(Request::Verify),
        "evm-status" => Some(Request::Status),
        _ => None,
    };
    match (by_name, args.get(1).map(String::as_str)) {
        (Some(r), None) => proto::client(r),
        (None, None) => run_agent(),
        (None, Some("-h" | "--help" | "help")) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            ExitCode::SUCCESS
        }
        (None, Some(arg)) => match Request::parse(arg) {
            Some(r) if args.len() == 2 => proto::client(r),
            Some(_) => {
                eprintln!("evm-agent: unexpected argument '{}' after '{arg}'", args[2]);
                ExitCode::from(2)
            }
            None => {
                eprintln!(
                    "evm-agent: unknown command '{arg}' (want verify, status, pause or resume)"
                );
                ExitCode::from(2)
            }
        },
        (Some(_), Some(arg)) => {
            eprintln!("evm-agent: {name} takes no arguments, got '{arg}'");
            ExitCode::from(2)
        }
    }
}

/// The agent proper. As PID 1 it never returns; as a normal process it
/// returns only if it cannot serve requests.
fn run_agent() -> ExitCode {
    let pid1 = sys::pid() == 1;
    console::init(pid1);
    std::panic::set_hook(Box::new(move |info| {
        say!("PANIC {}", info.to_string().replace('\n', " "));
        if pid1 {
            init::stop_machine(libc::RB_POWER_OFF);
        }
    }));
    if pid1 {
        // Before any thread starts, so all inherit the mask.
        init::block_stop_signals();
    }
    let cfg = cmdline::Config::load();
    for e in &cfg.errors {
        say!("ERROR {e}");
    }
    let boot_id = sys::boot_id().unwrap_or_else(|e| {
        say!("ERROR cannot read the boot id: {e}");
        sys::NIL_UUID.to_string()
    });
    let id_bytes = sys::parse_uuid(&boot_id).unwrap_or_default();
    let agent = Arc::new(Agent {
        workloads: workload::Workloads::start(&cfg, id_bytes),
        boot_id,
        workload: cfg.workload_name,
    });
    if let Err(e) = proto::serve(&proto::socket_path(), Arc::clone(&agent)) {
        say!("ERROR {}", error_chain(&e));
        if !pid1 {
            eprintln!("evm-agent: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    say!(
        "READY boot_id={} uptime={} nproc={} workload={}",
        agent.boot_id,
        sys::uptime(),
        sys::nproc(),
        agent.workload
    );
    if pid1 {
        if let Err(e) = init::wait_for_stop_signals() {
            say!("ERROR cannot start the signal thread: {e}");
        }
        init::supervise();
    }
    loop {
        std::thread::park();
    }
}
