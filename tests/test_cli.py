"""The command line: help everywhere, users and queue commands, clean errors."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mailfence import spool
from mailfence.cli import app

runner = CliRunner()


def all_commands() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = [[]]

    def walk(command: Any, prefix: list[str]) -> None:
        # Typer may bundle its own click, so look for subcommands rather than a class.
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(root, [])
    assert len(paths) > 10, paths  # the walk must have found the command tree
    return paths


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "mailfence")
def test_every_command_has_help_with_an_example(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example: mailfence" in result.output


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "mailfence.toml"
    path.write_text('state_dir = "state"\n[auth]\nargon2_time_cost = 1\nargon2_memory_kib = 1024\n')
    return path


def run(cfg: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "mailfence", *args, "--config", str(cfg)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("mailfence 0.")


def test_users_lifecycle(cfg: Path) -> None:
    secret = "s3cret-never-printed"
    added = run(
        cfg,
        "users",
        "add",
        "ops@example.com",
        "--password-stdin",
        "--sender",
        "*@example.com",
        "--sender",
        "alerts@example.net",
        stdin=secret + "\n",
    )
    assert added.returncode == 0, added.stderr
    listed = json.loads(run(cfg, "users", "list", "--json").stdout)
    assert listed == [
        {
            "name": "ops@example.com",
            "disabled": False,
            "senders": ["*@example.com", "alerts@example.net"],
        }
    ]
    assert run(cfg, "users", "disable", "ops@example.com").returncode == 0
    assert json.loads(run(cfg, "users", "list", "--json").stdout)[0]["disabled"] is True
    assert run(cfg, "users", "enable", "ops@example.com").returncode == 0
    assert (
        run(
            cfg, "users", "passwd", "ops@example.com", "--password-stdin", stdin="another\n"
        ).returncode
        == 0
    )
    table = run(cfg, "users", "list").stdout
    assert "ops@example.com" in table and "active" in table
    # The password is stored only as an argon2id hash.
    db = cfg.parent / "state" / "mailfence.sqlite3"
    assert secret.encode() not in db.read_bytes()
    conn = sqlite3.connect(db)
    [(stored,)] = conn.execute("SELECT password_hash FROM users").fetchall()
    conn.close()
    assert stored.startswith("$argon2id$")
    assert run(cfg, "users", "delete", "ops@example.com").returncode == 0
    assert json.loads(run(cfg, "users", "list", "--json").stdout) == []


def test_users_errors_are_one_line(cfg: Path) -> None:
    run(cfg, "users", "add", "a@example.com", "--password-stdin", stdin="pw\n")
    again = run(cfg, "users", "add", "a@example.com", "--password-stdin", stdin="pw\n")
    assert again.returncode == 1
    assert again.stderr.strip() == (
        "mailfence: user 'a@example.com' already exists (use 'users passwd' to change it)"
    )
    missing = run(cfg, "users", "passwd", "nobody@example.com", "--password-stdin", stdin="x\n")
    assert missing.returncode == 1 and "no user 'nobody@example.com'" in missing.stderr
    empty = run(cfg, "users", "add", "b@example.com", "--password-stdin", stdin="\n")
    assert empty.returncode == 1 and "empty" in empty.stderr
    bad_name = run(cfg, "users", "add", "has space", "--password-stdin", stdin="pw\n")
    assert bad_name.returncode == 1 and "not a valid user name" in bad_name.stderr


def test_password_prompt_asks_twice_hidden(cfg: Path) -> None:
    result = runner.invoke(
        app, ["users", "add", "p@example.com", "--config", str(cfg)], input="pw1\npw1\n"
    )
    assert result.exit_code == 0, result.output
    assert "pw1" not in result.output
    mismatch = runner.invoke(
        app, ["users", "add", "q@example.com", "--config", str(cfg)], input="a\nb\nc\nc\n"
    )
    assert "do not match" in mismatch.output


def test_queue_commands(cfg: Path) -> None:
    run(cfg, "users", "list")  # creates the database
    db = cfg.parent / "state" / "mailfence.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None)
    later = time.time() + 3600
    spool.insert(
        conn,
        "MSG1",
        "a@example.com",
        ["b@example.org", "c@example.org"],
        b"Subject: queued\r\n\r\nbody\r\n",
        "a@example.com",
        False,
        time.time(),
    )
    conn.execute("UPDATE spool SET next_attempt = ?", (later,))
    conn.close()

    listed = json.loads(run(cfg, "queue", "list", "--json").stdout)
    assert [m["id"] for m in listed] == ["MSG1"]
    assert [r["address"] for r in listed[0]["recipients"]] == ["b@example.org", "c@example.org"]
    assert "1 message(s) queued" in run(cfg, "queue", "list").stdout
    shown = json.loads(run(cfg, "queue", "show", "MSG1").stdout)
    assert shown["headers"] == "Subject: queued"
    assert "1 message(s) will be retried now" in run(cfg, "queue", "flush").stdout
    conn = sqlite3.connect(db)
    [(next_attempt,)] = conn.execute("SELECT next_attempt FROM spool").fetchall()
    conn.close()
    assert next_attempt < later
    assert run(cfg, "queue", "delete", "MSG1").returncode == 0
    gone = run(cfg, "queue", "show", "MSG1")
    assert gone.returncode == 1 and "no queued message 'MSG1'" in gone.stderr
    assert run(cfg, "queue", "delete", "MSG1").returncode == 1


def test_config_check_prints_the_effective_configuration(cfg: Path) -> None:
    result = run(cfg, "config", "check")
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["auth"]["argon2_time_cost"] == 1
    assert effective["state_dir"] == str(cfg.parent / "state")
    cfg.write_text("[relay]\nupstream = 'ftp://x'\n")
    bad = run(cfg, "config", "check")
    assert bad.returncode == 2 and "relay.upstream" in bad.stderr
