/* Run a process as if its x86-64 CPU had no AVX-512 and no AVX-VNNI (an AVX2 + FMA CPU).
 *
 * Preloaded (LD_PRELOAD) into a benchmark's child process with QOS_CPUID_PROFILE=avx2, it
 * turns on CPUID faulting for the process (Linux arch_prctl(ARCH_SET_CPUID, 0); the CPU and
 * kernel must offer it: /proc/cpuinfo flag "cpuid_fault"), so every CPUID instruction traps
 * into the SIGSEGV handler below, which runs the real CPUID with faulting briefly off, clears
 * the feature bits of AVX-512 and AVX-VNNI and steps over the instruction. Libraries that
 * pick their kernels by CPUID at run time (onnxruntime's MLAS, NumPy) then pick their AVX2
 * code: the same silicon, the code path an AVX2-only CPU runs. It does not make the core an
 * AVX2-only core (caches, ports and clocks stay), so a benchmark labels such times.
 *
 * The setting is per thread and inherited by threads the process starts; execve resets it.
 * Dynamic-linker work done before this constructor (glibc's ifunc choices) saw the real CPU.
 * A library that later installs a SIGSEGV handler of its own would take the traps instead, so
 * the benchmark checks what its child sees (cpuid_mask.check).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static int set_cpuid(int enabled) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, (unsigned long)enabled); }

static void say(const char *msg) {
    ssize_t r = write(2, msg, strlen(msg));
    (void)r;
}

/* Leaf 7 sub-leaf 0: EBX AVX512F DQ IFMA PF ER CD BW VL; ECX VBMI VBMI2 VNNI BITALG
 * VPOPCNTDQ; EDX 4VNNIW 4FMAPS VP2INTERSECT FP16. Sub-leaf 1: EAX AVX-VNNI, AVX512_BF16. */
#define L7_EBX ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
#define L7_ECX ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
#define L7_EDX ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23))
#define L7S1_EAX ((1u << 4) | (1u << 5))

static void on_fault(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) {        /* a real fault: die of it as we would have */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)g[REG_RAX], sub = (unsigned)g[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        b &= ~L7_EBX;
        c &= ~L7_ECX;
        d &= ~L7_EDX;
    } else if (leaf == 7 && sub == 1) {
        a &= ~L7S1_EAX;
    }
    g[REG_RAX] = (greg_t)a;    /* a 32-bit register write zero-extends, as CPUID's does */
    g[REG_RBX] = (greg_t)b;
    g[REG_RCX] = (greg_t)c;
    g[REG_RDX] = (greg_t)d;
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void qos_cpuid_mask_init(void) {
    const char *profile = getenv("QOS_CPUID_PROFILE");
    if (profile == NULL || strcmp(profile, "avx2") != 0) {
        say("qos cpuid mask: QOS_CPUID_PROFILE must be avx2\n");
        _exit(3);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || set_cpuid(0) != 0) {
        say("qos cpuid mask: this CPU or kernel offers no CPUID faulting (arch_prctl ARCH_SET_CPUID)\n");
        _exit(3);
    }
}
