"""hv-ext-hypercalls (hvvmm name; QEMU has no flag): the extended hypercall interface.

TLFS ``hypercall-interface.md`` "Extended Hypercall Interface",
``hypercalls/HvExtCallQueryCapabilities.md`` and ``hypercalls/HvExtCallGetBootZeroedMemory.md``;
Linux ``include/hyperv/hvgdk_ext.h`` and ``drivers/hv/hv_common.c`` ``hv_query_ext_cap()``.
Privilege: EnableExtendedHypercalls, CPUID 0x40000003 EBX bit 20.

* HvExtCallQueryCapabilities (0x8001, simple, no input): 8 bytes of output, the bitmask of the
  extended calls available. hvvmm reports bit 0 (GetBootZeroedMemory) only. Linux calls it at boot
  when EBX bit 20 is set (``hyperv_init()`` in ``arch/x86/hyperv/hv_init.c``) and later from
  ``hv_balloon``, which tests bit 8 (cold-discard hints, not in the TLFS;
  ``drivers/hv/hv_balloon.c``): clear, so it never sends 0x8003.
* HvExtCallGetBootZeroedMemory (0x8002, simple, no input): 0xFF8 bytes of output, a u64 range
  count and up to 255 ranges of (u64 start page number, u64 page count) "known to be zeroed at
  the time the hypercall is made. Cacheable reads from reported ranges must return all zeroes."
  Biggest ranges first, as the TLFS asks. The ranges come from the platform
  (:meth:`~hvvmm.hv.platform.HvPlatform.boot_zeroed_ranges`), and the sound default is none:
  the VMM's loader writes into RAM before the first instruction and a rebooted guest leaves its
  old contents behind, so only a platform that tracks which pages are still untouched (dirty
  logging) can name any; a wrong answer would hand stale data to the guest's "pre-zeroed" pages.
  Sub-page edges are trimmed, never rounded outwards.

Neither call has a register ("fast") form: the dispatcher answers a fast extended call with
INVALID_HYPERCALL_INPUT (KVM answers INVALID_PARAMETER; see :mod:`hvvmm.hv.hypercall`). With the
feature off the calls still exist and answer ACCESS_DENIED, the TLFS answer for a call whose
privilege is not granted (Windows issues 0x8001 even without EBX bit 20; Xen
``xen/arch/x86/hvm/viridian/viridian.c`` answers INVALID_HYPERCALL_CODE).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Iterable

from hvvmm.enlightenments import Enlightenment, privileges
from hvvmm.hv.hvdef import (
    HV_EXT_BOOT_ZEROED_MEMORY_MAX_RANGES,
    HV_EXT_BOOT_ZEROED_MEMORY_OUTPUT_SIZE,
    HV_EXT_CAPABILITY_GET_BOOT_ZEROED_MEMORY,
    HV_PAGE_SHIFT,
    HV_PAGE_SIZE,
    HvPartitionPrivilege,
    HypercallCode,
)
from hvvmm.hv.hypercall import HypercallRequest, HypercallResult, HypercallSpec

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

log = logging.getLogger(__name__)

NAME = "hv-ext-hypercalls"
CAPABILITIES = HV_EXT_CAPABILITY_GET_BOOT_ZEROED_MEMORY


def zeroed_page_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start page number, page count)`` for the whole pages inside ``(gpa, size)`` ranges,
    biggest first, at most 255 (TLFS output limit). Partial pages at either end are dropped."""
    pages = []
    for gpa, size in ranges:
        if gpa < 0 or size <= 0:
            continue
        first = -(-gpa // HV_PAGE_SIZE)
        end = (gpa + size) >> HV_PAGE_SHIFT
        if end > first:
            pages.append((first, end - first))
    pages.sort(key=lambda r: (-r[1], r[0]))
    return pages[:HV_EXT_BOOT_ZEROED_MEMORY_MAX_RANGES]


def encode_boot_zeroed_memory(pages: list[tuple[int, int]]) -> bytes:
    body = struct.pack("<Q", len(pages)) + b"".join(struct.pack("<QQ", start, count)
                                                    for start, count in pages)
    return body.ljust(HV_EXT_BOOT_ZEROED_MEMORY_OUTPUT_SIZE, b"\0")


def attach(partition: "Partition") -> None:
    platform = partition.platform

    capabilities = HypercallResult(output=struct.pack("<Q", CAPABILITIES))  # immutable: shared

    def query_capabilities(request: HypercallRequest) -> HypercallResult:
        return capabilities

    def get_boot_zeroed_memory(request: HypercallRequest) -> HypercallResult:
        pages = zeroed_page_ranges(platform.boot_zeroed_ranges())
        log.debug("vp%d: HvExtCallGetBootZeroedMemory -> %d range(s)", request.vp_index,
                  len(pages))
        return HypercallResult(output=encode_boot_zeroed_memory(pages))

    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvExtCallQueryCapabilities, handler=query_capabilities,
        output_size=8))
    partition.register_hypercall(HypercallSpec(
        code=HypercallCode.HvExtCallGetBootZeroedMemory, handler=get_boot_zeroed_memory,
        output_size=HV_EXT_BOOT_ZEROED_MEMORY_OUTPUT_SIZE))


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    aliases=("hv-extended-hypercalls",),
    summary="extended hypercalls: HvExtCallQueryCapabilities, HvExtCallGetBootZeroedMemory",
    tlfs="hypercall-interface.md: Extended Hypercall Interface",
    attach=attach,
    cpuid=privileges(HvPartitionPrivilege.EnableExtendedHypercalls),
    hypercalls=(HypercallCode.HvExtCallQueryCapabilities,
                HypercallCode.HvExtCallGetBootZeroedMemory),
    denied_when_off=True,
)
