"""PCI: configuration space, the host bus behind configuration mechanism #1, and the i440FX/PIIX3
chipset of QEMU's ``pc`` machine.

A PCI function is a plain state machine (:class:`PciFunction`): 256 bytes of configuration space
with a writable-bits mask, BARs sized the PCI way (write all ones, read back the size mask) and
placed on the port-I/O and MMIO buses (:mod:`hvvmm.bus`) when the guest enables decoding. INTx
goes through the PIIX3's PIRQ routing to an ISA interrupt line.

Sources: PCI Local Bus Specification 3.0, §6 (configuration space), §6.2.5 (base address
registers), §3.2.2.3.2 (configuration mechanism #1); Intel 82441FX (PMC) datasheet §3.2.19 (PAM);
Intel 82371SB (PIIX3) datasheet §2.2.10 (PIRQ route control).
"""

from .config import Bar, BarKind, PciFunction
from .host import PciBus, PciConfigPorts

__all__ = ["Bar", "BarKind", "PciFunction", "PciBus", "PciConfigPorts"]
