//! SIGTERM, SIGINT and SIGHUP end a run cleanly (with a final epoch when
//! there is a store): they are blocked in every thread and taken by one
//! thread with `sigwait`, which reports them as a `VmEvent`.

use std::sync::mpsc::Sender;

use crate::vcpu::VmEvent;

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data for which all-zero bytes are valid.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `set` was initialised by sigemptyset; `s` is a valid signal.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Block the stop signals in this thread and so in every thread it spawns
/// afterwards. Call first thing in `main`, before any thread exists.
pub fn block_stop_signals() -> std::io::Result<()> {
    let set = stop_set();
    // SAFETY: `set` is an initialised sigset; a null old-set pointer is
    // allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Forward the (blocked) stop signals to `events` from a thread of their own.
pub fn forward_stop_signals(events: Sender<VmEvent>) -> std::io::Result<()> {
    let set = stop_set();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out
                // pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    log::info!("signal {sig}: stopping");
                    if events.send(VmEvent::Signal(sig)).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}
