"""Virtio devices: the split virtqueue (:mod:`.queue`) and the PCI transport (:mod:`.pci`).

Source: Virtual I/O Device (VIRTIO) Version 1.2, OASIS, sections 2 (basic facilities), 4.1
(virtio over PCI) and 5.2 (block device).
"""
