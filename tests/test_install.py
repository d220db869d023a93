"""`mailfence install systemd` into a temporary root: real files, modes, a config that loads."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailfence import config
from mailfence.cli import app
from mailfence.cli import install as installer

runner = CliRunner()
BINARY = "/usr/local/bin/mailfence"


def install(root: Path, *extra: str) -> str:
    result = runner.invoke(
        app, ["install", "systemd", "--root", str(root), "--binary", BINARY, *extra]
    )
    assert result.exit_code == 0, result.output
    return result.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def snapshot(root: Path) -> dict[Path, tuple[int, bytes]]:
    return {
        p: (p.stat().st_mode, p.read_bytes() if p.is_file() else b"") for p in files_under(root)
    }


def test_installs_into_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    output = install(root)

    unit = root / "etc/systemd/system/mailfence.service"
    assert unit.read_text() == installer.unit_text(BINARY)
    assert f"ExecStart={BINARY} serve --config /etc/mailfence/mailfence.toml" in unit.read_text()
    assert mode(unit) == 0o644
    assert mode(root / "var/lib/mailfence") == 0o700
    assert mode(root / "etc/mailfence") == 0o755
    toml = root / "etc/mailfence/mailfence.toml"
    assert mode(toml) == 0o644

    settings = config.load(toml)
    assert settings.state_dir == Path("/var/lib/mailfence")
    assert [(x.host, x.port, x.tls) for x in settings.listen] == [
        ("0.0.0.0", 587, "starttls"),
        ("0.0.0.0", 465, "implicit"),
    ]
    assert settings.tls.cert == "" and settings.relay.upstream == ""

    # No system user in a root that is not the system, and the operator is told so.
    assert "skipped (--root is not /)" in output
    assert "useradd --system --home-dir /var/lib/mailfence --shell /usr/sbin/nologin" in output
    for command in (
        "systemctl daemon-reload",
        "systemctl enable --now mailfence",
        "mailfence users add NAME --config /etc/mailfence/mailfence.toml",
        "mailfence status",
    ):
        assert command in output


def test_a_second_run_keeps_an_edited_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root)
    toml = root / "etc/mailfence/mailfence.toml"
    edited = toml.read_text().replace('hostname = ""', 'hostname = "smtp.example.com"')
    toml.write_text(edited)
    (root / "var/lib/mailfence").chmod(0o755)

    output = install(root)
    assert toml.read_text() == edited
    assert "kept as it is (never overwritten)" in output
    assert config.load(toml).smtp.hostname == "smtp.example.com"
    assert "is up to date" in output
    assert mode(root / "var/lib/mailfence") == 0o700  # the state directory is private again


def test_a_moved_binary_rewrites_the_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root)
    result = runner.invoke(
        app, ["install", "systemd", "--root", str(root), "--binary", "/opt/mailfence/mailfence"]
    )
    assert result.exit_code == 0, result.output
    assert "rewrote" in result.output
    unit = (root / "etc/systemd/system/mailfence.service").read_text()
    assert "ExecStart=/opt/mailfence/mailfence serve" in unit


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    output = install(root, "--dry-run")
    assert files_under(root) == []
    assert "would write" in output and "would create" in output
    assert "dry run: nothing was changed" in output

    # And over an existing installation: it only reports.
    install(root)
    before = snapshot(root)
    install(root, "--dry-run")
    assert snapshot(root) == before


def test_dry_run_on_the_system_changes_nothing(tmp_path: Path) -> None:
    # Safe to run anywhere: a dry run only reads. It shows the real-system plan, user included.
    unit = Path("/etc/systemd/system/mailfence.service")
    existed = unit.exists()
    binary = tmp_path / "mailfence"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    result = runner.invoke(app, ["install", "systemd", "--binary", str(binary), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert unit.exists() == existed
    if not installer._user_exists("mailfence"):
        assert "would create the system user: useradd --system" in result.output


def test_the_system_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = runner.invoke(app, ["install", "systemd", "--binary", BINARY])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "must run as root" in lines[0], result.output


def test_default_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", "/opt/mailfence/mailfence")
    assert installer._default_binary() == "/opt/mailfence/mailfence"
    monkeypatch.delattr(sys, "frozen")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "mailfence.pyz"), "install"])
    assert installer._default_binary() == str(tmp_path / "mailfence.pyz")
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "mailfence").write_text("#!/bin/sh\n")
    (on_path / "mailfence").chmod(0o755)
    monkeypatch.setattr(sys, "argv", ["mailfence"])
    monkeypatch.setenv("PATH", str(on_path))
    assert installer._default_binary() == str(on_path / "mailfence")


def test_exec_start_quoting() -> None:
    assert "ExecStart=/usr/local/bin/mailfence serve" in installer.unit_text(BINARY)
    quoted = installer.unit_text("/opt/mail fence/100%/mailfence")
    assert 'ExecStart="/opt/mail fence/100%%/mailfence" serve' in quoted
