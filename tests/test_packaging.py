"""packaging/mailfence.service: what the installer writes, and a unit systemd accepts.

`systemd-analyze verify` reads the unit as systemd would and reports every unknown key, bad
value, unknown section and missing executable. It exits 0 on most of them ("ignoring"), so
the test fails on any message, not just on the exit code. In the container CI runs in (Debian
12, systemd 252, no systemd running, no user mailfence) it prints nothing for the real unit,
so no message is filtered: nothing it reports here is an artefact of the container.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mailfence.cli import install

UNIT = Path(__file__).parent.parent / "packaging" / "mailfence.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).exists(),
    reason="systemd-analyze not installed (CI installs Debian's systemd package in .ci/run)",
)


def test_the_packaged_unit_is_what_the_installer_writes() -> None:
    assert UNIT.read_text() == install.unit_text(install.DEFAULT_BINARY), (
        "packaging/mailfence.service differs from mailfence/cli/install.py's UNIT; change "
        "UNIT and rewrite the file from it"
    )


def unit_in(tmp_path: Path, text: str) -> Path:
    """The unit as `mailfence install` would write it, its ExecStart a real executable."""
    binary = tmp_path / "mailfence"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    text = text.replace(f"ExecStart={install.DEFAULT_BINARY} ", f"ExecStart={binary} ")
    assert f"ExecStart={binary} serve" in text
    path = tmp_path / "mailfence.service"
    path.write_text(text)
    return path


def verify(path: Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=path.parent,
    )
    messages = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, messages


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    returncode, messages = verify(unit_in(tmp_path, UNIT.read_text()))
    assert returncode == 0 and messages == [], "\n".join(messages)


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("key", "broken"),
    [
        ("Type=notify", "Type=notyfy"),
        ("ProtectSystem=strict", "ProtectSystm=strict"),
        ("RestartSec=2s", "RestartSec=two seconds"),
        ("[Service]", "[Servce]"),
    ],
)
def test_verify_catches_a_broken_key(tmp_path: Path, key: str, broken: str) -> None:
    # The check above is only worth something if it fails on a real mistake.
    text = UNIT.read_text()
    assert f"\n{key}\n" in text
    returncode, messages = verify(unit_in(tmp_path, text.replace(f"\n{key}\n", f"\n{broken}\n")))
    assert returncode != 0 or messages, "systemd-analyze verify did not notice " + broken


@needs_systemd_analyze
def test_hardening_exposure_stays_low(tmp_path: Path) -> None:
    # `systemd-analyze security` scores the sandbox from 0 (locked down) to 10 (none); the
    # unit scores 2.2. Dropping a protection by accident pushes it over 2.5.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", "mailfence.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit_in(tmp_path, UNIT.read_text()).parent,
    )
    match = re.search(r"Overall exposure level for mailfence\.service: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score a unit offline: {result.stderr.strip()}")
    assert float(match.group(1)) <= 2.5, result.stdout
