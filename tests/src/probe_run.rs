//! Runs of the probe guest under `evm run` with a store, for the store
//! tests: boot or resume, wait for committed epochs and a verify, stop with
//! SIGTERM (a final epoch).

use std::time::Duration;

use crate::evm_bin;
use crate::evm_process::{
    EpochLine, EvmProcess, Seen, final_epoch, probe_failure, resumed_epoch, verified_vcpu,
};

/// Longest wait for anything a running probe or evm should do.
pub const WAIT: Duration = Duration::from_secs(120);
/// Runs log their epochs and resumes.
pub const LOG: &[(&str, &str)] = &[("EVM_LOG", "info")];

/// SIGTERM: a final epoch and exit 0; returns its number.
pub fn stop(p: &mut EvmProcess) -> u64 {
    p.signal(libc::SIGTERM).expect("SIGTERM evm");
    let status = p.wait_exit(WAIT).expect("evm exits after SIGTERM");
    assert!(
        status.success(),
        "SIGTERM: evm exited with {status}\n{}",
        p.tail()
    );
    p.lines()
        .iter()
        .find_map(|l| final_epoch(&l.text))
        .unwrap_or_else(|| panic!("SIGTERM: no final epoch line\n{}", p.tail()))
}

/// Runs evm with `argv` until it has committed three epochs and the probe
/// has verified its pages (after `resumed`: said it resumed), then stops
/// it; returns the first epoch it committed and the final one.
pub fn three_epochs(argv: &[String], resumed: bool) -> (u64, u64) {
    let mut p = EvmProcess::spawn(&evm_bin(), argv, LOG).expect("start evm");
    let mut epochs = Vec::new();
    let mut verified = false;
    let mut said_resumed = !resumed;
    p.wait_for("3 committed epochs and a PROBE VERIFY OK", WAIT, |l| {
        if let Some(bad) = probe_failure(l, resumed) {
            return Seen::Bad(bad);
        }
        epochs.extend(EpochLine::parse(&l.text).map(|e| e.epoch));
        verified |= verified_vcpu(l).is_some();
        said_resumed |= resumed_epoch(&l.text).is_some();
        if epochs.len() >= 3 && verified && said_resumed {
            Seen::Yes
        } else {
            Seen::No
        }
    })
    .unwrap_or_else(|e| panic!("evm {argv:?}: {e}"));
    let last = stop(&mut p);
    (epochs[0], last)
}
