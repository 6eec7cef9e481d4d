//! CPUID for each vCPU: what KVM supports, with a topology that matches the
//! vCPU count (one socket, one thread per core, APIC ID = vCPU index).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Bits needed to hold `n - 1` (the APIC-ID field width for `n` CPUs).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjust `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn for_vcpu(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    let apic_id = index as u32;
    let count = count as u32;
    let shift = id_bits(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        patch(e, apic_id, count, shift, tsc_deadline);
    }
}

fn patch(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, shift: u32, tsc_deadline: bool) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: APIC ID [31:24], logical processors [23:16], CLFLUSH size.
            e.ebx = (apic_id << 24) | (count.max(1) << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            if tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing
            // this cache - 1 (a core's own caches are not shared).
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            // Subleaf 0: SMT level (1 thread per core); subleaf 1: core
            // level (all vCPUs); further subleaves: invalid.
            let (eax, ebx, ecx) = match e.index {
                0 => (0, 1, 1 << 8),
                1 => (shift, count, (2 << 8) | 1),
                n => (0, 0, n & 0xff),
            };
            e.eax = eax;
            e.ebx = ebx;
            e.ecx = ecx;
            e.edx = apic_id;
        }
        LEAF_AMD_FEATURES => {
            if count > 1 {
                e.ecx |= AMD_ECX_CMP_LEGACY;
            } else {
                e.ecx &= !AMD_ECX_CMP_LEGACY;
            }
        }
        LEAF_AMD_SIZE => {
            // ECX[15:12]: APIC ID size; [7:0]: cores per package - 1.
            e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1);
        }
        LEAF_AMD_EXT_APIC => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff; // compute unit = core, one thread each
            e.ecx = 0; // node 0, one node per package
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_vcpu_count() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
        let mut c = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        for_vcpu(&mut c, 3, 4, true);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!((s[1].ebx, s[1].edx), (1, 3));
        assert_eq!((s[2].eax, s[2].ebx, s[2].edx), (2, 4, 3));
        assert_eq!(s[3].ecx & 0xff, 3);
    }
}
