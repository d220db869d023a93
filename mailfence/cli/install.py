"""`mailfence install systemd`: the unit, the system user, the directories, a starter config.

Every step says what it does (or, with --dry-run, what it would do) and nothing is ever
overwritten that an operator may have edited: an existing config file is kept as it is. The
unit file is mailfence's own and is rewritten, so a second run after moving the binary
updates ExecStart. packaging/mailfence.service is this module's UNIT with the default binary;
a test keeps the two identical.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from mailfence.cli.common import fail

app = typer.Typer(
    help="Install mailfence as a system service.\n\nExample: mailfence install systemd",
    no_args_is_help=True,
)

SERVICE_USER = "mailfence"
STATE_DIR = "/var/lib/mailfence"
CONFIG_DIR = "/etc/mailfence"
CONFIG_FILE = f"{CONFIG_DIR}/mailfence.toml"
UNIT_FILE = "/etc/systemd/system/mailfence.service"
DEFAULT_BINARY = "/usr/local/bin/mailfence"
USERADD = [
    "useradd",
    "--system",
    "--home-dir",
    STATE_DIR,
    "--shell",
    "/usr/sbin/nologin",
    SERVICE_USER,
]

UNIT = """\
# mailfence under systemd. `mailfence install systemd` writes this file to
# /etc/systemd/system/mailfence.service with ExecStart pointing at the installed binary.
#
# Settings: /etc/mailfence/mailfence.toml (ConfigurationDirectory). State: /var/lib/mailfence
# (StateDirectory), which the config file must name as state_dir = "/var/lib/mailfence":
# the database (users, the mail queue, bans), the self-signed certificate and control.sock.
[Unit]
Description=mailfence SMTP submission relay
After=network-online.target
Wants=network-online.target

[Service]
# The relay says READY=1 once its listeners are bound, STATUS= on every health change,
# WATCHDOG=1 every WatchdogSec/2 and STOPPING=1 when it drains. NotifyAccess=all, not main:
# the PyInstaller one-file binary is a bootloader (systemd's main PID) that runs the relay
# as its child, and systemd would drop the child's READY=1 (start times out after 90 s).
# Every process in the unit is mailfence's own; only the relay itself sends anything.
Type=notify
NotifyAccess=all
ExecStart={binary} serve --config /etc/mailfence/mailfence.toml
# SIGHUP reloads users, the certificate and the settings that can change live.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
WatchdogSec=30s
# SIGTERM drains: sessions in DATA may finish within [smtp] shutdown_timeout (30 s), then
# delivery finishes its current attempt; keep this above shutdown_timeout.
TimeoutStopSec=45s
# SIGTERM to the main process only: it stops its delivery child itself, in order. Whatever is
# left when TimeoutStopSec runs out is killed, child included.
KillMode=mixed

User=mailfence
Group=mailfence
StateDirectory=mailfence
StateDirectoryMode=0700
ConfigurationDirectory=mailfence
WorkingDirectory=/var/lib/mailfence
UMask=0077
LimitNOFILE=65536

# Ports 465 and 587 are below 1024: that one capability and no other.
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE

# Hardening for a network daemon that writes only SQLite files and a Unix control socket in
# its state directory (ProtectSystem=strict leaves StateDirectory writable).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
# No memory both writable and executable. Checked with this unit under systemd 252 (and with
# the kernel's PR_SET_MDWE, which newer systemd uses) for the zipapp and the PyInstaller
# one-file binary, which unpacks into PrivateTmp and loads its libraries from there: argon2
# and cryptography are compiled extensions, and nothing creates cffi or ctypes callbacks.
# Remove this line if a future dependency fails with "Operation not permitted" on mmap.
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# A call outside the filter fails with EPERM (logged by the relay) instead of killing it.
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

