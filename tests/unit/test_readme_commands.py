"""The README's two commands (install, tests) work as written, as root and as a user, and
.ci/run runs exactly them. The install line runs here against stand-ins for apt-get, sudo,
python3 and pip, which record how they were called: nothing is installed."""

import pathlib
import re
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_block(heading: str, language: str = "sh") -> str:
    """The first ```LANGUAGE block after the heading ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    match = re.search(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, f"no {language} block under {heading!r}"
    return match.group(1)


INSTALL = readme_block("## Install and run the built-in guest").strip()
TESTS = readme_block("## Run the tests").strip()


def test_ci_runs_the_readme_commands():
    proc = subprocess.run([str(ROOT / ".ci" / "run"), "--print"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [INSTALL, TESTS]


def test_readme_commands_use_the_virtual_environment():
    # No bare `hvvmm`/`pytest`: they exist only in .venv/bin until it is activated.
    assert re.search(r"(?<![/\w])hvvmm run", INSTALL) is None
    assert TESTS == ".venv/bin/python -m pytest"


STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
"""
PYTHON3_STUB = STUB + """if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    for tool in pip hvvmm; do
        printf '#!/bin/sh\\necho "%s $*" >> "$CALLS"\\n' "$3/bin/$tool" > "$3/bin/$tool"
        chmod +x "$3/bin/$tool"
    done
fi
"""


def run_install_line(tmp_path, with_sudo: bool) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    names = ["apt-get", "python3"] + (["sudo"] if with_sudo else [])
    for name in names:
        stub = bin_dir / name
        stub.write_text(PYTHON3_STUB if name == "python3" else
                        STUB + ('exec "$@"\n' if name == "sudo" else ""))
        stub.chmod(0o755)
    for tool in ("basename", "mkdir", "chmod"):  # what the stand-ins use; no sudo among them
        (bin_dir / tool).symlink_to(shutil.which(tool))
    calls = tmp_path / "calls"
    work = tmp_path / "clone"
    work.mkdir()
    bash = shutil.which("bash")
    proc = subprocess.run([bash, "-c", INSTALL], cwd=work, capture_output=True, text=True,
                          timeout=30, env={"PATH": str(bin_dir), "CALLS": str(calls)})
    assert proc.returncode == 0, proc.stderr
    return calls.read_text().splitlines()


def test_install_line_as_root_without_sudo(tmp_path):
    calls = run_install_line(tmp_path, with_sudo=False)
    assert calls[0] == "apt-get update"
    assert calls[1].startswith("apt-get install -y gcc python3-venv python3-dev linux-libc-dev ")
    assert calls[2] == "python3 -m venv .venv"
    assert calls[3:] == [".venv/bin/pip install -e .[test]", ".venv/bin/hvvmm run --smp 2"]


def test_install_line_as_a_user_with_sudo(tmp_path):
    calls = run_install_line(tmp_path, with_sudo=True)
    assert calls[0].startswith("sudo apt-get update") and "apt-get update" in calls[1]
    assert calls[2].startswith("sudo apt-get install -y gcc")
    assert not any(call.startswith("sudo") for call in calls[4:])  # pip and hvvmm: not as root


def test_the_install_line_installs_every_package_the_tests_require():
    """Tests fail, not skip, where a Debian tool they use is missing (tests/conftest.py's
    ``host_tool``), so the install line must install each package they name."""
    sources = "".join(path.read_text() for path in (ROOT / "tests").rglob("*.py"))
    named = set(re.findall(r'host_tool\("[^"]+", "([^"]+)"\)|Debian package ([a-z0-9.+-]+)',
                           sources))
    required = {package for pair in named for package in pair if package}
    assert {"qemu-utils", "busybox-static", "acpica-tools"} <= required  # the search works
    installed = set(re.search(r"apt-get install -y ([^&;]+)", INSTALL).group(1).split())
    assert required <= installed, required - installed
