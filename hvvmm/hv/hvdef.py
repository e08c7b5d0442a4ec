"""TLFS definitions: CPUID leaves and bits, synthetic MSRs, hypercall codes, HV_STATUS, GuestOsId.

Definitions only -- no state, no behaviour beyond decoding and naming. This is the Python
counterpart of OpenVMM's ``vm/hv1/hvdef`` crate and Linux's ``include/hyperv/hvgdk_mini.h``.

Spelling rules:

* Plain constants are spelled exactly as in Linux ``hvgdk_mini.h`` / KVM ``hyperv.h``
  (``HV_X64_MSR_GUEST_OS_ID``, ``HYPERV_CPUID_FEATURES``, ``HV_HYPERCALL_FAST_BIT``).
* :class:`HvPartitionPrivilege` uses the field names of the TLFS ``HV_PARTITION_PRIVILEGE_MASK``
  (``AccessHypercallMsrs``), because the TLFS defines those identifiers.
* The other bit classes use the Linux macro name where Linux defines the bit; bits Linux does not
  name get a name in the same style built from the TLFS wording, marked "(no Linux name)".
* Hypercall codes use the TLFS names (``HvCallPostMessage``), as OpenVMM's ``HypercallCode``.

Guest-supplied numbers (hypercall codes, status values, MSR indices) are *open*: the helpers
:func:`hypercall_name`, :func:`status_name` and :func:`msr_name` never raise for unknown values
(``HypercallCode(guest_value)`` would).

Sources: TLFS ``feature-discovery.md``, ``hypercall-interface.md``,
``datatypes/hv_partition_privilege_mask.md``; Linux v6.16 ``include/hyperv/hvgdk_mini.h`` and
``hvgdk_ext.h``; KVM ``arch/x86/kvm/hyperv.h``; OpenVMM ``vm/hv1/hvdef/src/lib.rs``.
Abbreviations in the comments below: LHDR = Linux v6.16 ``include/hyperv/hvgdk_mini.h`` ("L123"
is a line of it in v6.16.1); OVDEF = OpenVMM ``vm/hv1/hvdef/src/lib.rs``; REQ = Microsoft's
"Requirements for Implementing the Microsoft Hypervisor Interface" (June 2012).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------

HV_PAGE_SHIFT = 12
HV_PAGE_SIZE = 1 << HV_PAGE_SHIFT  # hypercall input/output lists may not cross one of these
HV_PAGE_MASK = ~(HV_PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
HV_HYP_PAGE_SHIFT = HV_PAGE_SHIFT  # Linux spelling
HV_HYP_PAGE_SIZE = HV_PAGE_SIZE  # Linux spelling
# TLFS "Alignment Requirements": input/output GPAs must be 8-byte aligned.
HV_HYPERCALL_PARAM_ALIGN = 8

# --------------------------------------------------------------------------------------------
# CPUID leaves (TLFS feature-discovery.md; LHDR HV_CPUID_FUNCTION)
# --------------------------------------------------------------------------------------------

HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS = 0x40000000  # EAX max leaf; EBX:ECX:EDX "Microsoft Hv"
HYPERV_CPUID_INTERFACE = 0x40000001  # EAX "Hv#1"
HYPERV_CPUID_VERSION = 0x40000002  # build, major.minor, service pack, branch/number
HYPERV_CPUID_FEATURES = 0x40000003  # EAX:EBX privilege mask, ECX power features, EDX features
HYPERV_CPUID_ENLIGHTMENT_INFO = 0x40000004  # implementation recommendations (Linux spelling)
HYPERV_CPUID_IMPLEMENT_LIMITS = 0x40000005  # max VPs, max LPs, max interrupt vectors
HYPERV_CPUID_HARDWARE_FEATURES = 0x40000006  # hardware features in use (no Linux name)
HYPERV_CPUID_CPU_MANAGEMENT_FEATURES = 0x40000007  # root partition only
HYPERV_CPUID_SVM_FEATURES = 0x40000008  # PASID / "SVM" features (no Linux name)
HYPERV_CPUID_NESTED_HYPERVISOR_FEATURES = 0x40000009  # L0 features for an L1 (no Linux name)
HYPERV_CPUID_NESTED_FEATURES = 0x4000000A  # enlightened VMCS and nested features
HYPERV_CPUID_ISOLATION_CONFIG = 0x4000000C  # isolation (CVM) configuration
HYPERV_CPUID_SYNDBG_VENDOR_AND_MAX_FUNCTIONS = 0x40000080  # KVM hyperv.h; "Microsoft VS"
HYPERV_CPUID_SYNDBG_INTERFACE = 0x40000081  # KVM hyperv.h; EAX "VS#1"
HYPERV_CPUID_SYNDBG_PLATFORM_CAPABILITIES = 0x40000082  # KVM hyperv.h
HYPERV_CPUID_VIRT_STACK_INTERFACE = HYPERV_CPUID_SYNDBG_INTERFACE  # LHDR spelling of 0x40000081
HYPERV_CPUID_VIRT_STACK_PROPERTIES = HYPERV_CPUID_SYNDBG_PLATFORM_CAPABILITIES  # LHDR spelling

HYPERV_CPUID_MIN = 0x40000005  # a Microsoft-compatible hypervisor reports at least this max leaf
HYPERV_CPUID_MAX = 0x4000FFFF  # Linux ignores a larger max leaf
HYPERV_HYPERVISOR_PRESENT_BIT = 0x80000000  # CPUID.1:ECX[31]

HYPERV_CPUID_SIGNATURE_EAX = 0x31237648  # "Hv#1" (KVM hyperv.h spelling)
HYPERV_VS_INTERFACE_EAX_SIGNATURE = 0x31235356  # "VS#1"
HV_CPUID_VENDOR_MICROSOFT = b"Microsoft Hv"  # EBX, ECX, EDX of 0x40000000
HV_CPUID_VENDOR_EBX = 0x7263694D  # "Micr"
HV_CPUID_VENDOR_ECX = 0x666F736F  # "osof"
HV_CPUID_VENDOR_EDX = 0x76482074  # "t Hv"
HYPERV_VS_PROPERTIES_EAX_EXTENDED_IOAPIC_RTE = 1 << 2  # 0x40000082 EAX: 15-bit MSI dest id

# 0x40000004 ECX 6:0 and 0x40000006 EAX 13:10 are multi-bit fields, kept out of the flag classes.
HV_IMPLEMENTED_PHYSICAL_ADDRESS_BITS_MASK = 0x7F  # 0x40000004 ECX: MAXPHYADDR, 0 = not reported
HV_HARDWARE_NESTING_LEVEL_SHIFT = 10  # 0x40000006 EAX 13:10: hypervisor nesting level
HV_HARDWARE_NESTING_LEVEL_MASK = 0xF << HV_HARDWARE_NESTING_LEVEL_SHIFT
HV_SPINLOCK_NEVER_NOTIFY = 0xFFFFFFFF  # 0x40000004 EBX: never call HvCallNotifyLongSpinWait
HV_NO_VP_LIMIT = 0xFFFFFFFF  # 0x40000005 EAX: no VP limit (REQ)


class HvPartitionPrivilege(enum.IntFlag):
    """TLFS ``HV_PARTITION_PRIVILEGE_MASK``: CPUID 0x40000003 EAX = bits 31:0, EBX = bits 63:32.

    Names are the TLFS field names; italic (OpenVMM-only) bits are marked "(OVDEF)". The comment
    names the Linux macro (relative to EAX or EBX) and what the bit gates.
    """

    # --- EAX: access to virtual MSRs ---
    AccessVpRunTimeReg = 1 << 0  # HV_MSR_VP_RUNTIME_AVAILABLE: HV_X64_MSR_VP_RUNTIME
    AccessPartitionReferenceCounter = 1 << 1  # HV_MSR_TIME_REF_COUNT_AVAILABLE: TIME_REF_COUNT
    AccessSynicRegs = 1 << 2  # HV_MSR_SYNIC_AVAILABLE: SCONTROL..EOM, SIRBP, SINT0-15
    AccessSyntheticTimerRegs = 1 << 3  # HV_MSR_SYNTIMER_AVAILABLE: STIMER0-3 CONFIG/COUNT
    AccessIntrCtrlRegs = 1 << 4  # HV_MSR_APIC_ACCESS_AVAILABLE: EOI, ICR, TPR, VP_ASSIST_PAGE
    AccessHypercallMsrs = 1 << 5  # HV_MSR_HYPERCALL_AVAILABLE: GUEST_OS_ID, HYPERCALL
    AccessVpIndex = 1 << 6  # HV_MSR_VP_INDEX_AVAILABLE: VP_INDEX
    AccessResetReg = 1 << 7  # HV_MSR_RESET_AVAILABLE: RESET
    AccessStatsReg = 1 << 8  # HV_MSR_STAT_PAGES_AVAILABLE: statistics pages
    AccessPartitionReferenceTsc = 1 << 9  # HV_MSR_REFERENCE_TSC_AVAILABLE: REFERENCE_TSC
    AccessGuestIdleReg = 1 << 10  # HV_MSR_GUEST_IDLE_AVAILABLE: GUEST_IDLE
    AccessFrequencyRegs = 1 << 11  # HV_ACCESS_FREQUENCY_MSRS: TSC_FREQUENCY, APIC_FREQUENCY
    AccessDebugRegs = 1 << 12  # (TLFS; no Linux name) synthetic debugger MSRs
    # The TLFS 0x40000009 table puts reenlightenment at bit 12; Linux and KVM use 13 (LHDR).
    AccessReenlightenmentControls = 1 << 13  # HV_ACCESS_REENLIGHTENMENT: 0x40000106-0x40000108
    AccessRootSchedulerReg = 1 << 14  # (OVDEF) root scheduler register
    AccessTscInvariantControls = 1 << 15  # HV_ACCESS_TSC_INVARIANT (OVDEF): TSC_INVARIANT_CONTROL
    # --- EBX: access to hypercalls ---
    CreatePartitions = 1 << 32  # HV_CREATE_PARTITIONS; must be 0 for a third-party hypervisor (REQ)
    AccessPartitionId = 1 << 33  # HV_ACCESS_PARTITION_ID: HvCallGetPartitionId; must be 0 (REQ)
    AccessMemoryPool = 1 << 34  # HV_ACCESS_MEMORY_POOL: Deposit/WithdrawMemory; must be 0 (REQ)
    AdjustMessageBuffers = 1 << 35  # HV_ADJUST_MESSAGE_BUFFERS (TLFS: reserved); must be 0 (REQ)
    PostMessages = 1 << 36  # HV_POST_MESSAGES: HvCallPostMessage
    SignalEvents = 1 << 37  # HV_SIGNAL_EVENTS: HvCallSignalEvent
    CreatePort = 1 << 38  # HV_CREATE_PORT: HvCallCreatePort; must be 0 (REQ)
    ConnectPort = 1 << 39  # HV_CONNECT_PORT: HvCallConnectPort
    AccessStats = 1 << 40  # HV_ACCESS_STATS: Map/UnmapStatsPage; must be 0 (REQ)
    Debugging = 1 << 43  # HV_DEBUGGING: HvCallPostDebugData/RetrieveDebugData/ResetDebugSession
    CpuManagement = 1 << 44  # HV_CPU_MANAGEMENT: root partition only; must be 0 (REQ)
    ConfigureProfiler = 1 << 45  # (OVDEF) must be 0 (REQ)
    AccessVpExitTracing = 1 << 46  # (OVDEF)
    EnableExtendedGvaRangesForFlushVirtualAddressList = 1 << 47  # (OVDEF)
    AccessVSM = 1 << 48  # (TLFS; no Linux name) VSM / VTL hypercalls
    AccessVpRegisters = 1 << 49  # (TLFS; no Linux name) HvCallGet/SetVpRegisters
    FastHypercallOutput = 1 << 51  # (OVDEF) XMM fast hypercall output
    EnableExtendedHypercalls = 1 << 52  # HV_ENABLE_EXTENDED_HYPERCALLS: call codes 0x8001+
    StartVirtualProcessor = 1 << 53  # (TLFS; no Linux name) HvCallStartVirtualProcessor
    Isolation = 1 << 54  # HV_ISOLATION (OVDEF name): confidential-VM paths; never set by hvvmm

    @property
    def eax(self) -> int:
        """The CPUID 0x40000003 EAX value (mask bits 31:0)."""
        return int(self) & 0xFFFF_FFFF

    @property
    def ebx(self) -> int:
        """The CPUID 0x40000003 EBX value (mask bits 63:32)."""
        return (int(self) >> 32) & 0xFFFF_FFFF

    @classmethod
    def from_cpuid(cls, eax: int, ebx: int) -> "HvPartitionPrivilege":
        """The mask from CPUID 0x40000003 EAX and EBX (unnamed bits are kept)."""
        return cls(((ebx & 0xFFFF_FFFF) << 32) | (eax & 0xFFFF_FFFF))


class HvFeatures(enum.IntFlag):
    """CPUID 0x40000003 EDX: hypervisor features ("HV_X64_HYPERVISOR_FEATURES (EDX)" in Linux)."""

    HV_X64_MWAIT_AVAILABLE = 1 << 0  # deprecated: MWAIT available
    HV_X64_GUEST_DEBUGGING_AVAILABLE = 1 << 1  # guest debugging support available
    HV_X64_PERF_MONITOR_AVAILABLE = 1 << 2  # performance monitor support available
    HV_X64_CPU_DYNAMIC_PARTITIONING_AVAILABLE = 1 << 3  # CPU dynamic partitioning events (hot-add)
    HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE = 1 << 4  # hypercall input via XMM; without it -> #UD
    HV_X64_GUEST_IDLE_STATE_AVAILABLE = 1 << 5  # virtual guest idle state (GUEST_IDLE MSR)
    HV_X64_HYPERVISOR_SLEEP_STATE_AVAILABLE = 1 << 6  # hypervisor sleep state (no Linux name)
    HV_X64_NUMA_DISTANCE_QUERY_AVAILABLE = 1 << 7  # querying NUMA distances (no Linux name)
    HV_FEATURE_FREQUENCY_MSRS_AVAILABLE = 1 << 8  # timer frequency details (TSC/APIC_FREQUENCY)
    HV_X64_SYNTHETIC_MCE_INJECTION_AVAILABLE = 1 << 9  # synthetic machine checks (no Linux name)
    HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE = 1 << 10  # guest crash MSRs CRASH_P0-P4, CRASH_CTL
    HV_FEATURE_DEBUG_MSRS_AVAILABLE = 1 << 11  # synthetic debugger MSRs (SYNDBG_*)
    HV_X64_NPIEP_AVAILABLE = 1 << 12  # NPIEP (no Linux name)
    HV_X64_DISABLE_HYPERVISOR_AVAILABLE = 1 << 13  # TLFS DisableHypervisorAvailable (no Linux name)
    # TLFS ExtendedGvaRangesForFlushVirtualAddressListAvailable:
    HV_FEATURE_EXT_GVA_RANGES_FLUSH = 1 << 14  # flush flag bit 3
    HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE = 1 << 15  # hypercall output via XMM; without it -> #UD
    # bit 16: TLFS reserved (OVDEF svm_features_available)
    HV_X64_SINT_POLLING_MODE_AVAILABLE = 1 << 17  # TLFS SintPollingModeAvailable (no Linux name)
    HV_X64_HYPERCALL_MSR_LOCK_AVAILABLE = 1 << 18  # TLFS HypercallMsrLockAvailable (no Linux name)
    HV_STIMER_DIRECT_MODE_AVAILABLE = 1 << 19  # direct synthetic timers (STIMERn_CONFIG bit 12)
    HV_X64_VSM_PAT_AVAILABLE = 1 << 20  # PAT register available for VSM (no Linux name)
    HV_X64_VSM_BNDCFGS_AVAILABLE = 1 << 21  # BNDCFGS register available for VSM (no Linux name)
    # bit 22: TLFS reserved (OVDEF watchdog timer)
    HV_X64_SYNTHETIC_TIME_UNHALTED_TIMER_AVAILABLE = 1 << 23  # MSRs 0x40000114/115 (no Linux name)
    # bits 25:24: TLFS reserved (OVDEF device domains)
    HV_X64_LBR_AVAILABLE = 1 << 26  # Intel last branch record (no Linux name)
    # bits 31:27: TLFS reserved


class HvEnlightenmentInformation(enum.IntFlag):
    """CPUID 0x40000004 EAX: implementation recommendations ("HV_X64_ENLIGHTENMENT_INFORMATION")."""

    HV_X64_AS_SWITCH_RECOMMENDED = 1 << 0  # hypercall for address-space switch instead of MOV CR3
    HV_X64_LOCAL_TLB_FLUSH_RECOMMENDED = 1 << 1  # hypercall for local flush, not INVLPG/MOV CR3
    HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED = 1 << 2  # hypercall for remote TLB flush instead of IPIs
    HV_X64_APIC_ACCESS_RECOMMENDED = 1 << 3  # MSRs for EOI/ICR/TPR, not the memory-mapped APIC
    HV_X64_SYSTEM_RESET_RECOMMENDED = 1 << 4  # RESET MSR to reset the system
    HV_X64_RELAXED_TIMING_RECOMMENDED = 1 << 5  # relaxed timing: disable watchdog timeouts
    HV_X64_DMA_REMAPPING_RECOMMENDED = 1 << 6  # DMA remapping, deprecated (no Linux name)
    HV_X64_INTERRUPT_REMAPPING_RECOMMENDED = 1 << 7  # interrupt remapping, deprecated (no Linux)
    HV_X64_X2APIC_MSRS_RECOMMENDED = 1 << 8  # x2APIC MSRs (current TLFS: reserved) (no Linux name)
    HV_DEPRECATING_AEOI_RECOMMENDED = 1 << 9  # deprecate AutoEOI
    HV_X64_CLUSTER_IPI_RECOMMENDED = 1 << 10  # HvCallSendSyntheticClusterIpi
    HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED = 1 << 11  # the Ex (HV_VP_SET) processor-mask interface
    HV_X64_HYPERV_NESTED = 1 << 12  # the hypervisor is nested within a Hyper-V partition
    HV_X64_INT_FOR_MBEC_SYSCALLS_RECOMMENDED = 1 << 13  # INT for MBEC system calls (no Linux name)
    HV_X64_ENLIGHTENED_VMCS_RECOMMENDED = 1 << 14  # enlightened VMCS (see 0x4000000A)
    HV_X64_USE_SYNCED_TIMELINE = 1 << 15  # TLFS UseSyncedTimeline (no Linux name)
    # bit 16: TLFS reserved (OVDEF core scheduler requested)
    # TLFS UseDirectLocalFlushEntire (no Linux name):
    HV_X64_USE_DIRECT_LOCAL_FLUSH_ENTIRE = 1 << 17  # toggle CR4.PGE, not a hypercall
    HV_X64_NO_NONARCH_CORESHARING = 1 << 18  # TLFS NoNonArchitecturalCoreSharing
    # bits 20:19: OVDEF use x2APIC / restore time on resume
    HV_X64_USE_MMIO_HYPERCALLS = 1 << 21  # hypercalls for MMIO access (CVM)
    # bits 31:22: reserved


class HvHardwareFeatures(enum.IntFlag):
    """CPUID 0x40000006 EAX: hardware features in use (no Linux names; TLFS + OVDEF wording).

    Bits 13:10 are the hypervisor nesting level, see :data:`HV_HARDWARE_NESTING_LEVEL_MASK`.
    """

    HV_X64_APIC_OVERLAY_ASSIST_IN_USE = 1 << 0  # APIC overlay assist detected and in use
    HV_X64_MSR_BITMAPS_IN_USE = 1 << 1  # MSR bitmaps detected and in use
    HV_X64_ARCH_PERF_COUNTERS_IN_USE = 1 << 2  # architectural performance counters in use
    HV_X64_SLAT_IN_USE = 1 << 3  # second level address translation in use
    HV_X64_DMA_REMAPPING_IN_USE = 1 << 4  # DMA remapping in use
    HV_X64_INTERRUPT_REMAPPING_IN_USE = 1 << 5  # interrupt remapping in use
    HV_X64_MEMORY_PATROL_SCRUBBER_PRESENT = 1 << 6  # memory patrol scrubber present
    HV_X64_DMA_PROTECTION_IN_USE = 1 << 7  # DMA protection in use
    HV_X64_HPET_REQUESTED = 1 << 8  # HPET is requested
    HV_X64_SYNTHETIC_TIMERS_VOLATILE = 1 << 9  # synthetic timers are volatile
    HV_X64_PHYSICAL_DESTINATION_MODE_REQUIRED = 1 << 14  # physical destination mode (OVDEF)
    HV_X64_VMFUNC_ALIAS_MAP_SWITCH_IN_USE = 1 << 15  # VMFUNC for alias map switch (OVDEF)
    HV_X64_HW_MEMORY_ZEROING_IN_USE = 1 << 16  # hardware memory zeroing (OVDEF)
    HV_X64_UNRESTRICTED_GUEST_IN_USE = 1 << 17  # unrestricted guest (OVDEF)
    HV_X64_RDT_A_IN_USE = 1 << 18  # resource director technology allocation (OVDEF)
    HV_X64_RDT_M_IN_USE = 1 << 19  # resource director technology monitoring (OVDEF)
    HV_X64_GUEST_VPMU_IN_USE = 1 << 20  # guest virtual PMU (OVDEF)
    HV_X64_GUEST_VLBR_IN_USE = 1 << 21  # guest virtual LBR (OVDEF)
    HV_X64_GUEST_VIPT_IN_USE = 1 << 22  # guest virtual IPT (OVDEF)
    HV_X64_APIC_EMULATION_IN_USE = 1 << 23  # APIC emulation (OVDEF)
    HV_X64_ACPI_WDAT_IN_USE = 1 << 24  # ACPI WDAT in use (OVDEF)
    # bits 31:25: reserved


# --------------------------------------------------------------------------------------------
# Synthetic MSRs (TLFS feature-discovery.md; LHDR L63-181; KVM hyperv.h for SYNDBG)
# --------------------------------------------------------------------------------------------

HV_X64_MSR_GUEST_OS_ID = 0x40000000  # P RW: §12 encoding; 0 disables the hypercall page
HV_X64_MSR_HYPERCALL = 0x40000001  # P RW: bit 0 enable, bit 1 locked, 63:12 GPFN
HV_X64_MSR_VP_INDEX = 0x40000002  # V RO: VP number
HV_X64_MSR_RESET = 0x40000003  # P RW: write 1 resets the system
HV_X64_MSR_VP_RUNTIME = 0x40000010  # V RO: VP run time, 100 ns
HV_X64_MSR_TIME_REF_COUNT = 0x40000020  # P RO: 100 ns since partition creation
HV_X64_MSR_REFERENCE_TSC = 0x40000021  # P RW: bit 0 enable, 63:12 GPFN of the TSC page
HV_X64_MSR_TSC_FREQUENCY = 0x40000022  # P RO: Hz
HV_X64_MSR_APIC_FREQUENCY = 0x40000023  # P RO: Hz
HV_X64_MSR_EOI = 0x40000070  # V WO: APIC EOI
HV_X64_MSR_ICR = 0x40000071  # V RW: APIC ICR (high dword = destination)
HV_X64_MSR_TPR = 0x40000072  # V RW: APIC TPR
HV_X64_MSR_VP_ASSIST_PAGE = 0x40000073  # V RW: bit 0 enable, 63:12 GPFN
HV_X64_MSR_SCONTROL = 0x40000080  # V RW: SynIC enable
HV_X64_MSR_SVERSION = 0x40000081  # V RO: HV_SYNIC_VERSION_1
HV_X64_MSR_SIEFP = 0x40000082  # V RW: event flags page
HV_X64_MSR_SIMP = 0x40000083  # V RW: message page
HV_X64_MSR_EOM = 0x40000084  # V WO: end of message
HV_X64_MSR_SIRBP = 0x40000085  # V RW: interrupt response buffer page
HV_X64_MSR_SINT0 = 0x40000090  # V RW: SINT0..SINT15 = 0x40000090..0x4000009F
HV_X64_MSR_SINT1 = 0x40000091
HV_X64_MSR_SINT2 = 0x40000092
HV_X64_MSR_SINT3 = 0x40000093
HV_X64_MSR_SINT4 = 0x40000094
HV_X64_MSR_SINT5 = 0x40000095
HV_X64_MSR_SINT6 = 0x40000096
HV_X64_MSR_SINT7 = 0x40000097
HV_X64_MSR_SINT8 = 0x40000098
HV_X64_MSR_SINT9 = 0x40000099
HV_X64_MSR_SINT10 = 0x4000009A
HV_X64_MSR_SINT11 = 0x4000009B
HV_X64_MSR_SINT12 = 0x4000009C
HV_X64_MSR_SINT13 = 0x4000009D
HV_X64_MSR_SINT14 = 0x4000009E
HV_X64_MSR_SINT15 = 0x4000009F
HV_X64_MSR_STIMER0_CONFIG = 0x400000B0  # V RW: STIMERn_CONFIG = 0x400000B0 + 2n
HV_X64_MSR_STIMER0_COUNT = 0x400000B1  # V RW: STIMERn_COUNT = 0x400000B1 + 2n
HV_X64_MSR_STIMER1_CONFIG = 0x400000B2
HV_X64_MSR_STIMER1_COUNT = 0x400000B3
HV_X64_MSR_STIMER2_CONFIG = 0x400000B4
HV_X64_MSR_STIMER2_COUNT = 0x400000B5
HV_X64_MSR_STIMER3_CONFIG = 0x400000B6
HV_X64_MSR_STIMER3_COUNT = 0x400000B7
HV_X64_MSR_GUEST_IDLE = 0x400000F0  # V RO: reading idles the VP
HV_X64_MSR_SYNDBG_CONTROL = 0x400000F1  # P RW: synthetic debugger (KVM hyperv.h)
HV_X64_MSR_SYNDBG_STATUS = 0x400000F2
HV_X64_MSR_SYNDBG_SEND_BUFFER = 0x400000F3
HV_X64_MSR_SYNDBG_RECV_BUFFER = 0x400000F4
HV_X64_MSR_SYNDBG_PENDING_BUFFER = 0x400000F5
HV_X64_MSR_SYNDBG_OPTIONS = 0x400000FF  # bit 2: use hypercalls 0x69-0x6B
HV_X64_MSR_CRASH_P0 = 0x40000100  # P RW: crash parameters P0..P4
HV_X64_MSR_CRASH_P1 = 0x40000101
HV_X64_MSR_CRASH_P2 = 0x40000102
HV_X64_MSR_CRASH_P3 = 0x40000103
HV_X64_MSR_CRASH_P4 = 0x40000104
HV_X64_MSR_CRASH_CTL = 0x40000105  # P RW: 63 notify, 62 message; reads return supported bits
HV_X64_MSR_REENLIGHTENMENT_CONTROL = 0x40000106  # P RW
HV_X64_MSR_TSC_EMULATION_CONTROL = 0x40000107  # P RW
HV_X64_MSR_TSC_EMULATION_STATUS = 0x40000108  # P RW
HV_X64_MSR_STIME_UNHALTED_TIMER_CONFIG = 0x40000114  # V RW (no Linux name)
HV_X64_MSR_STIME_UNHALTED_TIMER_COUNT = 0x40000115  # V RW (no Linux name)
HV_X64_MSR_TSC_INVARIANT_CONTROL = 0x40000118  # P RW: bit 0 expose invariant TSC
HV_X64_MSR_NESTED_SCONTROL = 0x40001080  # V RW: L1 hypervisor access to L0's SynIC
HV_X64_MSR_NESTED_SVERSION = 0x40001081
HV_X64_MSR_NESTED_SIEFP = 0x40001082
HV_X64_MSR_NESTED_SIMP = 0x40001083
HV_X64_MSR_NESTED_EOM = 0x40001084
HV_X64_MSR_NESTED_SINT0 = 0x40001090  # NESTED_SINT0..15 = 0x40001090..0x4000109F

HV_SYNIC_SINT_COUNT = 16
HV_SYNIC_STIMER_COUNT = 4
HV_X64_MSR_CRASH_PARAMS = HV_X64_MSR_CRASH_P4 - HV_X64_MSR_CRASH_P0 + 1

# HV_X64_MSR_HYPERCALL layout (TLFS "Establishing the Hypercall Interface")
HV_X64_MSR_HYPERCALL_ENABLE = 1 << 0
HV_X64_MSR_HYPERCALL_LOCKED = 1 << 1  # once set only a reset clears it (needs EDX bit 18)
HV_X64_MSR_HYPERCALL_RSVDP_MASK = 0xFFC  # bits 11:2, preserved
HV_X64_MSR_HYPERCALL_PAGE_ADDRESS_SHIFT = 12
HV_X64_MSR_HYPERCALL_PAGE_ADDRESS_MASK = HV_PAGE_MASK

# HV_X64_MSR_REFERENCE_TSC layout (TLFS timers.md "Reference Time Stamp Counter (TSC) Page MSR")
HV_X64_MSR_TSC_REFERENCE_ENABLE = 1 << 0  # bits 11:1 RsvdP, 63:12 GPA page number
HV_X64_MSR_TSC_REFERENCE_ADDRESS_SHIFT = 12

# HV_REFERENCE_TSC_PAGE (TLFS timers.md): u32 TscSequence @0, u32 Reserved1 @4, u64 TscScale @8,
# s64 TscOffset @16, reserved to the end of the page.
# ReferenceTime = ((VirtualTsc * TscScale) >> 64) + TscOffset, in 100 ns units.
HV_REFERENCE_TSC_SEQUENCE_OFFSET = 0
HV_REFERENCE_TSC_SCALE_OFFSET = 8
HV_REFERENCE_TSC_OFFSET_OFFSET = 16
HV_REFERENCE_TSC_SEQUENCE_INVALID = 0  # TLFS: "no longer a reliable source": use TIME_REF_COUNT
HV_CLOCK_HZ = 10_000_000  # partition reference time counts 100 ns units (Linux HV_CLOCK_HZ)

# HV_X64_MSR_CRASH_CTL (TLFS HV_CRASH_CTL_REG_CONTENTS; Linux spellings)
HV_CRASH_CTL_CRASH_NOTIFY = 1 << 63  # log the crash parameters P0-P4
HV_CRASH_CTL_CRASH_NOTIFY_MSG = 1 << 62  # P3 = GPA of a message, P4 = its length in bytes

# Ranges hvvmm's MSR filter denies to KVM (KVM api.rst KVM_X86_SET_MSR_FILTER), so that a host
# with in-kernel Hyper-V (arch/x86/kvm/hyperv.c) never handles them itself.
HV_X64_SYNTHETIC_MSR_RANGES = ((0x40000000, 0x400001FF), (0x40001000, 0x400010FF))  # inclusive


def _msr_names() -> dict[int, str]:
    names = {index: name for name, index in globals().items()
             if name.startswith("HV_X64_MSR_") and isinstance(index, int)
             and 0x40000000 <= index <= 0x400010FF and not name.endswith(("_MASK", "_SHIFT"))}
    for n in range(HV_SYNIC_SINT_COUNT):
        names[HV_X64_MSR_NESTED_SINT0 + n] = f"HV_X64_MSR_NESTED_SINT{n}"
    return names


SYNTHETIC_MSR_NAMES: dict[int, str] = _msr_names()


def msr_name(index: int) -> str:
    """``HV_X64_MSR_*`` name of a synthetic MSR index, or ``"MSR 0x..."``; never raises."""
    name = SYNTHETIC_MSR_NAMES.get(index)
    return name if name is not None else f"MSR {index:#x}"


# --------------------------------------------------------------------------------------------
# Hypercall codes (LHDR HV_CALL_CODE; OVDEF HypercallCode; TLFS hypercalls/overview.md)
# --------------------------------------------------------------------------------------------


class HypercallCode(enum.IntEnum):
    """Known call codes (bits 15:0 of the input value). Guest values may be anything: use
    :func:`hypercall_name` / :func:`hypercall_code` rather than ``HypercallCode(value)``."""

    HvCallSwitchVirtualAddressSpace = 0x0001
    HvCallFlushVirtualAddressSpace = 0x0002  # HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE
    HvCallFlushVirtualAddressList = 0x0003  # HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST (rep)
    HvCallNotifyLongSpinWait = 0x0008  # HVCALL_NOTIFY_LONG_SPIN_WAIT
    HvCallInvokeHypervisorDebugger = 0x000A
    HvCallSendSyntheticClusterIpi = 0x000B  # HVCALL_SEND_IPI
    HvCallModifyVtlProtectionMask = 0x000C
    HvCallEnablePartitionVtl = 0x000D
    HvCallEnableVpVtl = 0x000F  # HVCALL_ENABLE_VP_VTL
    HvCallVtlCall = 0x0011
    HvCallVtlReturn = 0x0012
    HvCallFlushVirtualAddressSpaceEx = 0x0013  # HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX (var header)
    HvCallFlushVirtualAddressListEx = 0x0014  # HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX (rep, var)
    HvCallSendSyntheticClusterIpiEx = 0x0015  # HVCALL_SEND_IPI_EX (var header)
    HvCallCreatePartition = 0x0040
    HvCallInitializePartition = 0x0041
    HvCallFinalizePartition = 0x0042
    HvCallDeletePartition = 0x0043
    HvCallGetPartitionProperty = 0x0044
    HvCallSetPartitionProperty = 0x0045
    HvCallGetPartitionId = 0x0046
    HvCallDepositMemory = 0x0048
    HvCallWithdrawMemory = 0x0049
    HvCallMapGpaPages = 0x004B
    HvCallUnmapGpaPages = 0x004C
    HvCallInstallIntercept = 0x004D
    HvCallCreateVp = 0x004E
    HvCallDeleteVp = 0x004F
    HvCallGetVpRegisters = 0x0050
    HvCallSetVpRegisters = 0x0051
    HvCallTranslateVirtualAddress = 0x0052
    HvCallClearVirtualInterrupt = 0x0056
    HvCallDeletePort = 0x0058
    HvCallDisconnectPort = 0x005B
    HvCallPostMessage = 0x005C  # HVCALL_POST_MESSAGE
    HvCallSignalEvent = 0x005D  # HVCALL_SIGNAL_EVENT
    HvCallPostDebugData = 0x0069
    HvCallRetrieveDebugData = 0x006A
    HvCallResetDebugSession = 0x006B
    HvCallMapStatsPage = 0x006C
    HvCallUnmapStatsPage = 0x006D
    HvCallOutputDebugCharacter = 0x0071
    HvCallAddLogicalProcessor = 0x0076
    HvCallGetSystemProperty = 0x007B
    HvCallMapDeviceInterrupt = 0x007C
    HvCallUnmapDeviceInterrupt = 0x007D
    HvCallRetargetDeviceInterrupt = 0x007E  # HVCALL_RETARGET_INTERRUPT
    HvCallNotifyPartitionEvent = 0x0087
    HvCallNotifyPortRingEmpty = 0x008B
    HvCallRegisterInterceptResult = 0x0091
    HvCallAssertVirtualInterrupt = 0x0094
    HvCallCreatePort = 0x0095
    HvCallConnectPort = 0x0096
    HvCallStartVirtualProcessor = 0x0099  # HVCALL_START_VP
    HvCallGetVpIndexFromApicId = 0x009A  # HVCALL_GET_VP_ID_FROM_APIC_ID
    HvCallTranslateVirtualAddressEx = 0x00AC
    HvCallCheckForIoIntercept = 0x00AD
    HvCallFlushGuestPhysicalAddressSpace = 0x00AF
    HvCallFlushGuestPhysicalAddressList = 0x00B0
    HvCallSignalEventDirect = 0x00C0
    HvCallPostMessageDirect = 0x00C1
    HvCallDispatchVp = 0x00C2
    HvCallGetGpaPagesAccessStates = 0x00C9
    HvCallCheckSparseGpaPageVtlAccess = 0x00D4
    HvCallAcquireSparseSpaPageHostAccess = 0x00D7
    HvCallReleaseSparseSpaPageHostAccess = 0x00D8
    HvCallAcceptGpaPages = 0x00D9
    HvCallModifySparseGpaPageHostVisibility = 0x00DB
    HvCallMapVpStatePage = 0x00E1
    HvCallUnmapVpStatePage = 0x00E2
    HvCallGetVpState = 0x00E3
    HvCallSetVpState = 0x00E4
    HvCallGetVpCpuidValues = 0x00F4
    HvCallRestorePartitionTime = 0x0103
    HvCallMemoryMappedIoRead = 0x0106  # HVCALL_MMIO_READ
    HvCallMemoryMappedIoWrite = 0x0107  # HVCALL_MMIO_WRITE
    HvCallPinGpaPageRanges = 0x0112
    HvCallUnpinGpaPageRanges = 0x0113
    HvCallQuerySparseGpaPageHostVisibility = 0x011C
    # Extended hypercalls (TLFS "Extended Hypercall Interface"; gated by EnableExtendedHypercalls)
    HvExtCallQueryCapabilities = 0x8001  # HV_EXT_CALL_QUERY_CAPABILITIES
    HvExtCallGetBootZeroedMemory = 0x8002
    HvExtCallMemoryHeatHint = 0x8003  # HV_EXT_CALL_MEMORY_HEAT_HINT
    HvExtCallEpfSetup = 0x8004
    HvExtCallMemoryHeatHintAsync = 0x8006
    HvCallVbsVmCallReport = 0xC001


HV_EXT_CALL_FIRST = 0x8001  # extended hypercall range; KVM forwards 0x8001..0x8041 to user space
HV_EXT_CALL_MAX = 0x8001 + 64  # KVM hyperv.c spelling (last code KVM forwards)

# HvExtCallQueryCapabilities output bits (TLFS hypercalls/HvExtCallQueryCapabilities.md)
HV_EXT_CAPABILITY_GET_BOOT_ZEROED_MEMORY = 1 << 0
HV_EXT_CAPABILITY_MEMORY_HEAT_HINT = 1 << 1
HV_EXT_CAPABILITY_EPF_SETUP = 1 << 2
HV_EXT_CAPABILITY_SCHEDULER_ASSIST_SETUP = 1 << 3
HV_EXT_CAPABILITY_MEMORY_HEAT_HINT_ASYNC = 1 << 4
# Linux hvgdk_ext.h tests bit 8 before HvExtCallMemoryHeatHint COLD_DISCARD; the TLFS does not
# list it (Linux drivers/hv/hv_balloon.c).
HV_EXT_CAPABILITY_MEMORY_COLD_DISCARD_HINT = 1 << 8
# HvExtCallGetBootZeroedMemory: 0xFF8 bytes of output = u64 RangeCount + 255 x (u64 start page
# number, u64 page count) (TLFS hypercalls/HvExtCallGetBootZeroedMemory.md)
HV_EXT_BOOT_ZEROED_MEMORY_OUTPUT_SIZE = 0xFF8
HV_EXT_BOOT_ZEROED_MEMORY_MAX_RANGES = 255


def hypercall_code(value: int) -> HypercallCode | int:
    """The :class:`HypercallCode` member for ``value``, or the plain int; never raises."""
    try:
        return HypercallCode(value)
    except ValueError:
        return value


def hypercall_name(code: int) -> str:
    """TLFS name of a call code (``"HvCallPostMessage"``), or ``"HvCall(0x1234)"``; never raises."""
    try:
        return HypercallCode(code).name
    except (ValueError, TypeError):
        try:
            return f"HvCall({int(code):#06x})"
        except (ValueError, TypeError):
            return f"HvCall({code!r})"


# --------------------------------------------------------------------------------------------
# HV_STATUS (LHDR L16-43; OVDEF HvError)
# --------------------------------------------------------------------------------------------


class HvStatus(enum.IntEnum):
    """``HV_STATUS`` values (bits 15:0 of the hypercall result value)."""

    HV_STATUS_SUCCESS = 0x0000
    HV_STATUS_INVALID_HYPERCALL_CODE = 0x0002  # unknown / unavailable call code
    HV_STATUS_INVALID_HYPERCALL_INPUT = 0x0003  # bad rep count/start, var header, reserved bits
    HV_STATUS_INVALID_ALIGNMENT = 0x0004  # GPA not 8-aligned, list spans pages, GPA out of bounds
    HV_STATUS_INVALID_PARAMETER = 0x0005
    HV_STATUS_ACCESS_DENIED = 0x0006  # privilege missing; reported before other errors
    HV_STATUS_INVALID_PARTITION_STATE = 0x0007
    HV_STATUS_OPERATION_DENIED = 0x0008
    HV_STATUS_UNKNOWN_PROPERTY = 0x0009
    HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE = 0x000A
    HV_STATUS_INSUFFICIENT_MEMORY = 0x000B
    HV_STATUS_PARTITION_TOO_DEEP = 0x000C
    HV_STATUS_INVALID_PARTITION_ID = 0x000D
    HV_STATUS_INVALID_VP_INDEX = 0x000E
    HV_STATUS_NOT_FOUND = 0x0010
    HV_STATUS_INVALID_PORT_ID = 0x0011
    HV_STATUS_INVALID_CONNECTION_ID = 0x0012
    HV_STATUS_INSUFFICIENT_BUFFERS = 0x0013
    HV_STATUS_NOT_ACKNOWLEDGED = 0x0014
    HV_STATUS_INVALID_VP_STATE = 0x0015
    HV_STATUS_ACKNOWLEDGED = 0x0016
    HV_STATUS_INVALID_SAVE_RESTORE_STATE = 0x0017
    HV_STATUS_INVALID_SYNIC_STATE = 0x0018
    HV_STATUS_OBJECT_IN_USE = 0x0019
    HV_STATUS_INVALID_PROXIMITY_DOMAIN_INFO = 0x001A
    HV_STATUS_NO_DATA = 0x001B
    HV_STATUS_INACTIVE = 0x001C
    HV_STATUS_NO_RESOURCES = 0x001D
    HV_STATUS_FEATURE_UNAVAILABLE = 0x001E
    HV_STATUS_PARTIAL_PACKET = 0x001F
    HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED = 0x0020
    HV_STATUS_PROCESSOR_CACHE_LINE_FLUSH_SIZE_INCOMPATIBLE = 0x0030
    HV_STATUS_INSUFFICIENT_BUFFER = 0x0033
    HV_STATUS_INCOMPATIBLE_PROCESSOR = 0x0037
    HV_STATUS_INSUFFICIENT_DEVICE_DOMAINS = 0x0038
    HV_STATUS_CPUID_FEATURE_VALIDATION_ERROR = 0x003C
    HV_STATUS_CPUID_XSAVE_FEATURE_VALIDATION_ERROR = 0x003D
    HV_STATUS_PROCESSOR_STARTUP_TIMEOUT = 0x003E
    HV_STATUS_SMX_ENABLED = 0x003F
    HV_STATUS_INVALID_LP_INDEX = 0x0041
    HV_STATUS_INVALID_REGISTER_VALUE = 0x0050
    HV_STATUS_INVALID_VTL_STATE = 0x0051
    HV_STATUS_NX_NOT_DETECTED = 0x0055
    HV_STATUS_INVALID_DEVICE_ID = 0x0057
    HV_STATUS_INVALID_DEVICE_STATE = 0x0058
    HV_STATUS_PENDING_PAGE_REQUESTS = 0x0059
    HV_STATUS_PAGE_REQUEST_INVALID = 0x0060
    HV_STATUS_KEY_ALREADY_EXISTS = 0x0065
    HV_STATUS_DEVICE_ALREADY_IN_DOMAIN = 0x0066
    HV_STATUS_INVALID_CPU_GROUP_ID = 0x006F
    HV_STATUS_INVALID_CPU_GROUP_STATE = 0x0070
    HV_STATUS_OPERATION_FAILED = 0x0071
    HV_STATUS_NOT_ALLOWED_WITH_NESTED_VIRT_ACTIVE = 0x0072
    HV_STATUS_INSUFFICIENT_ROOT_MEMORY = 0x0073
    HV_STATUS_EVENT_BUFFER_ALREADY_FREED = 0x0074
    HV_STATUS_TIME_OUT = 0x0078  # hvvmm/OpenVMM: a handler's "continue later"; guest never sees it
    HV_STATUS_CALL_PENDING = 0x0079
    HV_STATUS_VTL_ALREADY_ENABLED = 0x0086
    HV_STATUS_UNKNOWN_REGISTER_NAME = 0x0087


def status_name(status: int) -> str:
    """``HV_STATUS_*`` name of a status value, or ``"HV_STATUS(0x1234)"``; never raises."""
    try:
        return HvStatus(status).name
    except (ValueError, TypeError):
        try:
            return f"HV_STATUS({int(status):#06x})"
        except (ValueError, TypeError):
            return f"HV_STATUS({status!r})"


# --------------------------------------------------------------------------------------------
# Hypercall input value and result value (TLFS "Hypercall Inputs" / "Hypercall Outputs";
# LHDR HV_HYPERCALL_INPUT L500-514)
# --------------------------------------------------------------------------------------------

HV_U64_MASK = 0xFFFF_FFFF_FFFF_FFFF

HV_HYPERCALL_CODE_MASK = 0xFFFF  # bits 15:0: call code (no Linux name)
HV_HYPERCALL_FAST_BIT = 1 << 16  # bit 16: register-based ("fast") calling convention
HV_HYPERCALL_VARHEAD_OFFSET = 17  # bits 26:17: variable header size in QWORDs
HV_HYPERCALL_VARHEAD_MASK = 0x3FF << HV_HYPERCALL_VARHEAD_OFFSET
HV_HYPERCALL_RSVD0_MASK = 0x1F << 27  # bits 31:27: RsvdZ (Linux includes bit 31, see below)
# bit 31: "Is Nested" (handle in L0); reserved for a non-nested hypervisor such as hvvmm
HV_HYPERCALL_NESTED = 1 << 31
HV_HYPERCALL_REP_COMP_OFFSET = 32  # bits 43:32: rep count (input) / reps completed (result)
HV_HYPERCALL_REP_COMP_1 = 1 << HV_HYPERCALL_REP_COMP_OFFSET
HV_HYPERCALL_REP_COMP_MASK = 0xFFF << HV_HYPERCALL_REP_COMP_OFFSET
HV_HYPERCALL_RSVD1_MASK = 0xF << 44  # bits 47:44: RsvdZ
HV_HYPERCALL_REP_START_OFFSET = 48  # bits 59:48: rep start index
HV_HYPERCALL_REP_START_MASK = 0xFFF << HV_HYPERCALL_REP_START_OFFSET
HV_HYPERCALL_RSVD2_MASK = 0xF << 60  # bits 63:60: RsvdZ
HV_HYPERCALL_RSVD_MASK = HV_HYPERCALL_RSVD0_MASK | HV_HYPERCALL_RSVD1_MASK | HV_HYPERCALL_RSVD2_MASK
HV_HYPERCALL_MAX_VARHEAD_QWORDS = 0x3FF
HV_HYPERCALL_MAX_REP_COUNT = 0xFFF

# Result value: bits 15:0 HV_STATUS, 31:16 ignore, 43:32 reps completed (total, not relative to
# the start index), 63:44 ignore. (The TLFS table says "RsvdZ 63-40", an overlap typo.)
HV_HYPERCALL_RESULT_MASK = 0xFFFF

# Fast calling convention: RDX, R8 and XMM0-XMM5 give 7 16-byte "register pairs" = 112 bytes.
HV_HYPERCALL_MAX_XMM_REGISTERS = 6
HV_HYPERCALL_FAST_PAIR_SIZE = 16
HV_HYPERCALL_MAX_FAST_PAIRS = 1 + HV_HYPERCALL_MAX_XMM_REGISTERS
HV_HYPERCALL_MAX_XMM_INPUT_BYTES = HV_HYPERCALL_MAX_FAST_PAIRS * HV_HYPERCALL_FAST_PAIR_SIZE

# --------------------------------------------------------------------------------------------
# Guest OS ID (TLFS "Reporting the Guest OS Identity")
# --------------------------------------------------------------------------------------------

HV_GUEST_OS_ID_OPEN_SOURCE = 1 << 63
HV_LINUX_VENDOR_ID = 0x8100  # bits 63:48 of a Linux GuestOsId (open source, OS type 1)

GUEST_OS_VENDORS = {0x0001: "Microsoft", 0x0002: "HPE", 0x0003: "BlackBerry", 0x0200: "LANCOM"}
MICROSOFT_OS_IDS = {0: "Undefined", 1: "MS-DOS", 2: "Windows 3.x", 3: "Windows 9x",
                    4: "Windows NT", 5: "Windows CE"}
OPEN_SOURCE_OS_TYPES = {0x1: "Linux", 0x2: "FreeBSD", 0x3: "Xen", 0x4: "Illumos"}
HV_GUEST_OS_VENDOR_MICROSOFT = 0x0001
HV_GUEST_OS_MICROSOFT_WINDOWS_NT = 4
HV_GUEST_OS_TYPE_LINUX = 0x1


@dataclass(frozen=True)
class GuestOsId:
    """A decoded ``HV_X64_MSR_GUEST_OS_ID`` value; fields are properties of :attr:`value`.

    Proprietary form (bit 63 = 0): 15:0 build, 23:16 service version, 31:24 minor, 39:32 major,
    47:40 OS id, 62:48 vendor. Open-source form (bit 63 = 1): 15:0 build, 47:16 version,
    55:48 OS id, 62:56 OS type. ``os_id`` and ``build`` exist in both forms at different bits.
    """

    value: int

    @property
    def is_set(self) -> bool:
        return self.value != 0

    @property
    def open_source(self) -> bool:
        return bool(self.value & HV_GUEST_OS_ID_OPEN_SOURCE)

    @property
    def build(self) -> int:
        return self.value & 0xFFFF

    @property
    def os_id(self) -> int:
        return (self.value >> 48) & 0xFF if self.open_source else (self.value >> 40) & 0xFF

    # proprietary form
    @property
    def service_version(self) -> int:
        return 0 if self.open_source else (self.value >> 16) & 0xFF

    @property
    def minor_version(self) -> int:
        return 0 if self.open_source else (self.value >> 24) & 0xFF

    @property
    def major_version(self) -> int:
        return 0 if self.open_source else (self.value >> 32) & 0xFF

    @property
    def vendor_id(self) -> int:
        return 0 if self.open_source else (self.value >> 48) & 0x7FFF

    # open-source form
    @property
    def version(self) -> int:
        """Bits 47:16 of the open-source form (Linux: ``LINUX_VERSION_CODE``)."""
        return (self.value >> 16) & 0xFFFF_FFFF if self.open_source else 0

    @property
    def os_type(self) -> int:
        return (self.value >> 56) & 0x7F if self.open_source else 0

    @property
    def is_linux(self) -> bool:
        return self.open_source and self.os_type == HV_GUEST_OS_TYPE_LINUX

    @property
    def is_windows(self) -> bool:
        return (not self.open_source and self.vendor_id == HV_GUEST_OS_VENDOR_MICROSOFT
                and self.os_id == HV_GUEST_OS_MICROSOFT_WINDOWS_NT)

    @property
    def linux_version(self) -> tuple[int, int, int] | None:
        """``(major, minor, sublevel)`` from ``LINUX_VERSION_CODE`` for a Linux guest."""
        if not self.is_linux:
            return None
        code = self.version
        return (code >> 16) & 0xFFFF, (code >> 8) & 0xFF, code & 0xFF

    def __str__(self) -> str:
        if not self.is_set:
            return "not set"
        if self.open_source:
            os_name = OPEN_SOURCE_OS_TYPES.get(self.os_type,
                                               f"open-source OS type {self.os_type:#x}")
            if self.is_linux:
                a, b, c = self.linux_version or (0, 0, 0)
                release = f"{a}.{b}.{c}"
            else:
                release = f"version {self.version:#x}"
            return (f"{os_name} {release} (open source, distro {self.os_id:#04x}, "
                    f"build {self.build:#06x})")
        vendor = GUEST_OS_VENDORS.get(self.vendor_id, f"vendor {self.vendor_id:#06x}")
        if self.vendor_id == HV_GUEST_OS_VENDOR_MICROSOFT:
            os_name = MICROSOFT_OS_IDS.get(self.os_id, f"OS {self.os_id:#04x}")
        else:
            os_name = f"OS {self.os_id:#04x}"
        sp = f" SP{self.service_version}" if self.service_version else ""
        return (f"{os_name} {self.major_version}.{self.minor_version}{sp} build {self.build} "
                f"({vendor})")


def decode_guest_os_id(value: int) -> GuestOsId:
    """Decode a guest-written ``HV_X64_MSR_GUEST_OS_ID`` value (any int; masked to 64 bits)."""
    return GuestOsId(value & HV_U64_MASK)


def linux_guest_os_id(major: int, minor: int, sublevel: int) -> int:
    """The value Linux's ``hv_generate_guest_id()`` writes for kernel ``major.minor.sublevel``."""
    version_code = (major << 16) | (minor << 8) | min(sublevel, 255)
    return (HV_LINUX_VENDOR_ID << 48) | (version_code << 16)
