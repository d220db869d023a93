"""Settings: defaults, and errors that name the file, the key and the fix."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from mailfence import config
from mailfence.config import Config, ConfigError


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mailfence.toml"
    path.write_text(text)
    return config.load(path)


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    error = caught.value
    assert str(tmp_path / "mailfence.toml") in str(error)
    assert "fix: " in str(error)
    return error


def test_no_file_means_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = config.load(None)
    assert settings == Config()
    assert [(x.address, x.tls) for x in settings.listen] == [
        ("127.0.0.1:2525", "starttls"),
        ("127.0.0.1:2465", "implicit"),
    ]
    assert settings.state_dir == Path("./mailfence-data")
    assert settings.relay.upstream == ""  # recipients' MX
    assert settings.auth.failure_reply == "temporary"


def test_mailfence_toml_in_the_working_directory_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mailfence.toml").write_text("[relay]\nmax_recipients = 7\n")
    monkeypatch.chdir(tmp_path)
    assert config.load(None).relay.max_recipients == 7


def test_relative_state_dir_is_taken_from_the_files_folder(tmp_path: Path) -> None:
    settings = load_text(tmp_path, 'state_dir = "data"\n')
    assert settings.state_dir == tmp_path / "data"


def test_full_form(tmp_path: Path) -> None:
    settings = load_text(
        tmp_path,
        """
state_dir = "/var/lib/mailfence"
[[listen]]
address = "[::1]:587"
tls = "starttls"
[tls]
cert = "/etc/ssl/relay.pem"
key = "/etc/ssl/relay.key"
[auth]
plaintext_networks = ["127.0.0.0/8", "::1/128"]
failure_reply = "permanent"
[relay]
upstream = "smtps://smtp.example.net:465"
upstream_username = "relay"
upstream_password_file = "/etc/mailfence/upstream.pw"
retry_schedule = ["30s", 120, "1h"]
max_queue_age = "2d"
""",
    )
    assert settings.listen[0].host == "::1" and settings.listen[0].port == 587
    assert settings.auth.failure_reply == "permanent"
    assert len(settings.auth.plaintext_networks) == 2
    assert settings.relay.retry_schedule == (30.0, 120.0, 3600.0)
    assert settings.relay.max_queue_age == 2 * 86400


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            "[relay]\nmax_recipent = 5\n",
            "relay.max_recipent",
            "did you mean 'relay.max_recipients'",
        ),
        ("colour = 1\n", "colour", "remove it"),
        ("[relay]\nmax_recipients = 'ten'\n", "relay.max_recipients", "whole number"),
        ("[relay]\nmax_recipients = 0\n", "relay.max_recipients", "out of range"),
        (
            "[defense]\nattack_refused_connections_per_second = 10001\n",
            "defense.attack_refused_connections_per_second",
            "from 0 to 10000",
        ),
        ("[relay]\nmax_queue_age = 'soon'\n", "relay.max_queue_age", "not a duration"),
        ("[relay]\nupstream = 'http://x'\n", "relay.upstream", "smtp+starttls://"),
        ("[auth]\nfailure_reply = 'maybe'\n", "auth.failure_reply", "temporary"),
        ("[auth]\nplaintext_networks = ['lan']\n", "auth.plaintext_networks", "not a network"),
        ("[tls]\ncert = 'a.pem'\n", "tls.cert", "together"),
        ("[[listen]]\naddress = '2525'\n", "listen[0].address", "host:port"),
        ("[[listen]]\naddress = '127.0.0.1:25'\ntls = 'ssl'\n", "listen[0].tls", "implicit"),
        ("relay = 5\n", "relay", "section"),
        ("[relay\n", "(syntax)", "TOML"),
        (
            "[relay]\nupstream = 'smtps://h'\nupstream_username = 'u'\n",
            "relay.upstream_password_file",
            "password",
        ),
        (
            "[relay]\nupstream = 'smtp://h'\nupstream_username = 'u'\n",
            "relay.upstream",
            "in the clear",
        ),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = error_for(tmp_path, text)
    assert error.key == key
    assert words in str(error)
    assert "\n" not in str(error)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_example_file_documents_exactly_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).parent.parent / "mailfence.example.toml"
    settings = config.load(example)
    defaults = Config()
    monkeypatch.chdir(example.parent)
    # Same values, except where the file's own location makes them differ.
    assert settings.state_dir == example.parent / "mailfence-data"
    for section in ("listen", "tls", "smtp", "auth", "relay", "spool", "defense"):
        assert getattr(settings, section) == getattr(defaults, section), section
    # Every key the loader knows appears in the example (so none is undocumented).
    text = example.read_text()
    for section in ("smtp", "auth", "relay", "spool", "defense"):
        for field in getattr(defaults, section).__dataclass_fields__:
            assert f"\n{field} =" in text or f"\n# {field} =" in text, f"{section}.{field}"
    assert os.path.basename(example) == "mailfence.example.toml"


def test_commands_find_the_system_config_without_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "mailfence.toml"
    system.parent.mkdir()
    system.write_text('state_dir = "/var/lib/mailfence-test"\n')
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    monkeypatch.chdir(tmp_path)
    assert config.load(None).state_dir == Path("/var/lib/mailfence-test")
    (tmp_path / "mailfence.toml").write_text('state_dir = "here"\n')  # the local file first
    assert config.load(None).state_dir == tmp_path / "here"


def test_the_database_is_private(tmp_path: Path) -> None:
    import stat

    from mailfence.store import open_database

    old = os.umask(0o022)
    try:
        conn = open_database(tmp_path / "state")
    finally:
        os.umask(old)
    conn.close()
    mode = (tmp_path / "state" / "mailfence.sqlite3").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_a_reload_names_the_settings_it_cannot_apply() -> None:
    """SIGHUP applies what is read where it is used; the rest is named, never dropped."""
    old = config.Config()
    new = dataclasses.replace(
        old,
        smtp=dataclasses.replace(old.smtp, data_timeout=60.0),
        relay=dataclasses.replace(old.relay, upstream="smtp://10.0.0.1:25", delivery_process=False),
        defense=dataclasses.replace(old.defense, mode="monitor", failure_window=60.0),
        auth=dataclasses.replace(old.auth, verify_threads=4),
        state_dir=Path("/elsewhere"),
    )
    changed = config.changed_settings(old, new)
    assert sorted(changed) == [
        "auth.verify_threads",
        "defense.failure_window",
        "defense.mode",
        "relay.delivery_process",
        "relay.upstream",
        "smtp.data_timeout",
        "state_dir",
    ]
    assert sorted(config.needs_restart(changed)) == [
        "auth.verify_threads",
        "defense.failure_window",
        "relay.delivery_process",
        "state_dir",
    ]
    assert config.changed_settings(old, dataclasses.replace(old)) == []
    # What the reload hands on: the live changes, and the running value of everything else.
    applied = config.keep_running(old, new, config.needs_restart(changed))
    assert config.changed_settings(old, applied) == [
        "smtp.data_timeout",
        "relay.upstream",
        "defense.mode",
    ]
    assert applied.state_dir == old.state_dir and applied.relay.delivery_process is True
