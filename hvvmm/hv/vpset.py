"""Virtual processor sets: the 64-bit ``ProcessorMask`` and ``HV_VP_SET`` (sparse 4K banks).

TLFS ``datatypes/hv_vp_set.md``; Linux ``include/hyperv/hvgdk_mini.h`` ``struct hv_vpset``::

    struct HV_VP_SET {
        u64 Format;          // 0 = HV_GENERIC_SET_SPARSE_4K, 1 = HV_GENERIC_SET_ALL
        u64 ValidBanksMask;  // bit i set: bank i (VPs 64*i .. 64*i+63) is present
        u64 BankContents[];  // one u64 per set bit of ValidBanksMask, in increasing bank order
    };

"For every bit that is set with ValidBanksMask, there must be an element in the BanksContents
array" and an element may be zero ("no processors are specified in this bank"). Bit *j* of the
element for bank *i* names VP 64*i + j.

Where the set lives in a hypercall input: the Ex calls (HvCallSendSyntheticClusterIpiEx 0x0015,
HvCallFlushVirtualAddressSpaceEx 0x0013, HvCallFlushVirtualAddressListEx 0x0014) carry Format and
ValidBanksMask at the end of the fixed header and the bank contents in the **variable header**,
whose size (input value bits 26:17, in QWORDs) is the number of banks. That is what Linux sends
(``hv_do_rep_hypercall(HVCALL_SEND_IPI_EX, 0, nr_bank, ...)`` with ``nr_bank`` from
``cpumask_to_vpset()``, and the same for the flush calls) and what KVM checks
(``arch/x86/kvm/hyperv.c`` ``kvm_hv_flush_tlb()``/``kvm_hv_send_ipi()``: ``if (hc->var_cnt !=
hweight64(valid_bank_mask)) return HV_STATUS_INVALID_HYPERCALL_INPUT``). OpenVMM instead reads the
whole HV_VP_SET as the variable header of the flush Ex calls (``hvdef``
``FlushVirtualAddressSpaceEx`` is 16 bytes, "Followed by an HvVpSet"); Linux's input would not
parse there, so hvvmm follows Linux and KVM. (Other root-only calls count ValidBanksMask into the
variable header too, e.g. Linux ``hv_map_interrupt()``: "var-size starts after vp_mask"; none of
them is implemented here.)

Every bound is checked before anything is read, and a bad set is always answered with a TLFS
status (:class:`~hvvmm.hv.hypercall.HypercallError`), never another exception:

* the bytes after Format and ValidBanksMask must be exactly ``popcount(ValidBanksMask)`` QWORDs
  -> otherwise HV_STATUS_INVALID_HYPERCALL_INPUT (KVM; the size in the input value does not fit
  the set). This holds for HV_GENERIC_SET_ALL too, whose bank contents are then ignored (KVM:
  "Hyper-V TLFS doesn't explicitly forbid non-empty sparse vCPU banks ... for the 'all vCPUs'
  case");
* a Format other than 0 or 1 -> HV_STATUS_INVALID_PARAMETER (the TLFS defines only these two;
  OpenVMM answers InvalidParameter for any format its parser does not take. KVM treats every
  non-zero format as "all" in the flush calls and as "sparse" in the IPI call);
* a set naming a VP index at or above the partition's VP count -> HV_STATUS_INVALID_PARAMETER.
  KVM and OpenVMM silently skip such VPs; hvvmm reports them, because the guest asked for
  something that does not exist (Linux and Windows only name VPs whose VP_INDEX they read).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from hvvmm.hv.hvdef import HV_U64_MASK, HvStatus
from hvvmm.hv.hypercall import HypercallError

HV_GENERIC_SET_SPARSE_4K = 0
HV_GENERIC_SET_ALL = 1
HV_VP_SET_BANK_SIZE = 64  # VPs per bank (one u64 of BankContents)
HV_VP_SET_MAX_BANKS = 64  # ValidBanksMask has 64 bits: at most 4096 VPs
HV_VP_SET_MAX_VPS = HV_VP_SET_BANK_SIZE * HV_VP_SET_MAX_BANKS
HV_VP_SET_HEADER_SIZE = 16  # Format + ValidBanksMask



@dataclass(frozen=True)
class VpSet:
    """A decoded processor set: every VP of the partition (``all``), or exactly ``vps``."""

    all: bool
    vps: frozenset[int] = frozenset()

    def members(self, vp_count: int) -> tuple[int, ...]:
        """The VP indices named, in increasing order (for ``all``: 0 .. vp_count - 1)."""
        if self.all:
            return tuple(range(vp_count))
        return tuple(sorted(self.vps))


def _check_vp_count(vp_count: int) -> None:
    if not 1 <= vp_count <= HV_VP_SET_MAX_VPS:
        raise ValueError(f"a partition has 1..{HV_VP_SET_MAX_VPS} VPs, not {vp_count!r} "
                         "(a VMM bug)")


def _bits(value: int, base: int) -> Iterable[int]:
    while value:
        low = value & -value
        yield base + low.bit_length() - 1
        value ^= low


def _out_of_range(vp: int, vp_count: int) -> HypercallError:
    return HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER,
                          message=f"the processor set names VP {vp}; the partition has VPs "
                                  f"0..{vp_count - 1}")


def processor_mask_vps(mask: int, vp_count: int) -> frozenset[int]:
    """The VPs of a 64-bit ``ProcessorMask`` (bit *n* = VP *n*; the non-Ex calls). A bit for a VP
    the partition does not have -> HV_STATUS_INVALID_PARAMETER."""
    _check_vp_count(vp_count)
    mask &= HV_U64_MASK
    if mask >> min(vp_count, HV_VP_SET_BANK_SIZE):
        raise _out_of_range(mask.bit_length() - 1, vp_count)
    return frozenset(_bits(mask, 0))


def check_vp_set_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """The shape check of :func:`decode_vp_set` alone: ``data`` holds Format, ValidBanksMask and
    exactly one QWORD per valid bank, else HV_STATUS_INVALID_HYPERCALL_INPUT. Returns ``(Format,
    ValidBanksMask)``. For callers that ignore the set's contents (HV_FLUSH_ALL_PROCESSORS)."""
    if len(data) < HV_VP_SET_HEADER_SIZE or len(data) % 8:
        raise HypercallError(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                             message=f"a processor set needs Format and ValidBanksMask and whole "
                                     f"QWORDs, not {len(data)} bytes")
    set_format, valid_banks = struct.unpack_from("<QQ", data)
    bank_words = len(data) // 8 - 2
    banks = valid_banks.bit_count()
    if bank_words != banks:
        raise HypercallError(HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT,
                             message=f"ValidBanksMask {valid_banks:#x} names {banks} bank(s) but "
                                     f"the input holds {bank_words}")
    return set_format, valid_banks


