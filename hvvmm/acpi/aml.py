"""An AML encoder: the ASL constructs hvvmm's DSDT uses, as small composable objects.

Every construct has ``encode() -> bytes`` (and ``bytes(node)``). Containers (:class:`Scope`,
:class:`Device`, :class:`Method`) keep a list of children that code elsewhere may extend with
``append()`` before the table is built, so another device (a PCI host bridge with ``_PRT`` and
``_CRS``) is described by adding nodes to the DSDT, not by editing this module. Where a child is
expected, a Python ``int`` stands for the smallest integer encoding (as iasl emits it), a ``str``
for a String and ``bytes`` for already-encoded AML.

Names follow ASL (ACPI 6.5 §19.6) so a reader can hold the code against the ASL it produces:
``Device("COM1", Name("_HID", EisaId("PNP0501")), ...)``. Resource descriptors (§6.4) are
functions returning the descriptor's bytes; :func:`ResourceTemplate` wraps them in a Buffer with the
end tag.

Sources: ACPI Specification 6.5, §20.2 (AML grammar: §20.2.2 name objects, §20.2.3 data
objects, §20.2.4 PkgLength, §20.2.5 term objects) and §6.4 (resource data types); the encodings
are checked against iasl's output in tests/unit/test_aml.py.
"""

from __future__ import annotations

import struct
from typing import Iterable, Union

# Opcodes (ACPI 6.5 §20.3, "AML Byte Stream Byte Values").
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
LNOT_OP = 0x92
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C    # '\'
PARENT_PREFIX = 0x5E  # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

_NAME_LEAD = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHAR = _NAME_LEAD | set(b"0123456789")


class AmlError(ValueError):
    """A construct that has no valid AML encoding (bad name, value out of range, ...)."""


class Aml:
    """A piece of AML."""

    def encode(self) -> bytes:
        raise NotImplementedError

    def __bytes__(self) -> bytes:
        return self.encode()

    def __len__(self) -> int:
        return len(self.encode())


Term = Union[Aml, bytes, bytearray, int, str]


def encode(term: Term) -> bytes:
    """The AML of ``term``: an :class:`Aml` node, raw bytes, an int (smallest integer encoding)
    or a str (a String)."""
    if isinstance(term, Aml):
        return term.encode()
    if isinstance(term, (bytes, bytearray)):
        return bytes(term)
    if isinstance(term, bool):
        raise AmlError("use ONE/ZERO, not a bool")
    if isinstance(term, int):
        return Integer(term).encode()
    if isinstance(term, str):
        return String(term).encode()
    raise AmlError(f"not an AML term: {term!r}")


def pkg_length(body_length: int) -> bytes:
    """The PkgLength for ``body_length`` bytes that follow it; the length counts its own bytes
    (§20.2.4): one byte up to 63, else a lead byte (bits 7-6: how many bytes follow, bits 3-0:
    the low nibble) and 1-3 more bytes, little-endian, holding the rest."""
    if body_length + 1 < 0x40:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"package of {body_length} bytes is larger than PkgLength can encode")


def name_seg(segment: str) -> bytes:
    """A NameSeg (§20.2.2): a lead character A-Z or '_', then up to three of A-Z, 0-9, '_';
    padded with '_' to four characters."""
    raw = segment.encode("ascii", errors="replace") if isinstance(segment, str) else b""
    if not 1 <= len(raw) <= 4 or raw[0] not in _NAME_LEAD or any(c not in _NAME_CHAR for c in raw):
        raise AmlError(f"bad ACPI name segment {segment!r}")
    return raw.ljust(4, b"_")


class NameString(Aml):
    """A NameString (§20.2.2): ``"\\_SB.COM1"``, ``"^PCI0"``, ``"_HID"``; a root or parent
    prefix followed by dot-separated segments."""

    def __init__(self, path: str):
        if not isinstance(path, str) or not path:
            raise AmlError(f"bad ACPI name {path!r}")
        self.path = path
        prefix = b""
        rest = path
        if rest.startswith("\\"):
            prefix, rest = b"\\", rest[1:]
        else:
            while rest.startswith("^"):
                prefix, rest = prefix + b"^", rest[1:]
        segments = [name_seg(s) for s in rest.split(".")] if rest else []
        if len(segments) > 255:
            raise AmlError(f"ACPI name {path!r} has more than 255 segments")
        if not segments:
            body = bytes([NULL_NAME])
        elif len(segments) == 1:
            body = segments[0]
        elif len(segments) == 2:
            body = bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
        else:
            body = bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)
        self._encoded = prefix + body

    def encode(self) -> bytes:
        return self._encoded

    def __repr__(self) -> str:
        return f"NameString({self.path!r})"


