"""The Microsoft hypervisor interface ("HV#1", TLFS) implemented in user space.

Layout (after OpenVMM's ``vm/hv1`` split):

* :mod:`hvvmm.hv.hvdef` -- TLFS definitions only: CPUID leaves and bits, synthetic MSR indices,
  hypercall codes, ``HV_STATUS`` values, hypercall input/result value fields, GuestOsId decoding.
* :mod:`hvvmm.hv.hypercall` -- the hypercall ABI (register conventions, validation, continuation)
  and a table-driven dispatcher. It sees the calling vCPU only through the
  :class:`~hvvmm.hv.hypercall.HypercallRegisters` protocol and guest RAM only through
  :class:`hvvmm.memory.GuestMemory`.
* :mod:`hvvmm.hv.msr` -- the synthetic MSR registry: declared MSRs, read-only and reserved-bit
  rules, #GP for anything not advertised.
* :mod:`hvvmm.hv.features` -- ``--hyperv SPEC`` parsing (QEMU's ``hv-*`` names, presets,
  dependency rules) into a :class:`~hvvmm.hv.features.HyperVConfig`.
* :mod:`hvvmm.hv.partition` -- the emulator state of one VM (OpenVMM's ``hv1_emulator``): the
  attached enlightenments, per-VP state and counters, the entry points the vCPU loop calls.
* :mod:`hvvmm.hv.platform` -- :class:`~hvvmm.hv.platform.HvPlatform`, the services the emulator
  needs from a VMM (implemented over KVM in :mod:`hvvmm.hyperv`, faked in unit tests).

Nothing in this package imports the KVM layer; it is unit-tested with a fake register file and
``bytearray`` guest memory. The enlightenments themselves (VP index, clocks, SynIC, ...) live in
``hvvmm.enlightenments`` and register their hypercalls in a
:class:`~hvvmm.hv.hypercall.HypercallTable`.
"""
