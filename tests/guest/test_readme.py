"""README.md's library example and the pytest plugin, run as a user of an installed hvvmm would:
the code is taken from README.md, not copied here."""

import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.guest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_python_blocks(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_readme_library_example_runs_verbatim(tmp_path):
    example = readme_python_blocks("## Library")[0]
    assert "example_guest" in example
    script = tmp_path / "example.py"
    script.write_text(example)
    # In a directory of its own, as a user would run it; it builds its guest into a fresh cache.
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                       "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_readme_plugin_example_runs_under_pytest(tmp_path):
    """The plugin is found through its entry point (no conftest, no -p) and its fixtures build,
    boot and judge a guest."""
    example = readme_python_blocks("## Library")[1]
    assert "hvvmm_run_guest" in example
    (tmp_path / "test_example.py").write_text(example)
    (tmp_path / "test_more.py").write_text('''
import pytest
from hvvmm import ExitKind
from hvvmm.pytest_plugin import assert_guest_passed

ASM = """
    .globl main
main:
    mov $0xf4, %dx
    mov $3, %al
    out %al, %dx
1:  hlt
    jmp 1b
"""

def test_assembly_guest(hvvmm_build_guest, hvvmm_machine):
    machine = hvvmm_machine(kernel=hvvmm_build_guest(source=ASM, language="asm"))
    result = machine.run(timeout=30)
    assert result.kind is ExitKind.DEBUG_EXIT and result.code == 3
    with pytest.raises(AssertionError):
        assert_guest_passed(machine)

def test_failing_guest_fails(hvvmm_build_guest, hvvmm_run_guest):
    image = hvvmm_build_guest(
        source='#include "guest.h"\\nint main(void) { report(0, "x"); report_summary(); }')
    result, console = hvvmm_run_guest(image)
    with pytest.raises(AssertionError, match="FAIL"):
        assert_guest_passed(result, console)
''')
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout, proc.stdout
    assert (tmp_path / ".pytest_cache" / "d" / "hvvmm-guests").is_dir()  # the guest cache
