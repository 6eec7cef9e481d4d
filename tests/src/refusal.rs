//! The contract every refusal of bad input must keep: a non-zero exit (not
//! a signal: a panic aborts), nothing on stdout, exactly one `evm: ` line on
//! stderr that names the input, says what is wrong and does not repeat
//! itself.

use std::path::Path;
use std::time::Duration;

use crate::{EvmRun, RunOptions, evm_bin, run_evm};

/// Longest a refusal may take.
pub const REFUSE_WAIT: Duration = Duration::from_secs(60);

/// `a: a` (a message whose cause repeats it), if `msg` is one.
pub fn repeated(msg: &str) -> Option<&str> {
    msg.match_indices(": ")
        .map(|(i, _)| (&msg[..i], &msg[i + 2..]))
        .find(|(a, b)| a == b)
        .map(|(a, _)| a)
}

/// `evm <argv>` with the default log level; it must refuse: the line must
/// name every string in `names` and contain `problem` (any case).
pub fn refused(argv: &[&str], names: &[&str], problem: &str) -> EvmRun {
    let run = run_evm(&evm_bin(), argv, &RunOptions::default(), REFUSE_WAIT);
    let what = format!("evm {argv:?}");
    let code = run.status.code();
    assert!(
        code.is_some_and(|c| c != 0),
        "{what}: want a non-zero exit code, got {}",
        run.status
    );
    assert!(run.stdout.is_empty(), "{what}: stdout: {:?}", run.stdout);
    let err = &run.stderr;
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(
            !err.contains(bad),
            "{what}: stderr looks like a panic: {err:?}"
        );
    }
    assert!(
        err.ends_with('\n') && err.lines().count() == 1,
        "{what}: want exactly one line on stderr, got {err:?}"
    );
    let line = err.trim_end();
    assert!(
        line.starts_with("evm: "),
        "{what}: stderr does not start with 'evm: ': {err:?}"
    );
    if let Some(twice) = repeated(line.trim_start_matches("evm: ")) {
        panic!("{what}: the message says the same thing twice ({twice:?}): {err:?}");
    }
    for name in names {
        assert!(
            err.contains(name),
            "{what}: stderr does not name {name:?}: {err:?}"
        );
    }
    assert!(
        err.to_lowercase().contains(&problem.to_lowercase()),
        "{what}: stderr does not say {problem:?}: {err:?}"
    );
    run
}

/// The path as UTF-8 (test paths always are).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
