/*
 * Reports a crash through the Hyper-V crash MSRs, as Linux 6.1 panics
 * (Linux arch/x86/hyperv/hv_init.c, drivers/hv/hv_common.c).  Without options it does
 * what hyperv_report_panic() does: P0 = error code, P1 = GuestOsId, P2 = RIP,
 * P3 = RAX, P4 = RSP, then CRASH_CTL = CrashNotify.  With "msg" it uses the
 * kmsg-dump channel: P0 = P1 = P2 = 0, P3 = GPA of a text, P4 = its length,
 * CRASH_CTL = CrashNotify | CrashMessage.  The VMM normally ends the run at
 * the CRASH_CTL write; when it lets the guest go on, the guest says so and
 * exits normally.
 */
#include "hyperv.h"

#define CRASH_P0 0x0000000000000009ull     /* the "error code" */
#define CRASH_P2 0xffffffff81abcdefull     /* a kernel RIP */
#define CRASH_P3 0x1234567890abcdefull
#define CRASH_P4 0xffffc90000123f58ull     /* a kernel RSP */

static char message[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE))) =
    "Kernel panic - not syncing: sysrq triggered crash\n"
    "CPU: 0 PID: 1 Comm: hv_crash\n"
    "---[ end Kernel panic - not syncing: sysrq triggered crash ]---\n";

int main(void)
{
    struct hv_features hv = hv_read_features();
    report(hv.features & HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE, "crash MSRs advertised");
    uint64_t ctl = 0;
    int vec = rdmsr_safe(HV_X64_MSR_CRASH_CTL, &ctl);
    report(vec == 0 && ctl == (HV_CRASH_CTL_CRASH_NOTIFY | HV_CRASH_CTL_CRASH_NOTIFY_MSG),
           "CRASH_CTL reads the supported bits %#llx", (unsigned long long)ctl);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_LINUX_6_1_192_GUEST_ID);

    bool with_message = cmdline_has("msg");
    uint64_t p[5];
    if (with_message) {
        p[0] = p[1] = p[2] = 0;
        p[3] = (uintptr_t)message;
        p[4] = strlen(message);
    } else {
        p[0] = CRASH_P0;
        p[1] = rdmsr(HV_X64_MSR_GUEST_OS_ID);
        p[2] = CRASH_P2;
        p[3] = CRASH_P3;
        p[4] = CRASH_P4;
    }
    bool stored = true;
    for (int i = 0; i < 5; i++) {
        wrmsr(HV_X64_MSR_CRASH_P0 + i, p[i]);
        stored &= rdmsr(HV_X64_MSR_CRASH_P0 + i) == p[i];
    }
    report(stored, "CRASH_P0..P4 read back what was written");
    /* A CRASH_CTL write without CrashNotify reports nothing (TLFS). */
    report(wrmsr_safe(HV_X64_MSR_CRASH_CTL, 0) == 0, "CRASH_CTL = 0 accepted, no report");
    report_info("reporting the crash%s", with_message ? " with a message" : "");

    uint64_t value = HV_CRASH_CTL_CRASH_NOTIFY | (with_message ? HV_CRASH_CTL_CRASH_NOTIFY_MSG : 0);
    wrmsr(HV_X64_MSR_CRASH_CTL, value);

    report_info("still running after the crash report");
    report_summary();
}
