/*
 * kvmhold: runs in the test host (L1) for its whole life and holds one idle
 * KVM VM, with an in-kernel irqchip and one vCPU that never runs.
 *
 * Why: KVM flips kernel static keys when the first VM appears and the last
 * one goes (preempt notifiers) and when a vCPU's local APIC is created or
 * enabled (apic_sw_disabled), and each flip rewrites kernel code with
 * text_poke_bp (int3, then IPIs to every CPU). Under QEMU's multi-threaded
 * TCG that has twice been caught wedging L1 while evm started or stopped a
 * VM: one CPU looping through poke_int3_handler with interrupts off at a
 * site memory already holds as the new instruction, the other spinning on
 * a lock (see issue 3's notes). With this VM and its never-enabled APIC
 * alive, those keys stay on and evm's VMs coming and going patch nothing.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        perror("kvmhold: /dev/kvm");
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) {
        perror("kvmhold: KVM_CREATE_VM");
        return 1;
    }
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) {
        perror("kvmhold: KVM_CREATE_IRQCHIP");
        return 1;
    }
    if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0) {
        perror("kvmhold: KVM_CREATE_VCPU");
        return 1;
    }
    fprintf(stderr, "kvmhold: holding an idle VM\n");
    for (;;)
        pause();
}
