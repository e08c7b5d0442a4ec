"""The x86 decoder (hvvmm/x86/decode.py): known encodings, the lengths binutils gives, and
random bytes that must only ever raise DecodeError."""

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvvmm.x86.decode import (MODE16, MODE32, MODE64, DecodeError, InstructionTooLong,
                              TruncatedInstruction, UnsupportedInstruction, decode)

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


@pytest.mark.parametrize("hex_bytes, mnemonic, length", [
    ("cc", "int3", 1),
    ("cd80", "int", 2),
    ("f1", "int1", 1),
    ("9b", "fwait", 1),
    ("dbe3", "fninit", 2),
    ("dbe2", "fnclex", 2),
    ("0f01ca", "clac", 3),
    ("0f01cb", "stac", 3),
    ("0fae542404", "ldmxcsr", 5),            # ldmxcsr 4(%rsp): the Linux stop of issue 11
    ("0fae1d78563412", "stmxcsr", 7),        # stmxcsr 0x12345678(%rip)
    ("f3480faec3", "rdfsbase", 5),
    ("f30faecb", "rdgsbase", 4),
    ("f3480faed7", "wrfsbase", 5),
    ("f3410faedf", "wrgsbase", 5),
    ("0fc7f0", "rdrand", 3),
    ("480fc7f8", "rdseed", 4),
    ("f0480fc70e", "cmpxchg16b", 5),
    ("0fc70e", "cmpxchg8b", 3),
    ("f30fb8c1", "popcnt", 4),
    ("66f30fb8c1", "popcnt", 5),
    ("660f38820a", "invpcid", 5),
    ("0fae2c24", "xrstor", 4),
    ("480fae27", "xsave", 4),
    ("0fae37", "xsaveopt", 3),
    ("0f01d0", "xgetbv", 3),
    ("0fc72f", "xsaves", 3),
    ("2e3e66f3480fb8840080000000", "popcnt", 13),
])
def test_known_encodings(hex_bytes, mnemonic, length):
    insn = decode(bytes.fromhex(hex_bytes) + b"\x90" * 4)
    assert (insn.mnemonic, insn.length) == (mnemonic, length)
    assert insn.raw == bytes.fromhex(hex_bytes)


def test_operands_of_popcnt_with_sib_and_rex():
    # popcnt r9, [r12 + r13*8 - 8]: REX.WRXB = 4F
    insn = decode(bytes.fromhex("f34f0fb84cecf8"))
    assert insn.operand_size == 8 and insn.reg == 9 and insn.rm is None
    mem = insn.memory
    assert (mem.base, mem.index, mem.scale, mem.displacement) == (12, 13, 8, -8)
    assert mem.segment == "ds" and mem.address_size == 8


def test_stack_base_selects_ss_and_overrides_win():
    assert decode(bytes.fromhex("0fae542404")).memory.segment == "ss"   # [rsp+4]
    assert decode(bytes.fromhex("0fae5504")).memory.segment == "ss"     # [rbp+4]
    assert decode(bytes.fromhex("650fae5504")).memory.segment == "gs"   # gs:[rbp+4]
    assert decode(bytes.fromhex("410fae5504")).memory.segment == "ds"   # [r13+4] is not rbp


def test_rip_relative_and_sib_without_base():
    insn = decode(bytes.fromhex("0fae15f0ffffff"))
    assert insn.memory.rip_relative and insn.memory.displacement == -16
    insn = decode(bytes.fromhex("0fae1425" "00100000"))           # [disp32] via SIB, no base
    assert not insn.memory.rip_relative and insn.memory.base is None
    assert insn.memory.index is None and insn.memory.displacement == 0x1000
    insn = decode(bytes.fromhex("0fae1500100000"), MODE32)       # [disp32] outside 64-bit mode
    assert not insn.memory.rip_relative and insn.memory.displacement == 0x1000


def test_operand_and_address_size_by_mode():
    assert decode(bytes.fromhex("f30fb8c1"), MODE64).operand_size == 4
    assert decode(bytes.fromhex("f3480fb8c1"), MODE64).operand_size == 8
    assert decode(bytes.fromhex("f30fb8c1"), MODE32).operand_size == 4
    assert decode(bytes.fromhex("66f30fb8c1"), MODE32).operand_size == 2
    assert decode(bytes.fromhex("f30fb8c1"), MODE16).operand_size == 2
    assert decode(bytes.fromhex("670fae542404"), MODE64).memory.address_size == 4
    # 0x48 is DEC EAX outside 64-bit mode, not REX: not an instruction hvvmm knows.
    with pytest.raises(UnsupportedInstruction):
        decode(bytes.fromhex("480fc7f0"), MODE32)


