"""docs/configuration.md is generated from mailfence.example.toml and must be current."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "mailfence.example.toml"
DOC = ROOT / "docs" / "configuration.md"


def generator() -> ModuleType:
    # Loaded by path: a folder named "packaging" must not shadow the `packaging` library.
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "packaging" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_is_up_to_date() -> None:
    render: Callable[[str], str] = generator().render
    expected = render(EXAMPLE.read_text(encoding="utf-8"))
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert current == expected, (
        "docs/configuration.md is out of date: run `python packaging/gen_config_docs.py`"
    )


def test_every_key_of_the_example_is_documented() -> None:
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    doc = DOC.read_text(encoding="utf-8")
    for name, value in example.items():
        if isinstance(value, dict):
            assert f"## `[{name}]`" in doc
            for key in value:
                assert f"`{key}` = `" in doc, f"{name}.{key} is missing"
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert f"## `[[{name}]]`" in doc
        else:
            assert f"`{name}` = `" in doc, f"{name} is missing"


def test_an_undocumented_key_is_refused() -> None:
    gen = generator()
    text = EXAMPLE.read_text(encoding="utf-8") + "\n[extra]\nsilent = 1\n"
    with pytest.raises(gen.ExampleError, match="silent has no comment"):
        gen.render(text)


def test_a_new_section_is_picked_up() -> None:
    text = EXAMPLE.read_text(encoding="utf-8") + (
        "\n# ----------------------------------------------------------------\n"
        "[extra]\n# How many widgets, at most.\nwidgets = 3\n"
        '# The grace period.\n# It repeats.\ngrace = "5m"\nrepeat = [\n  "1m",\n  "2m",\n]\n'
    )
    rendered = generator().render(text)
    assert "## `[extra]`" in rendered
    assert "- `widgets` = `3`\n\n  How many widgets, at most." in rendered
    assert '- `grace` = `"5m"`, `repeat` = `["1m", "2m"]`\n\n  The grace period. It repeats.' in (
        rendered
    )