def decode_vp_set(data: bytes | bytearray | memoryview, vp_count: int) -> VpSet:
    """Decode one complete HV_VP_SET: Format, ValidBanksMask, then exactly the bank contents.

    ``data`` is everything the caller attributes to the set (for the Ex hypercalls: the last 16
    bytes of the fixed header followed by the variable header), so its length is the bound every
    bank is checked against. Raises :class:`HypercallError` with a TLFS status (module
    docstring); never anything else for any ``data``."""
    _check_vp_count(vp_count)
    data = bytes(data)
    set_format, valid_banks = check_vp_set_size(data)
    banks = valid_banks.bit_count()
    if set_format == HV_GENERIC_SET_ALL:
        return VpSet(all=True)
    if set_format != HV_GENERIC_SET_SPARSE_4K:
        raise HypercallError(HvStatus.HV_STATUS_INVALID_PARAMETER,
                             message=f"processor set format {set_format:#x} is neither sparse (0) "
                                     "nor all (1)")
    contents = struct.unpack_from(f"<{banks}Q", data, HV_VP_SET_HEADER_SIZE)
    vps: set[int] = set()
    for bank, word in zip(_bits(valid_banks, 0), contents):
        if not word:
            continue  # TLFS: an all-zero element is valid and names no VP
        highest = bank * HV_VP_SET_BANK_SIZE + word.bit_length() - 1
        if highest >= vp_count:
            raise _out_of_range(highest, vp_count)
        vps.update(_bits(word, bank * HV_VP_SET_BANK_SIZE))
    return VpSet(all=False, vps=frozenset(vps))


def encode_vp_set(vps: Iterable[int] | None) -> bytes:
    """The HV_VP_SET for ``vps`` (sparse, only the banks that hold a VP, as Linux's
    ``cpumask_to_vpset()`` would minus its leading empty banks), or HV_GENERIC_SET_ALL for
    ``None``. For tests and tools; the bank count is ``(len(result) - 16) // 8``."""
    if vps is None:
        return struct.pack("<QQ", HV_GENERIC_SET_ALL, 0)
    banks: dict[int, int] = {}
    for vp in vps:
        if not 0 <= vp < HV_VP_SET_MAX_VPS:
            raise ValueError(f"VP index {vp!r} does not fit an HV_VP_SET")
        banks[vp // HV_VP_SET_BANK_SIZE] = banks.get(vp // HV_VP_SET_BANK_SIZE, 0) | \
            1 << vp % HV_VP_SET_BANK_SIZE
    valid = 0
    for bank in banks:
        valid |= 1 << bank
    words = [banks[bank] for bank in sorted(banks)]
    return struct.pack(f"<QQ{len(words)}Q", HV_GENERIC_SET_SPARSE_4K, valid, *words)
