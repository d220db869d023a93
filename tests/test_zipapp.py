"""The shipped artefacts work outside the development venv.

The test builds dist/mailfence.pyz with shiv into a temporary folder and runs it the way an
operator would: through its `#!/usr/bin/env python3` line on the system's Python, from a
clean environment (no venv on PATH, HOME and SHIV_ROOT in a temporary folder). `smoke` is also
what `make dist-check` runs on dist/mailfence.pyz and the PyInstaller binary dist/mailfence:

    .venv/bin/python tests/test_zipapp.py dist/mailfence.pyz dist/mailfence
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
USER = "alice@example.com"
PASSWORD = "correct horse battery staple"
CONFIG = """\
state_dir = "state"
[[listen]]
address = "127.0.0.1:0"
tls = "starttls"
[[listen]]
address = "127.0.0.1:0"
tls = "implicit"
[smtp]
hostname = "relay.test"
shutdown_timeout = "5s"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 1024
[metrics]
listen = ""
"""
READY = re.compile(r"mailfence ready: starttls 127\.0\.0\.1:(\d+)")


@dataclass
class Smoke:
    artefact: Path
    size: int
    first_run_seconds: float  # `--version` with a fresh HOME: the zipapp unpacks itself first
    ready_seconds: float  # from exec of `serve` to the "mailfence ready" line


def clean_environment(home: Path) -> dict[str, str]:
    """What a service or a fresh login has: no venv, no pyenv, HOME of its own."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "SHIV_ROOT": str(home / ".shiv"),  # where the zipapp unpacks its compiled parts
        "TMPDIR": str(home),  # where the PyInstaller binary unpacks itself
        "LANG": "C.UTF-8",
    }


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split()
            found.extend(int(child) for child in children)
            pending.extend(int(child) for child in children)
    return found


def maps_uvloop(pid: int) -> bool:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return re.search(r"/uvloop/loop\.[^/\s]*\.so$", maps, re.MULTILINE) is not None


def smoke(artefact: Path, workdir: Path) -> Smoke:
    """--version, users add, serve, an AUTH over STARTTLS, top --once, SIGTERM → exit 0."""
    artefact = artefact.resolve()
    env = clean_environment(workdir)
    config = workdir / "mailfence.toml"
    config.write_text(CONFIG)

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(artefact), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            cwd=workdir,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result

    started = time.monotonic()
    assert run("--version").stdout.startswith("mailfence 0.")
    first_run_seconds = time.monotonic() - started
    run("users", "add", USER, "--password-stdin", "--config", str(config), stdin=PASSWORD + "\n")

    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [str(artefact), "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        port = 0
        deadline = started + 30
        while time.monotonic() < deadline and not port:
            match = READY.search(log_path.read_text())
            if match:
                port = int(match.group(1))
            elif process.poll() is not None:
                raise AssertionError(f"serve exited early:\n{log_path.read_text()}")
            else:
                time.sleep(0.01)
        ready_seconds = time.monotonic() - started
        assert port, f"no ready line within 30 s:\n{log_path.read_text()}"

        # argon2 (and the TLS stack) work: a real login against the hash `users add` made.
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # the relay's self-signed certificate
            client.starttls(context=context)
            code, _ = client.login(USER, PASSWORD)
            assert code == 235

        # uvloop runs in the relay and in its delivery child (a spawned process, which a
        # frozen binary must recognise). The PyInstaller binary is a bootloader whose child
        # is the relay, so look at the whole tree.
        # The child imports for a moment after the ready line.
        deadline = time.monotonic() + 15
        while True:
            tree = [process.pid, *descendants(process.pid)]
            with_uvloop = [pid for pid in tree if maps_uvloop(pid)]
            if len(with_uvloop) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(with_uvloop) >= 2, f"uvloop only in {with_uvloop} of {tree}"
        if artefact.suffix == ".pyz":  # the system's Python, not the venv's
            exe = os.path.realpath(f"/proc/{process.pid}/exe")
            assert exe == os.path.realpath(SYSTEM_PYTHON), exe

        frame = run("top", "--once", "--config", str(config))
        assert frame.stdout.strip(), "top --once printed nothing"

        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()
        assert "mailfence stopped" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return Smoke(artefact, artefact.stat().st_size, first_run_seconds, ready_seconds)


def build_zipapp(output: Path) -> None:
    """What `make dist` does for the zipapp: shiv from the venv, with pip's compiled wheels.

    From a copy of the sources, so the build leaves nothing in the work tree (and nothing
    stale from an earlier build/ can end up in the zipapp).
    """
    source = output.parent / "source"
    shutil.copytree(
        ROOT / "mailfence", source / "mailfence", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shiv = Path(sys.executable).parent / "shiv"
    subprocess.run(
        [
            str(shiv),
            "--entry-point",
            "mailfence.cli:main",
            "--python",
            "/usr/bin/env python3",
            "--compressed",
            "--reproducible",
            "--output-file",
            str(output),
            "--quiet",
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not SYSTEM_PYTHON.exists(), reason="needs the system's Python 3.11 at /usr/bin/python3"
)
def test_zipapp_runs_on_the_system_python(tmp_path: Path) -> None:
    pyz = tmp_path / "mailfence.pyz"
    build_zipapp(pyz)
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = smoke(pyz, workdir)
    assert result.ready_seconds < 30


@pytest.mark.slow
def test_pyinstaller_binary_runs(tmp_path: Path) -> None:
    """The one-file binary, built as `make dist-binary` does, smoke-tested the same way."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            str(Path(sys.executable).parent / "pyinstaller"),
            "--noconfirm",
            "--log-level",
            "WARN",
            "--distpath",
            str(tmp_path / "dist"),
            "--workpath",
            str(tmp_path / "build"),
            str(root / "packaging" / "mailfence.spec"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=tmp_path,
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = smoke(tmp_path / "dist" / "mailfence", workdir)
    assert result.ready_seconds < 30


def main(paths: list[str]) -> None:
    """`make dist-check`: smoke-test each artefact, three starts each, and print the figures."""
    for name in paths:
        for attempt in (1, 2, 3):
            with tempfile.TemporaryDirectory() as folder:
                # A fresh HOME each time: the first start of the zipapp unpacks it.
                result = smoke(Path(name), Path(folder))
            print(
                f"{name}: ok (run {attempt}); {result.size / 1e6:.1f} MB; "
                f"first --version {result.first_run_seconds:.2f} s; "
                f"serve exec to ready {result.ready_seconds:.2f} s"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
