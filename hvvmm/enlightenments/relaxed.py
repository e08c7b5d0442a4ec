"""hv-relaxed: the "relaxed timing" recommendation (CPUID 0x40000004 EAX bit 5).

TLFS ``feature-discovery.md`` "Implementation Recommendations"; QEMU ``docs/system/i386/hyperv.rst``
``hv-relaxed``. CPUID only: it tells Windows to disable its watchdog timeouts
(CLOCK_WATCHDOG_TIMEOUT / DPC watchdog bugchecks when vCPUs are descheduled). Xen always sets it;
Linux ignores it (it disables its hard-lockup detector on Hyper-V anyway).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvvmm.enlightenments import Enlightenment, recommendations
from hvvmm.hv.hvdef import HvEnlightenmentInformation

if TYPE_CHECKING:
    from hvvmm.hv.partition import Partition

NAME = "hv-relaxed"


def attach(partition: "Partition") -> None:
    """Nothing to register: the recommendation bit is all there is."""


ENLIGHTENMENT = Enlightenment(
    name=NAME,
    summary="relaxed timing recommendation: the guest disables its watchdogs",
    tlfs="feature-discovery.md: Implementation Recommendations",
    attach=attach,
    cpuid=recommendations(HvEnlightenmentInformation.HV_X64_RELAXED_TIMING_RECOMMENDED),
)
