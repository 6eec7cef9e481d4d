//! virtio-rng (entropy device, type 4): fills the driver's buffers with
//! bytes from the host kernel's CSPRNG (getrandom(2), the source behind
//! /dev/urandom).

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::{
    ActivateError, COMMON_FEATURES, GuestWarnings, QueueError, StateError, VirtioDevice,
    VirtioDeviceState, VirtioInterrupt, serve_queue, transfer_all,
};
use crate::GuestMem;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes written for one request; the rest of a larger buffer is left
/// alone (the used length says how much was filled).
pub const MAX_BYTES_PER_REQUEST: u64 = 64 << 10;

/// Descriptors of one chain looked at; the rest are left alone.
const MAX_DESCRIPTORS: usize = 1024;

/// Saved state of a virtio-rng device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// Features the driver acknowledged.
    pub acked_features: u64,
}

#[derive(Debug)]
struct Active {
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    acked_features: u64,
    active: Option<Active>,
    warnings: GuestWarnings,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self {
            acked_features: 0,
            active: None,
            warnings: GuestWarnings::default(),
        }
    }

    /// Save the device's state.
    pub fn state(&self) -> RngState {
        RngState {
            acked_features: self.acked_features,
        }
    }

    /// Restore saved state into a fresh device.
    pub fn restore(&mut self, state: &RngState) -> Result<(), StateError> {
        if state.acked_features & !COMMON_FEATURES != 0 {
            return Err(StateError::Invalid {
                device: "rng",
                reason: format!(
                    "acked features {:#x} include unoffered {:#x}",
                    state.acked_features,
                    state.acked_features & !COMMON_FEATURES
                ),
            });
        }
        self.acked_features = state.acked_features;
        Ok(())
    }
}

/// Serve one chain: fill its device-writable buffers, up to the cap.
fn fill(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &GuestMem,
    warnings: &mut GuestWarnings,
) -> u32 {
    let mut written = 0u64;
    // Bound the walk: an indirect table may hold 65535 descriptors.
    for desc in chain.take(MAX_DESCRIPTORS).filter(|d| d.is_write_only()) {
        let room = MAX_BYTES_PER_REQUEST - written;
        if room == 0 {
            break;
        }
        // At most 64 KiB: fits usize.
        let len = u64::from(desc.len()).min(room) as usize;
        if let Err(e) = mem.read_exact_volatile_from(desc.addr(), &mut GetRandom, len) {
            warnings.warn(
                "rng",
                format_args!("cannot fill buffer {:#x}+{len:#x}: {e}", desc.addr().0),
            );
            break;
        }
        written += len as u64;
    }
    // At most MAX_BYTES_PER_REQUEST.
    written as u32
}

/// The kernel's CSPRNG as a `ReadVolatile` source.
struct GetRandom;

impl ReadVolatile for GetRandom {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let len = buf.len();
        let result = transfer_all(len, |done| {
            // SAFETY: the VolatileSlice guarantees `len` writable bytes at
            // its pointer, kept mapped by `guard`; `done < len`, so the
            // `len - done` bytes at `ptr + done` are inside it.
            unsafe { libc::getrandom(guard.as_ptr().wrapping_add(done).cast(), len - done, 0) }
        });
        // Part of the buffer may have been written even on error.
        buf.bitmap().mark_dirty(0, len);
        result.map_err(VolatileMemoryError::IOError)
    }
}

impl VirtioDevice for Rng {
    fn name(&self) -> &'static str {
        "rng"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn avail_features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & COMMON_FEATURES;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No config space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.warnings.warn(
            "rng",
            format_args!("{}-byte write to absent config at {offset:#x}", data.len()),
        );
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.active = Some(Active { mem, interrupt });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue) -> Result<bool, QueueError> {
        let Some(active) = &self.active else {
            return Ok(false);
        };
        let warnings = &mut self.warnings;
        serve_queue(index, queue, &active.mem, &active.interrupt, |chain| {
            fill(chain, &active.mem, warnings)
        })
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::Rng(s) => self.restore(s),
            other => Err(StateError::WrongDevice {
                saved: other.kind(),
                device: "rng",
            }),
        }
    }
}

#[cfg(test)]
mod tests;