def test_sixteen_bit_addressing():
    insn = decode(bytes.fromhex("0fae5204"), MODE16)  # ldmxcsr [bp+si+4]
    mem = insn.memory
    assert (mem.base, mem.index, mem.displacement, mem.segment, mem.address_size) == \
        (RBP, RSI, 4, "ss", 2)
    insn = decode(bytes.fromhex("0fae163412"), MODE16)  # [0x1234]
    assert insn.memory.base is None and insn.memory.displacement == 0x1234
    assert insn.length == 5


def test_rex_before_a_legacy_prefix_is_ignored():
    insn = decode(bytes.fromhex("48f30fb8c1"))  # REX.W, then F3: the REX does not count
    assert insn.mnemonic == "popcnt" and insn.operand_size == 4 and insn.rex == 0


def test_mandatory_prefix_selects_the_instruction():
    with pytest.raises(UnsupportedInstruction):
        decode(bytes.fromhex("f30fc7f8"))    # rdpid, not rdseed
    with pytest.raises(UnsupportedInstruction):
        decode(bytes.fromhex("0faec0"))      # no F3: not rdfsbase
    with pytest.raises(UnsupportedInstruction):
        decode(bytes.fromhex("0fb8c1"))      # jmpe/undefined without F3, not popcnt
    with pytest.raises(UnsupportedInstruction):
        decode(bytes.fromhex("0fc7c8"))      # cmpxchg8b has no register form


def test_truncated_and_too_long():
    with pytest.raises(TruncatedInstruction):
        decode(bytes.fromhex("f30fb8"))
    with pytest.raises(TruncatedInstruction):
        decode(b"")
    with pytest.raises(InstructionTooLong):
        decode(bytes.fromhex("66" * 14 + "f30fb8c1"))


@given(st.binary(max_size=20), st.sampled_from([MODE16, MODE32, MODE64]))
def test_random_bytes_decode_or_raise_decode_error(data, mode):
    try:
        insn = decode(data, mode)
    except DecodeError:
        return
    assert 1 <= insn.length <= 15 and insn.raw == data[:insn.length]


# -- lengths against binutils ------------------------------------------------------------------

SNIPPETS = [
    "int3", "int $0x80", "fninit", "fnclex", "clac", "fwait", "stac",  # (fwait; fninit = finit)
    "ldmxcsr 4(%rsp)", "stmxcsr -0x80(%rbp,%rcx,8)", "ldmxcsr 0x12345678(%rip)",
    "ldmxcsr %fs:0x10", "stmxcsr (%r13)", "ldmxcsr 0x7fffffff(%r12,%r15,2)",
    "rdfsbase %rax", "rdgsbase %r11d", "wrfsbase %r9", "wrgsbase %ecx",
    "rdrand %rax", "rdrand %r10w", "rdseed %esi",
    "lock cmpxchg16b (%rdi)", "cmpxchg16b 8(%rsp)", "lock cmpxchg8b 0x40(%rax,%rbx,4)",
    "popcnt %rcx, %rax", "popcnt (%rsi), %r8d", "popcnt %cx, %dx",
    "popcnt 0x1000(,%rax,4), %rbx", "invpcid (%rdx), %rax", "invpcid 8(%rsp), %r12",
    "addr32 ldmxcsr (%eax)", "xgetbv", "xsave64 0x40(%rdi)", "xrstor (%rsp)",
    "xsaveopt64 -0x200(%rbp)", "xsaves64 (%rax)", "xsavec (%rbx)", "xrstors64 8(%rcx)",
]


def test_lengths_match_objdump(tmp_path, host_tool):
    for program in ("as", "objcopy", "objdump"):  # binutils comes with gcc, as for the guests
        host_tool(program, "binutils")
    source = tmp_path / "snippets.s"
    source.write_text(".text\n" + "".join(f"{s}\n" for s in SNIPPETS))
    obj = tmp_path / "snippets.o"
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    raw = tmp_path / "snippets.bin"
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    listing = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", str(raw)],
                             check=True, capture_output=True, text=True).stdout
    offsets = []
    for line in listing.splitlines():
        head = line.split(":", 1)[0].strip()
        # "  off:\tbytes\tmnemonic"; a wrapped line of bytes has no mnemonic column
        if line.count("\t") >= 2 and head and all(c in "0123456789abcdef" for c in head):
            offsets.append(int(head, 16))
    code = raw.read_bytes()
    assert len(offsets) == len(SNIPPETS), listing
    ends = offsets[1:] + [len(code)]
    for snippet, start, end in zip(SNIPPETS, offsets, ends):
        insn = decode(code[start:end] + b"\x90" * 8)
        assert insn.length == end - start, (snippet, code[start:end].hex(" "))