STARTER_CONFIG = """\
# mailfence settings, written by `mailfence install systemd`. Every key, its default and what
# it is for: mailfence.example.toml (or docs/configuration.md) in mailfence's source. Check
# this file with:  mailfence config check --config /etc/mailfence/mailfence.toml
# After a change: systemctl reload mailfence (listen and state_dir need a restart).

# The systemd unit's StateDirectory: the database (users, the mail queue, bans), the
# self-signed certificate (tls/) and control.sock. Queued mail exists only here: back it up.
state_dir = "/var/lib/mailfence"

# Submission with STARTTLS (587) and implicit TLS (465), on every IPv4 address. For IPv6 add
# listeners such as address = "[::]:587". The unit grants CAP_NET_BIND_SERVICE for these.
[[listen]]
address = "0.0.0.0:587"
tls = "starttls"

[[listen]]
address = "0.0.0.0:465"
tls = "implicit"

[tls]
# Your certificate chain and key, PEM (e.g. /etc/letsencrypt/live/smtp.example.com/
# fullchain.pem and privkey.pem); both readable by the user mailfence. Empty: a self-signed
# certificate is made in /var/lib/mailfence/tls/ on first start. `systemctl reload mailfence`
# picks up a renewed certificate.
cert = ""
key = ""

[smtp]
# The name in the greeting and in Received: headers. Empty: this machine's host name; set it
# to the name clients connect to.
hostname = ""
"""


@dataclass
class Step:
    """One thing the installer does: what it would do, what it did, and the change itself.

    A step without a change only reports (something already in place, or skipped).
    """

    would: str
    did: str = ""
    change: Callable[[], None] | None = None


def unit_text(binary: str) -> str:
    return UNIT.format(binary=_exec_path(binary))


def _exec_path(binary: str) -> str:
    """A path as systemd's ExecStart= reads it: '%' and '$' escaped, quoted if it has spaces."""
    escaped = binary.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\" for c in escaped):
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def _default_binary() -> str | None:
    """The running executable if it is a frozen binary or a zipapp, else `mailfence` on PATH."""
    if getattr(sys, "frozen", False):
        return str(Path(sys.executable).absolute())
    if sys.argv and sys.argv[0].endswith(".pyz"):
        return str(Path(sys.argv[0]).absolute())
    found = shutil.which("mailfence")
    if found:
        return str(Path(found).absolute())
    # Started by path, e.g. .venv/bin/mailfence, with that folder not on PATH.
    started = Path(sys.argv[0]) if sys.argv else None
    if started is not None and started.name == "mailfence" and started.is_file():
        return str(started.absolute())
    return None


def _under(root: Path, path: str) -> Path:
    """`path` (absolute, as on the target system) inside `root`."""
    return root / path.lstrip("/")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _write(path: Path, text: str, mode: int) -> Callable[[], None]:
    def change() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.chmod(mode)
        temporary.replace(path)

    return change


def _directory(path: Path, mode: int, owner: str | None = None) -> Callable[[], None]:
    def change() -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)  # mkdir's mode is filtered by the umask, chmod's is not
        if owner is not None:
            user = pwd.getpwnam(owner)
            os.chown(path, user.pw_uid, user.pw_gid)

    return change