def _name(name: str | NameString) -> bytes:
    return (name if isinstance(name, NameString) else NameString(name)).encode()


# -- data objects (§20.2.3) -------------------------------------------------------------------

class _Fixed(Aml):
    def __init__(self, data: bytes):
        self._data = data

    def encode(self) -> bytes:
        return self._data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Aml) and other.encode() == self._data

    def __hash__(self) -> int:
        return hash(self._data)


ZERO = _Fixed(bytes([ZERO_OP]))
ONE = _Fixed(bytes([ONE_OP]))
ONES = _Fixed(bytes([ONES_OP]))


def _check_range(value: int, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise AmlError(f"{what} {value!r} is not an unsigned {bits}-bit value")
    return value


class Byte(_Fixed):
    """ByteConst: 0x0A and one byte, whatever the value (use :class:`Integer` for iasl's
    smallest form)."""

    def __init__(self, value: int):
        super().__init__(bytes([BYTE_PREFIX, _check_range(value, 8, "Byte")]))


class Word(_Fixed):
    def __init__(self, value: int):
        super().__init__(bytes([WORD_PREFIX]) + struct.pack("<H", _check_range(value, 16, "Word")))


class DWord(_Fixed):
    def __init__(self, value: int):
        super().__init__(bytes([DWORD_PREFIX]) +
                         struct.pack("<I", _check_range(value, 32, "DWord")))


class QWord(_Fixed):
    def __init__(self, value: int):
        super().__init__(bytes([QWORD_PREFIX]) +
                         struct.pack("<Q", _check_range(value, 64, "QWord")))


class Integer(_Fixed):
    """An integer in the smallest encoding, as iasl emits a constant: Zero, One, then the
    byte/word/dword/qword prefixes. (Ones is not used for all-ones: its value depends on the
    DSDT revision, §19.6.98.)"""

    def __init__(self, value: int):
        _check_range(value, 64, "Integer")
        if value == 0:
            data = ZERO.encode()
        elif value == 1:
            data = ONE.encode()
        elif value <= 0xFF:
            data = Byte(value).encode()
        elif value <= 0xFFFF:
            data = Word(value).encode()
        elif value <= 0xFFFF_FFFF:
            data = DWord(value).encode()
        else:
            data = QWord(value).encode()
        super().__init__(data)


class String(_Fixed):
    """A String (§20.2.3): 0x0D, ASCII characters 0x01-0x7F, NUL."""

    def __init__(self, text: str):
        if not all(0x01 <= ord(c) <= 0x7F for c in text):
            raise AmlError(f"AML strings hold ASCII 0x01-0x7F only: {text!r}")
        super().__init__(bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0")


def EisaId(text: str) -> DWord:
    """A compressed EISA ID (§19.6.35): three upper-case letters and four hex digits
    ("PNP0501") packed into 32 bits, stored as a DWord."""
    if (len(text) != 7 or not all("A" <= c <= "Z" for c in text[:3])
            or not all(c in "0123456789ABCDEF" for c in text[3:])):
        raise AmlError(f"bad EISA ID {text!r} (three capitals and four hex digits)")
    letters = [(ord(c) - 0x40) & 0x1F for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    # The ID is defined big-endian; AML integers are little-endian.
    return DWord(int.from_bytes(value.to_bytes(4, "big"), "little"))


class Buffer(Aml):
    """Buffer (§19.6.10): BufferOp PkgLength BufferSize ByteList."""

    def __init__(self, data: bytes | bytearray):
        self.data = bytes(data)

    def encode(self) -> bytes:
        body = Integer(len(self.data)).encode() + self.data
        return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


class Package(Aml):
    """Package (§19.6.102): PackageOp PkgLength NumElements elements (at most 255; larger ones
    need VarPackage, not used here)."""

    def __init__(self, *elements: Term):
        if len(elements) > 255:
            raise AmlError("a Package holds at most 255 elements")
        self.elements = list(elements)

    def encode(self) -> bytes:
        body = bytes([len(self.elements)]) + b"".join(encode(e) for e in self.elements)
        return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# -- named objects and containers -------------------------------------------------------------

class Name(Aml):
    """Name (§19.6.90): NameOp NameString DataRefObject."""

    def __init__(self, name: str | NameString, value: Term):
        self.name = name
        self.value = value

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + _name(self.name) + encode(self.value)


class _Container(Aml):
    def __init__(self, name: str | NameString, children: Iterable[Term]):
        self.name = name
        self.children: list[Term] = list(children)

    def append(self, *children: Term) -> "_Container":
        self.children.extend(children)
        return self

    def _body(self) -> bytes:
        return b"".join(encode(c) for c in self.children)


class Scope(_Container):
    """Scope (§19.6.122): ScopeOp PkgLength NameString TermList."""

    def __init__(self, name: str | NameString, *children: Term):
        super().__init__(name, children)

    def encode(self) -> bytes:
        body = _name(self.name) + self._body()
        return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


class Device(_Container):
    """Device (§19.6.31): ExtOpPrefix DeviceOp PkgLength NameString TermList."""

    def __init__(self, name: str | NameString, *children: Term):
        super().__init__(name, children)

    def encode(self) -> bytes:
        body = _name(self.name) + self._body()
        return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


class Method(_Container):
    """Method (§19.6.85): MethodOp PkgLength NameString MethodFlags TermList; the flags hold
    the argument count (bits 0-2), SerializeFlag (bit 3) and SyncLevel (bits 4-7)."""

    def __init__(self, name: str | NameString, arg_count: int, *body: Term,
                 serialized: bool = False, sync_level: int = 0):
        if not 0 <= arg_count <= 7 or not 0 <= sync_level <= 15:
            raise AmlError(f"bad Method arguments: {arg_count} args, sync level {sync_level}")
        super().__init__(name, body)
        self.flags = arg_count | (int(serialized) << 3) | (sync_level << 4)

    def encode(self) -> bytes:
        body = _name(self.name) + bytes([self.flags]) + self._body()
        return bytes([METHOD_OP]) + pkg_length(len(body)) + body


# -- a few statements (§19.6) ------------------------------------------------------------------

def Arg(index: int) -> _Fixed:
    """Arg0-Arg6 (§20.2.6.1)."""
    if not 0 <= index <= 6:
        raise AmlError(f"no Arg{index}")
    return _Fixed(bytes([ARG0_OP + index]))


def Local(index: int) -> _Fixed:
    """Local0-Local7 (§20.2.6.2)."""
    if not 0 <= index <= 7:
        raise AmlError(f"no Local{index}")
    return _Fixed(bytes([LOCAL0_OP + index]))


def Return(value: Term | NameString) -> bytes:
    """Return (§19.6.120): ReturnOp ArgObject. A :class:`NameString` returns the named object
    (a str is a String here, as everywhere)."""
    return bytes([RETURN_OP]) + encode(value)


def Store(source: Term, target: str | NameString | Aml) -> bytes:
    """Store (§19.6.132): StoreOp TermArg SuperName; a str target is a name."""
    target_aml = _name(target) if isinstance(target, (str, NameString)) else encode(target)
    return bytes([STORE_OP]) + encode(source) + target_aml


def LEqual(left: Term, right: Term) -> bytes:
    """LEqual (§19.6.71): LEqualOp Operand Operand."""
    return bytes([LEQUAL_OP]) + encode(left) + encode(right)


def LNot(operand: Term) -> bytes:
    """LNot (§19.6.75): LNotOp Operand."""
    return bytes([LNOT_OP]) + encode(operand)


class If(Aml):
    """If (§19.6.60): IfOp PkgLength Predicate TermList; ``orelse`` adds the Else that follows
    (§19.6.37: ElseOp PkgLength TermList). E.g. a ``_PRT`` that answers by interrupt model:
    ``If("PICF", Return("PRTA"), orelse=[Return("PRTP")])`` (a str predicate is a name)."""

    def __init__(self, predicate: Term | NameString, *body: Term,
                 orelse: Iterable[Term] | None = None):
        self.predicate = predicate
        self.body = list(body)
        self.orelse = None if orelse is None else list(orelse)

    def encode(self) -> bytes:
        predicate = (_name(self.predicate) if isinstance(self.predicate, (str, NameString))
                     else encode(self.predicate))
        body = predicate + b"".join(encode(t) for t in self.body)
        out = bytes([IF_OP]) + pkg_length(len(body)) + body
        if self.orelse is not None:
            orelse = b"".join(encode(t) for t in self.orelse)
            out += bytes([ELSE_OP]) + pkg_length(len(orelse)) + orelse
        return out


# -- resource descriptors (§6.4) ---------------------------------------------------------------

def IO(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """I/O Port Descriptor (§6.4.2.5): small item 0x47, 8 bytes."""
    return struct.pack("<BBHHBB", 0x47, int(decode16), _check_range(minimum, 16, "IO minimum"),
                       _check_range(maximum, 16, "IO maximum"),
                       _check_range(alignment, 8, "IO alignment"),
                       _check_range(length, 8, "IO length"))


def _irq_mask(irqs: Iterable[int]) -> int:
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise AmlError(f"ISA IRQ {irq} out of 0-15")
        mask |= 1 << irq
    return mask


def IRQNoFlags(*irqs: int) -> bytes:
    """IRQ Descriptor without the information byte (§6.4.2.1): 0x22 and the 16-bit mask; the
    IRQs are edge-triggered, active-high, exclusive."""
    return struct.pack("<BH", 0x22, _irq_mask(irqs))


def IRQ(*irqs: int, level: bool = False, active_low: bool = False,
        shared: bool = False) -> bytes:
    """IRQ Descriptor with the information byte (§6.4.2.1): 0x23, the mask, then bit 0
    edge (1) / level (0), bit 3 active low, bit 4 shared."""
    flags = (0 if level else 1) | (int(active_low) << 3) | (int(shared) << 4)
    return struct.pack("<BHB", 0x23, _irq_mask(irqs), flags)


def _large(tag: int, body: bytes) -> bytes:
    return struct.pack("<BH", tag, len(body)) + body


def Memory32Fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """32-bit Fixed Memory Range Descriptor (§6.4.3.4): large item 0x86."""
    return _large(0x86, struct.pack("<BII", int(writable), _check_range(base, 32, "base"),
                                    _check_range(length, 32, "length")))


def Interrupt(*gsis: int, consumer: bool = True, level: bool = True, active_low: bool = False,
              shared: bool = False, wake: bool = False) -> bytes:
    """Extended Interrupt Descriptor (§6.4.3.6): large item 0x89; flags bit 0 consumer,
    bit 1 edge (1) / level (0), bit 2 active low, bit 3 shared, bit 4 wake capable."""
    if not 1 <= len(gsis) <= 255:
        raise AmlError("an Interrupt descriptor lists 1-255 interrupts")
    flags = (int(consumer) | ((0 if level else 1) << 1) | (int(active_low) << 2)
             | (int(shared) << 3) | (int(wake) << 4))
    return _large(0x89, struct.pack("<BB", flags, len(gsis)) +
                  b"".join(struct.pack("<I", _check_range(g, 32, "GSI")) for g in gsis))


# Address space descriptors (§6.4.3.5): resource type, general flags, type-specific flags.
_RESOURCE_MEMORY, _RESOURCE_IO, _RESOURCE_BUS = 0, 1, 2


def _general_flags(producer: bool, min_fixed: bool, max_fixed: bool, subtractive: bool) -> int:
    # Bit 0: consumer (1) / producer (0); bit 1: subtractive decode; bit 2 MinFixed; bit 3 MaxFixed.
    return ((0 if producer else 1) | (int(subtractive) << 1) | (int(min_fixed) << 2)
            | (int(max_fixed) << 3))


def _address_space(tag: int, fmt: str, bits: int, resource_type: int, general: int,
                   specific: int, granularity: int, minimum: int, maximum: int,
                   translation: int, length: int) -> bytes:
    values = [_check_range(v, bits, what) for v, what in (
        (granularity, "granularity"), (minimum, "minimum"), (maximum, "maximum"),
        (translation, "translation"), (length, "length"))]
    return _large(tag, struct.pack("<BBB", resource_type, general, specific)
                  + struct.pack("<" + fmt * 5, *values))


def WordBusNumber(minimum: int, maximum: int, *, granularity: int = 0, translation: int = 0,
                  length: int | None = None, producer: bool = True, min_fixed: bool = True,
                  max_fixed: bool = True) -> bytes:
    """Word Address Space Descriptor for a bus-number range (§6.4.3.5.3, large item 0x88)."""
    length = maximum - minimum + 1 if length is None else length
    return _address_space(0x88, "H", 16, _RESOURCE_BUS,
                          _general_flags(producer, min_fixed, max_fixed, False), 0,
                          granularity, minimum, maximum, translation, length)


def WordIO(minimum: int, maximum: int, *, granularity: int = 0, translation: int = 0,
           length: int | None = None, producer: bool = True, min_fixed: bool = True,
           max_fixed: bool = True, entire_range: bool = True) -> bytes:
    """Word Address Space Descriptor for I/O ports (§6.4.3.5.3, large item 0x88); the I/O
    type-specific flags' bits 0-1 say which ISA ranges it decodes (3: the entire range)."""
    length = maximum - minimum + 1 if length is None else length
    return _address_space(0x88, "H", 16, _RESOURCE_IO,
                          _general_flags(producer, min_fixed, max_fixed, False),
                          3 if entire_range else 0,
                          granularity, minimum, maximum, translation, length)


# Memory type-specific flags (§6.4.3.5.5): bit 0 read/write, bits 1-2 cacheability.
MEM_NON_CACHEABLE, MEM_CACHEABLE, MEM_WRITE_COMBINING, MEM_PREFETCHABLE = 0, 1, 2, 3


def _memory_flags(writable: bool, cacheability: int) -> int:
    if not 0 <= cacheability <= 3:
        raise AmlError(f"bad cacheability {cacheability}")
    return int(writable) | (cacheability << 1)


def DWordMemory(minimum: int, maximum: int, *, granularity: int = 0, translation: int = 0,
                length: int | None = None, producer: bool = True, min_fixed: bool = True,
                max_fixed: bool = True, cacheability: int = MEM_NON_CACHEABLE,
                writable: bool = True) -> bytes:
    """DWord Address Space Descriptor for memory (§6.4.3.5.2, large item 0x87)."""
    length = maximum - minimum + 1 if length is None else length
    return _address_space(0x87, "I", 32, _RESOURCE_MEMORY,
                          _general_flags(producer, min_fixed, max_fixed, False),
                          _memory_flags(writable, cacheability),
                          granularity, minimum, maximum, translation, length)


def QWordMemory(minimum: int, maximum: int, *, granularity: int = 0, translation: int = 0,
                length: int | None = None, producer: bool = True, min_fixed: bool = True,
                max_fixed: bool = True, cacheability: int = MEM_NON_CACHEABLE,
                writable: bool = True) -> bytes:
    """QWord Address Space Descriptor for memory (§6.4.3.5.1, large item 0x8A)."""
    length = maximum - minimum + 1 if length is None else length
    return _address_space(0x8A, "Q", 64, _RESOURCE_MEMORY,
                          _general_flags(producer, min_fixed, max_fixed, False),
                          _memory_flags(writable, cacheability),
                          granularity, minimum, maximum, translation, length)


def EndTag() -> bytes:
    """End Tag (§6.4.2.9): 0x79 and a checksum byte; 0 means "no checksum", as iasl writes."""
    return bytes([0x79, 0x00])


def ResourceTemplate(*descriptors: bytes) -> Buffer:
    """ResourceTemplate (§19.3.3): a Buffer of the descriptors and the end tag."""
    return Buffer(b"".join(descriptors) + EndTag())
