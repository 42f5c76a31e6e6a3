/* A real guest through /dev/kvm, the way a VMM starts one: check the API version, create a VM and
 * a vCPU, give it one page of memory holding real-mode code that writes a byte to an I/O port and
 * halts, run it, and report both exits. The byte is chosen at run time and patched into the code,
 * so a right answer can only come from the guest having run. Run in a pod by the e2e suite. */
#include "report.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_ADDR 0x1000
#define PORT 0x10

static const char *exit_name(uint32_t reason) {
    switch (reason) {
    case KVM_EXIT_IO: return "io";
    case KVM_EXIT_HLT: return "hlt";
    case KVM_EXIT_MMIO: return "mmio";
    case KVM_EXIT_SHUTDOWN: return "shutdown";
    case KVM_EXIT_FAIL_ENTRY: return "fail_entry";
    case KVM_EXIT_INTERNAL_ERROR: return "internal_error";
    default: return "other";
    }
}

int main(int argc, char **argv) {
    program = "kvm-guest";
    maybe_mknod(argc, argv);
    device_cgroup_fact("/dev/kvm");
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        fail("open", errno);
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (api < 0)
        fail("KVM_GET_API_VERSION", errno);
    fact("api=%d", api);
    if (api != KVM_API_VERSION)
        fail("api-version", 0);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);
    if (vm < 0)
        fail("KVM_CREATE_VM", errno);

    /* mov al, BYTE; out PORT, al; hlt */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint8_t want = (uint8_t)(1 + (now.tv_nsec ^ getpid()) % 255);
    const uint8_t code[] = {0xb0, want, 0xe6, PORT, 0xf4};
    uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        fail("mmap-guest-memory", errno);
    memcpy(mem, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = GUEST_ADDR, .memory_size = 0x1000,
        .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        fail("KVM_SET_USER_MEMORY_REGION", errno);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
    if (vcpu < 0)
        fail("KVM_CREATE_VCPU", errno);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        fail("KVM_GET_VCPU_MMAP_SIZE", run_size < 0 ? errno : 0);
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        fail("mmap-kvm_run", errno);

    /* Real mode, code segment at 0, starting at the page. */
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        fail("KVM_GET_SREGS", errno);
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        fail("KVM_SET_SREGS", errno);
    struct kvm_regs regs = {.rip = GUEST_ADDR, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        fail("KVM_SET_REGS", errno);

    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        fail("KVM_RUN", errno);
    fact("exit=%s", exit_name(run->exit_reason));
    if (run->exit_reason != KVM_EXIT_IO)
        fail("first-exit", 0);
    uint8_t got = *((uint8_t *)run + run->io.data_offset);
    fact("port=0x%x byte=0x%02x want=0x%02x", run->io.port, got, want);
    if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != PORT || run->io.size != 1 || got != want)
        fail("io-exit", 0);
    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        fail("KVM_RUN", errno);
    fact("then=%s", exit_name(run->exit_reason));
    if (run->exit_reason != KVM_EXIT_HLT)
        fail("second-exit", 0);
    succeed();
}