def _useradd() -> None:
    try:
        subprocess.run(USERADD, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        fail("useradd was not found; create the system user mailfence by hand and run again")
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines()
        fail(f"useradd failed ({detail[-1] if detail else f'exit {error.returncode}'})")


def _plan(root: Path, binary: str, is_system: bool) -> list[Step]:
    steps: list[Step] = []

    unit_path = _under(root, UNIT_FILE)
    unit = unit_text(binary)
    if not unit_path.exists():
        steps.append(
            Step(
                f"write {unit_path} (ExecStart={binary})",
                f"wrote {unit_path} (ExecStart={binary})",
                _write(unit_path, unit, 0o644),
            )
        )
    elif unit_path.read_text(encoding="utf-8") != unit:
        steps.append(
            Step(
                f"rewrite {unit_path} (ExecStart={binary})",
                f"rewrote {unit_path} (ExecStart={binary})",
                _write(unit_path, unit, 0o644),
            )
        )
    else:
        steps.append(Step(f"{unit_path} is up to date (ExecStart={binary})"))

    command = " ".join(USERADD)
    if not is_system:
        steps.append(Step(f"skipped (--root is not /): creating the system user: {command}"))
    elif _user_exists(SERVICE_USER):
        steps.append(Step(f"the system user {SERVICE_USER} exists"))
    else:
        steps.append(
            Step(
                f"create the system user: {command}",
                f"created the system user: {command}",
                _useradd,
            )
        )

    # The state directory belongs to the service user (systemd would hand it over on the
    # first start anyway), so that `runuser -u mailfence -- mailfence users add` works at once.
    state_owner = SERVICE_USER if is_system else None
    for directory, mode, owner in ((STATE_DIR, 0o700, state_owner), (CONFIG_DIR, 0o755, None)):
        path = _under(root, directory)
        what = f"mode {mode:04o}" + (f", owner {owner}" if owner else "")
        if path.is_dir():
            steps.append(
                Step(
                    f"set {path} to {what}",
                    f"{path} exists; set to {what}",
                    _directory(path, mode, owner),
                )
            )
        else:
            steps.append(
                Step(
                    f"create {path} ({what})",
                    f"created {path} ({what})",
                    _directory(path, mode, owner),
                )
            )

    config_path = _under(root, CONFIG_FILE)
    if config_path.exists():
        steps.append(Step(f"{config_path} exists: kept as it is (never overwritten)"))
    else:
        steps.append(
            Step(
                f"write a starter config {config_path} (listeners 0.0.0.0:587, 0.0.0.0:465)",
                f"wrote a starter config {config_path} (listeners 0.0.0.0:587, 0.0.0.0:465)",
                _write(config_path, STARTER_CONFIG, 0o644),
            )
        )
    return steps


NEXT_STEPS = f"""\
Next:
  systemctl daemon-reload
  systemctl enable --now mailfence
  runuser -u {SERVICE_USER} -- mailfence users add NAME --config {CONFIG_FILE}
  mailfence status --config {CONFIG_FILE}
Set tls.cert and tls.key in {CONFIG_FILE} to your certificate (every key: mailfence.example.toml).
Run commands that write the database as the user {SERVICE_USER} (runuser), so that every file
in {STATE_DIR} stays the service's own."""


@app.command("systemd")
def systemd(
    binary: Annotated[
        Path | None,
        typer.Option(
            "--binary",
            help="The mailfence executable ExecStart runs (path on the target system). "
            "Default: this binary if frozen or a .pyz, else mailfence on PATH.",
            show_default=False,
        ),
    ] = None,
    root: Annotated[
        Path,
        typer.Option("--root", help="Install into this directory instead of the system."),
    ] = Path("/"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print every action and change nothing.")
    ] = False,
) -> None:
    """Install the systemd unit, the mailfence user, its directories and a starter config.

    Writes /etc/systemd/system/mailfence.service, creates the system user mailfence,
    /var/lib/mailfence (0700) and /etc/mailfence, and /etc/mailfence/mailfence.toml unless
    it exists. Must run as root unless --root names another directory.

    Example: mailfence install systemd --binary /usr/local/bin/mailfence
    """
    is_system = root.resolve() == Path("/")
    if is_system and not dry_run and os.geteuid() != 0:
        fail("install systemd must run as root (or give --root DIR, or --dry-run)")
    if binary is None:
        found = _default_binary()
        if found is None:
            fail("cannot tell where the mailfence binary is; give --binary PATH")
        target = found
    else:
        target = str(binary if binary.is_absolute() or not is_system else binary.absolute())
    if not Path(target).is_absolute():
        fail(f"--binary must be an absolute path on the target system, got {target!r}")
    if is_system and not Path(target).is_file():
        fail(f"the binary {target} does not exist; give --binary PATH")
    if not is_system and not _under(root, target).is_file():
        typer.echo(f"note: {_under(root, target)} does not exist (yet)")

    for step in _plan(root, target, is_system):
        if step.change is None:
            typer.echo(step.would)
        elif dry_run:
            typer.echo(f"would {step.would}")
        else:
            step.change()
            typer.echo(step.did)
    if dry_run:
        typer.echo("dry run: nothing was changed")
    typer.echo(NEXT_STEPS)
