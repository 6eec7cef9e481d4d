//! virtio: the MMIO transport and the devices behind it.
