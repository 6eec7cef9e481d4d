//! Test infrastructure shared by the integration tests in `tests/tests/`.
//!
//! - [`host`]: where the repository, the cache, the `evm` binary and the
//!   guest images are, and what kind of `/dev/kvm` this machine has.
//!   [`host::require_kvm`] makes a test fail (never skip) without KVM.
//! - [`guest`]: a real Linux guest booted through `scripts/run` (directly
//!   on a VT-x/AMD-V host, inside the QEMU TCG test host on a PVM host),
//!   driven over its serial console: wait for lines, run shell commands and
//!   read back their output and status, wait for evm's exit. Killed with its
//!   process group if the test panics.
//! - [`evm`]: one `target/release/evm` run with a timeout, optionally as an
//!   unprivileged user; temporary directories.
//! - [`store_file`]: an evm store file read and damaged from outside (its
//!   superblocks, config and log records, per `checkpoint/README.md`).
//! - [`lock`]: real-guest tests take a file lock so that only one runs at a
//!   time, whatever the test runner does.

pub mod evm;
pub mod evm_process;
pub mod guest;
pub mod host;
pub mod lock;
pub mod power;
pub mod probe_run;
pub mod refusal;
pub mod store_file;
pub mod store_run;

pub use evm::{EvmRun, NOBODY, RunOptions, TempDir, evm_ok, is_root, run_evm};
pub use guest::{Guest, HarnessError, Ready};
pub use host::{KvmKind, evm_bin, guest_image, kvm_kind, require_kvm};
