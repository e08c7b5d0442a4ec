"""A small x86 instruction decoder for the instructions hvvmm completes in user space.

It knows the whole encoding frame (Intel SDM vol. 2A, chapter 2): legacy prefixes (66, 67, F2,
F3, F0, segment overrides), REX (64-bit mode only, and only right before the opcode), the
one-byte, 0F, 0F38 and 0F3A opcode maps, ModRM, SIB, displacements (RIP-relative in 64-bit mode,
the 16-bit forms of real and 16-bit protected mode), operand and address size. It knows the
opcodes themselves only for :data:`OPCODES`, the instructions :mod:`hvvmm.x86.complete` has a
handler for (and a few it recognises but refuses, such as the xsave family), so it can give their
exact length; any other opcode is :class:`UnsupportedInstruction`.

Every failure is a :class:`DecodeError`; the bytes are guest-supplied, so nothing else may
escape (a hypothesis test feeds it random byte strings).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_INSTRUCTION_LENGTH = 15  # SDM vol. 2A 2.3.11: longer is #GP (or #UD)

# Register numbers (ModRM.reg / rm / SIB with the REX extension bits).
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# Segment registers in their encoding order (SDM vol. 2A 3.1.1.3 "Sreg").
ES, CS, SS, DS, FS, GS = "es", "cs", "ss", "ds", "fs", "gs"
_SEGMENT_PREFIXES = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}

# Opcode maps.
MAP_ONE_BYTE, MAP_0F, MAP_0F38, MAP_0F3A = 0, 1, 2, 3
_MAP_NAMES = {MAP_ONE_BYTE: "", MAP_0F: "0f ", MAP_0F38: "0f 38 ", MAP_0F3A: "0f 3a "}


class DecodeError(ValueError):
    """The bytes are not an instruction this decoder can take apart."""


class TruncatedInstruction(DecodeError):
    """The bytes end before the instruction does."""


class InstructionTooLong(DecodeError):
    """More than 15 bytes (the CPU raises #GP for that)."""


class UnsupportedInstruction(DecodeError):
    """A well-formed frame whose opcode is not in :data:`OPCODES`."""


@dataclass(frozen=True)
class CpuMode:
    """The execution mode decoding depends on: 64-bit mode (EFER.LMA and CS.L), else CS.D
    selects 32- or 16-bit defaults (real and virtual-8086 mode are 16-bit)."""

    long64: bool = True
    default32: bool = True

    @property
    def bits(self) -> int:
        return 64 if self.long64 else 32 if self.default32 else 16


MODE64 = CpuMode(True, True)
MODE32 = CpuMode(False, True)
MODE16 = CpuMode(False, False)


@dataclass(frozen=True)
class MemoryOperand:
    """``segment:[base + index*scale + displacement]``, computed in ``address_size`` bytes.
    ``base``/``index`` are register numbers (0-15) or None; ``rip_relative`` adds the address
    of the next instruction instead of a base."""

    segment: str
    base: int | None
    index: int | None
    scale: int
    displacement: int
    address_size: int
    rip_relative: bool = False


@dataclass(frozen=True)
class OpcodeSpec:
    """What the decoder must know about one opcode: whether a ModRM byte follows, the immediate
    size, and which ModRM forms exist (register only, memory only, or both)."""

    mnemonic: str
    modrm: bool = False
    immediate: int = 0
    forms: str = "any"  # "any", "reg" (mod == 3 only) or "mem" (mod != 3 only)


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction."""

    mnemonic: str
    length: int
    map: int
    opcode: int
    mode: CpuMode
    operand_size: int          # 2, 4 or 8 bytes
    address_size: int          # 2, 4 or 8 bytes
    rex: int                   # 0 when absent
    lock: bool
    rep: int | None            # 0xF3, 0xF2 (the last one given) or None
    operand_override: bool     # a 66 prefix was present
    segment_override: str | None
    modrm: int | None
    reg: int | None            # ModRM.reg with REX.R (0-15)
    rm: int | None             # register number when mod == 3 (with REX.B)
    memory: MemoryOperand | None
    immediate: int | None
    raw: bytes

    @property
    def mod(self) -> int | None:
        return None if self.modrm is None else self.modrm >> 6

    @property
    def modrm_reg_field(self) -> int | None:
        """ModRM bits 5:3 without REX.R: the /digit of group opcodes."""
        return None if self.modrm is None else (self.modrm >> 3) & 7

    @property
    def rex_w(self) -> bool:
        return bool(self.rex & 8)

    def describe(self) -> str:
        return f"{self.mnemonic} ({self.raw.hex(' ')})"


def _key(opcode_map: int, opcode: int, prefix: int | None = None, digit: int | None = None,
         mod3: bool | None = None, rm: int | None = None) -> tuple:
    return (opcode_map, opcode, prefix, digit, mod3, rm)


# The instructions hvvmm knows. Keyed by (map, opcode, mandatory prefix, /digit, mod == 3, rm);
# lookup tries the most specific key first. Mandatory prefixes: 0x66, 0xF3, 0xF2 (SDM 2.1.2).
OPCODES: dict[tuple, OpcodeSpec] = {
    _key(MAP_ONE_BYTE, 0xCC): OpcodeSpec("int3"),
    _key(MAP_ONE_BYTE, 0xCD): OpcodeSpec("int", immediate=1),
    _key(MAP_ONE_BYTE, 0xCE): OpcodeSpec("into"),
    _key(MAP_ONE_BYTE, 0xF1): OpcodeSpec("int1"),
    _key(MAP_ONE_BYTE, 0x9B): OpcodeSpec("fwait"),
    _key(MAP_ONE_BYTE, 0xDB, None, 4, True, 2): OpcodeSpec("fnclex", modrm=True, forms="reg"),
    _key(MAP_ONE_BYTE, 0xDB, None, 4, True, 3): OpcodeSpec("fninit", modrm=True, forms="reg"),
    _key(MAP_0F, 0x01, None, 2, True, 0): OpcodeSpec("xgetbv", modrm=True, forms="reg"),
    _key(MAP_0F, 0x01, None, 1, True, 2): OpcodeSpec("clac", modrm=True, forms="reg"),
    _key(MAP_0F, 0x01, None, 1, True, 3): OpcodeSpec("stac", modrm=True, forms="reg"),
    _key(MAP_0F, 0xAE, None, 2, False): OpcodeSpec("ldmxcsr", modrm=True, forms="mem"),
    _key(MAP_0F, 0xAE, None, 3, False): OpcodeSpec("stmxcsr", modrm=True, forms="mem"),
    _key(MAP_0F, 0xAE, None, 4, False): OpcodeSpec("xsave", modrm=True, forms="mem"),
    _key(MAP_0F, 0xAE, None, 5, False): OpcodeSpec("xrstor", modrm=True, forms="mem"),
    _key(MAP_0F, 0xAE, None, 6, False): OpcodeSpec("xsaveopt", modrm=True, forms="mem"),
    _key(MAP_0F, 0xAE, 0xF3, 0, True): OpcodeSpec("rdfsbase", modrm=True, forms="reg"),
    _key(MAP_0F, 0xAE, 0xF3, 1, True): OpcodeSpec("rdgsbase", modrm=True, forms="reg"),
    _key(MAP_0F, 0xAE, 0xF3, 2, True): OpcodeSpec("wrfsbase", modrm=True, forms="reg"),
    _key(MAP_0F, 0xAE, 0xF3, 3, True): OpcodeSpec("wrgsbase", modrm=True, forms="reg"),
    _key(MAP_0F, 0xC7, None, 1, False): OpcodeSpec("cmpxchg8b", modrm=True, forms="mem"),
    _key(MAP_0F, 0xC7, None, 3, False): OpcodeSpec("xrstors", modrm=True, forms="mem"),
    _key(MAP_0F, 0xC7, None, 4, False): OpcodeSpec("xsavec", modrm=True, forms="mem"),
    _key(MAP_0F, 0xC7, None, 5, False): OpcodeSpec("xsaves", modrm=True, forms="mem"),
    _key(MAP_0F, 0xC7, None, 6, True): OpcodeSpec("rdrand", modrm=True, forms="reg"),
    _key(MAP_0F, 0xC7, None, 7, True): OpcodeSpec("rdseed", modrm=True, forms="reg"),
    _key(MAP_0F, 0xB8, 0xF3): OpcodeSpec("popcnt", modrm=True),
    _key(MAP_0F38, 0x82, 0x66): OpcodeSpec("invpcid", modrm=True, forms="mem"),
}


def _lookup(opcode_map: int, opcode: int, prefix: int | None,
            modrm: int | None) -> OpcodeSpec | None:
    if modrm is None:
        return OPCODES.get(_key(opcode_map, opcode, prefix))
    digit, mod3, rm = (modrm >> 3) & 7, modrm >> 6 == 3, modrm & 7
    for key in (_key(opcode_map, opcode, prefix, digit, mod3, rm),
                _key(opcode_map, opcode, prefix, digit, mod3),
                _key(opcode_map, opcode, prefix)):
        spec = OPCODES.get(key)
        if spec is not None:
            return spec
    return None


_HAS_MODRM = {(m, op) for (m, op, *_rest), spec in OPCODES.items() if spec.modrm}


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= MAX_INSTRUCTION_LENGTH:
            raise InstructionTooLong(f"longer than {MAX_INSTRUCTION_LENGTH} bytes")
        if self.pos >= len(self.data):
            raise TruncatedInstruction(f"instruction bytes end after {self.pos}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def signed(self, size: int) -> int:
        value = self.unsigned(size)
        top = 1 << (8 * size - 1)
        return value - (top << 1) if value & top else value

    def unsigned(self, size: int) -> int:
        value = 0
        for shift in range(0, 8 * size, 8):
            value |= self.byte() << shift
        return value


def decode(data: bytes, mode: CpuMode = MODE64) -> Instruction:
    """Decode the instruction at the start of ``data`` (up to 15 bytes are looked at)."""
    reader = _Reader(bytes(data[:MAX_INSTRUCTION_LENGTH + 1]))
    operand_override = address_override = lock = False
    rep: int | None = None
    mandatory: int | None = None  # the last of 66/F2/F3 (SDM 2.1.2: F2/F3 win over 66)
    segment: str | None = None
    rex = 0
    while True:
        byte = reader.byte()
        if byte == 0x66:
            operand_override = True
            if mandatory is None:
                mandatory = 0x66
        elif byte == 0x67:
            address_override = True
        elif byte in (0xF2, 0xF3):
            rep = mandatory = byte
        elif byte == 0xF0:
            lock = True
        elif byte in _SEGMENT_PREFIXES:
            segment = _SEGMENT_PREFIXES[byte]
        elif mode.long64 and 0x40 <= byte <= 0x4F:
            rex = byte
            byte = reader.byte()
            if byte in (0x66, 0x67, 0xF0, 0xF2, 0xF3) or byte in _SEGMENT_PREFIXES \
                    or 0x40 <= byte <= 0x4F:
                # A REX not immediately before the opcode is ignored (SDM 2.2.1).
                reader.pos -= 1
                rex = 0
                continue
            break
        else:
            break
        continue

    opcode_map = MAP_ONE_BYTE
    if byte == 0x0F:
        byte = reader.byte()
        opcode_map = MAP_0F
        if byte == 0x38:
            opcode_map, byte = MAP_0F38, reader.byte()
        elif byte == 0x3A:
            opcode_map, byte = MAP_0F3A, reader.byte()
    opcode = byte
    mandatory_prefix = mandatory if opcode_map != MAP_ONE_BYTE else None

    modrm: int | None = None
    if (opcode_map, opcode) in _HAS_MODRM:
        modrm = reader.byte()
    spec = _lookup(opcode_map, opcode, mandatory_prefix, modrm)
    if spec is None and mandatory_prefix is not None:
        spec = _lookup(opcode_map, opcode, None, modrm)
        if spec is not None and mandatory_prefix != 0x66:
            spec = None  # F2/F3 select a different instruction here (e.g. F3 0F C7 /7 rdpid)
    if spec is None:
        shown = reader.data[:reader.pos].hex(" ")
        raise UnsupportedInstruction(
            f"opcode {_MAP_NAMES[opcode_map]}{opcode:02x} ({shown}) is not one hvvmm completes")

    if mode.long64:
        operand_size = 8 if rex & 8 else 2 if operand_override else 4
        address_size = 4 if address_override else 8
    else:
        operand_size = 4 if mode.default32 != operand_override else 2
        address_size = 4 if mode.default32 != address_override else 2

    reg = rm = None
    memory = None
    if modrm is not None:
        mod = modrm >> 6
        if spec.forms == "reg" and mod != 3 or spec.forms == "mem" and mod == 3:
            form = "memory" if mod != 3 else "register"
            raise UnsupportedInstruction(f"{spec.mnemonic}: no {form} form")
        reg = ((modrm >> 3) & 7) | (8 if rex & 4 else 0)
        if mod == 3:
            rm = (modrm & 7) | (8 if rex & 1 else 0)
        else:
            memory = _memory_operand(reader, modrm, rex, address_size, segment, mode)

    immediate = reader.unsigned(spec.immediate) if spec.immediate else None
    length = reader.pos
    mnemonic = spec.mnemonic
    if mnemonic == "cmpxchg8b" and rex & 8:
        mnemonic = "cmpxchg16b"  # REX.W selects the 16-byte form (SDM vol. 2 CMPXCHG8B/16B)
    return Instruction(mnemonic, length, opcode_map, opcode, mode, operand_size,
                       address_size, rex, lock, rep, operand_override, segment, modrm, reg, rm,
                       memory, immediate, reader.data[:length])


_MODRM16 = {  # rm -> (base, index) for 16-bit addressing (SDM vol. 2A table 2-1)
    0: (RBX, RSI), 1: (RBX, RDI), 2: (RBP, RSI), 3: (RBP, RDI),
    4: (RSI, None), 5: (RDI, None), 6: (RBP, None), 7: (RBX, None),
}


def _memory_operand(reader: _Reader, modrm: int, rex: int, address_size: int,
                    segment: str | None, mode: CpuMode) -> MemoryOperand:
    mod, rm = modrm >> 6, modrm & 7
    if address_size == 2:
        if mod == 0 and rm == 6:
            return MemoryOperand(segment or DS, None, None, 1, reader.signed(2), 2)
        base, index = _MODRM16[rm]
        displacement = reader.signed(1) if mod == 1 else reader.signed(2) if mod == 2 else 0
        default = SS if base == RBP else DS
        return MemoryOperand(segment or default, base, index, 1, displacement, 2)

    base: int | None
    index: int | None = None
    scale = 1
    rip_relative = False
    if rm == 4:
        sib = reader.byte()
        scale = 1 << (sib >> 6)
        index_number = ((sib >> 3) & 7) | (8 if rex & 2 else 0)
        index = None if index_number == RSP else index_number  # no index (SDM table 2-3)
        base_low = sib & 7
        if base_low == RBP and mod == 0:
            base = None
            displacement = reader.signed(4)
        else:
            base = base_low | (8 if rex & 1 else 0)
            displacement = 0
    elif rm == 5 and mod == 0:
        base = None
        displacement = reader.signed(4)
        rip_relative = mode.long64
    else:
        base = rm | (8 if rex & 1 else 0)
        displacement = 0
    if mod == 1:
        displacement = reader.signed(1)
    elif mod == 2:
        displacement = reader.signed(4)
    default = SS if base in (RSP, RBP) else DS
    return MemoryOperand(segment or default, base, index, scale, displacement, address_size,
                         rip_relative)
