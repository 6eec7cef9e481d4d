//! evm's store: one preallocated file (or block device) that *is* a VM.
//!
//! Issue 3 fills this crate in: superblocks, VM config, memory and disk home,
//! the log ring of epochs, commit, recovery and migration. It never depends
//! on KVM, so it is testable and fuzzable anywhere.
