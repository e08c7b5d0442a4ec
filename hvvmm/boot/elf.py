"""ELF executables as kernels load them: the header checks, the PT_LOAD segments by physical
address, and the notes (System V gABI, "Program Loading" and "Note Section").

Shared by the Multiboot loader (ELF32/ELF64 kernels) and the Linux loaders (``vmlinux``, whose
PVH entry point is an ELF note). The file is untrusted: every offset and size is checked against
it, and a problem raises :class:`KernelImageError` with one sentence.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .state import KernelImageError

ELF_MAGIC = b"\x7fELF"
_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB = 1
_ET_EXEC, _ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
_PT_LOAD, _PT_NOTE = 1, 4
_PN_XNUM = 0xFFFF
# (e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum)
_EHDR32 = struct.Struct("<HHIIIIIHHH")
_EHDR64 = struct.Struct("<HHIQQQIHHH")
_PHDR32 = struct.Struct("<IIIIIIII")  # type, offset, vaddr, paddr, filesz, memsz, flags, align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type


@dataclass(frozen=True)
class ElfSegment:
    """A PT_LOAD segment: ``data`` (its file bytes) goes to ``paddr``, zeros up to ``memsz``."""

    paddr: int
    vaddr: int
    memsz: int
    data: bytes | memoryview
    name: str

    @property
    def gpa(self) -> int:
        return self.paddr

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfNote:
    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    kind: str          # "ELF32" or "ELF64"
    machine: int
    entry: int         # e_entry as written (a virtual or a physical address)
    segments: tuple[ElfSegment, ...]
    notes: tuple[ElfNote, ...]

    def find_note(self, name: bytes, note_type: int) -> ElfNote | None:
        return next((note for note in self.notes if note.name == name and note.type == note_type),
                    None)


def is_elf(image: bytes) -> bool:
    return len(image) >= 16 and image[:4] == ELF_MAGIC


def _align4(value: int) -> int:
    return -(-value // 4) * 4


def _parse_notes(image: bytes, offset: int, size: int) -> list[ElfNote]:
    """The notes of one PT_NOTE segment, up to the first malformed one: a loader that does not
    use notes (Multiboot) must not refuse a kernel for them, and one that does finds none."""
    notes = []
    end = min(offset + size, len(image))
    while offset + _NOTE_HEADER.size <= end:
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(image, offset)
        name_at = offset + _NOTE_HEADER.size
        desc_at = name_at + _align4(namesz)
        next_at = desc_at + _align4(descsz)
        if desc_at + descsz > end:
            break
        name = bytes(image[name_at:name_at + namesz]).rstrip(b"\0")
        notes.append(ElfNote(name, note_type, bytes(image[desc_at:desc_at + descsz])))
        offset = next_at
    return notes


def parse_elf(image: bytes) -> ElfImage:
    """Check an x86 ELF executable's headers and list its loadable segments and notes."""
    if not is_elf(image):
        raise KernelImageError("the kernel is not an ELF file")
    elf_class, data_encoding = image[4], image[5]
    if elf_class == _ELFCLASS32:
        ehdr, phdr, machine, kind = _EHDR32, _PHDR32, EM_386, "ELF32"
    elif elf_class == _ELFCLASS64:
        ehdr, phdr, machine, kind = _EHDR64, _PHDR64, EM_X86_64, "ELF64"
    else:
        raise KernelImageError(f"the ELF file has an unknown class {elf_class} (not 32 or 64-bit)")
    if data_encoding != _ELFDATA2LSB:
        raise KernelImageError("the ELF file is not little-endian")
    if len(image) < 16 + ehdr.size:
        raise KernelImageError(f"the {kind} file is truncated inside its ELF header")
    (e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = ehdr.unpack_from(image, 16)
    if e_machine != machine:
        wanted = "EM_386" if machine == EM_386 else "EM_X86_64"
        raise KernelImageError(f"the {kind} file is for machine {e_machine}, not x86 ({wanted})")
    if e_type != _ET_EXEC:
        what = "position-independent (ET_DYN)" if e_type == _ET_DYN else f"of type {e_type}"
        raise KernelImageError(f"the {kind} file is {what}, not an executable (ET_EXEC)")
    if e_phnum == 0:
        raise KernelImageError(f"the {kind} file has no program headers")
    if e_phnum == _PN_XNUM:
        raise KernelImageError(
            f"the {kind} file uses extended program header numbering (e_phnum {_PN_XNUM:#x}), "
            f"which is not supported")
    if e_phentsize < phdr.size:
        raise KernelImageError(
            f"the {kind} file's program header size e_phentsize {e_phentsize} is smaller than "
            f"{phdr.size}")
    if e_phoff + e_phnum * e_phentsize > len(image):
        raise KernelImageError(
            f"the {kind} file's program headers ({e_phnum} at offset {e_phoff:#x}) run past the "
            f"end of the {len(image):#x}-byte file")

    view = memoryview(image)
    segments: list[ElfSegment] = []
    notes: list[ElfNote] = []
    for index in range(e_phnum):
        fields = phdr.unpack_from(image, e_phoff + index * e_phentsize)
        if phdr is _PHDR32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _pflags, _align = fields
        else:
            p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = fields
        if p_type == _PT_NOTE:
            notes += _parse_notes(image, p_offset, p_filesz)
            continue
        if p_type != _PT_LOAD:
            continue
        name = f"segment {index} (paddr {p_paddr:#x}, {p_memsz:#x} bytes)"
        if p_filesz > p_memsz:
            raise KernelImageError(
                f"ELF {name} has a file size {p_filesz:#x} larger than its memory size")
        if p_filesz and p_offset + p_filesz > len(image):
            raise KernelImageError(
                f"ELF {name} holds file bytes [{p_offset:#x}, {p_offset + p_filesz:#x}) past the "
                f"end of the {len(image):#x}-byte file")
        if p_memsz == 0:
            continue
        data = view[p_offset:p_offset + p_filesz] if p_filesz else b""
        segments.append(ElfSegment(p_paddr, p_vaddr, p_memsz, data, f"ELF {name}"))
    if not segments:
        raise KernelImageError(f"the {kind} file has no loadable (non-empty PT_LOAD) segment")
    return ElfImage(kind, e_machine, e_entry, tuple(segments), tuple(notes))
