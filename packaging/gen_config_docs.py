#!/usr/bin/env python3
"""Writes docs/configuration.md from mailfence.example.toml, whose comments are the source.

    python packaging/gen_config_docs.py           # rewrite docs/configuration.md
    python packaging/gen_config_docs.py --check   # exit 1 if it is out of date

How the example is read (keep writing it this way and every key is documented):
- The comment block at the top of the file, up to its first blank line, is the introduction.
- A `# ----` line separates sections. Comments between it and the next `[section]` or
  `[[section]]` header, and comments right after a header that end in a blank line, describe
  the section.
- A comment block directly above a key (no blank line between) describes that key, and every
  key that follows it without a blank line: `argon2_time_cost`, `argon2_memory_kib`, ...
- Each key's value in the example is its default.
- Comment lines indented past `# ` (e.g. `#   smtp://host:25  ...`) are kept as preformatted text.
- An array of tables (`[[listen]]`) is shown as written, commented-out keys included.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "mailfence.example.toml"
OUTPUT = ROOT / "docs" / "configuration.md"

_SEPARATOR = re.compile(r"^#\s*-{10,}\s*$")
_TABLE = re.compile(r"^\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
_ARRAY_TABLE = re.compile(r"^\[\[([A-Za-z0-9_.-]+)\]\]\s*(#.*)?$")
_KEY = re.compile(r"^([A-Za-z0-9_-]+)\s*=")


class ExampleError(Exception):
    """The example file is not written the way this generator reads it."""


@dataclass
class KeyGroup:
    doc: list[str]
    keys: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class Section:
    name: str  # "" for the top level
    array: bool = False
    notes: list[list[str]] = field(default_factory=list)  # comment blocks about the section
    groups: list[KeyGroup] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # an array of tables, as written


def _comment_text(line: str) -> str:
    text = line[1:]
    return text[1:] if text.startswith(" ") else text


def parse(text: str) -> tuple[list[str], list[Section]]:
    """The introduction and the sections, in file order."""
    tomllib.loads(text)  # a broken example must fail here, not produce odd documentation
    lines = text.splitlines()
    top = Section("")
    sections = [top]
    current = top
    pending: list[str] = []  # comment lines since the last blank line or key
    before_header: list[list[str]] = []  # comment blocks between a separator and a header
    after_separator = False
    previous_was_key = False
    intro: list[str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index].rstrip()
        index += 1
        if current.array and not _SEPARATOR.match(line) and not _TABLE.match(line):
            if line.strip() or current.raw:
                current.raw.append(line)
            continue
        if not line.strip():
            if pending:
                if intro is None and current is top and not top.groups:
                    intro = pending
                elif after_separator:
                    before_header.append(pending)
                else:
                    current.notes.append(pending)
            pending = []
            previous_was_key = False
            continue
        if _SEPARATOR.match(line):
            after_separator = True
            previous_was_key = False
            continue
        header = _ARRAY_TABLE.match(line) or _TABLE.match(line)
        if header:
            name = header.group(1)
            array = line.startswith("[[")
            current = Section(name, array=array, notes=before_header)
            if array:
                current.raw.append(line)
            sections.append(current)
            before_header, pending = [], []
            after_separator = previous_was_key = False
            continue
        if line.startswith("#"):
            pending.append(_comment_text(line))
            previous_was_key = False
            continue
        key = _KEY.match(line)
        if not key:
            raise ExampleError(f"line {index}: cannot read {line!r}")
        # The value may span lines (a long array): read until it parses.
        source = line
        while True:
            try:
                value = tomllib.loads(source)[key.group(1)]
                break
            except tomllib.TOMLDecodeError:
                if index >= len(lines):
                    raise ExampleError(f"line {index}: unterminated value") from None
                source += "\n" + lines[index]
                index += 1
        if pending:
            current.groups.append(KeyGroup(pending))
        elif not previous_was_key:
            where = f"[{current.name}] " if current.name else ""
            raise ExampleError(f"{where}{key.group(1)} has no comment above it; document it")
        current.groups[-1].keys.append((key.group(1), value))
        pending = []
        previous_was_key = True
    if pending:
        current.notes.append(pending)
    for section in sections:
        while section.raw and not section.raw[-1].strip():
            section.raw.pop()
    return intro or [], sections


def toml_value(value: Any) -> str:
    """A default as it would be written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def _escape(text: str) -> str:
    """Markdown outside `code` spans: '<' would start HTML, '*' and '_' emphasis."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace("*", "\\*")
        parts[i] = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", parts[i])
    return "`".join(parts)


def prose(lines: list[str]) -> str:
    """Comment lines as Markdown: paragraphs joined, indented lines kept as they are."""
    out: list[str] = []
    paragraph: list[str] = []
    literal: list[str] = []

    def flush_paragraph() -> None:
        if paragraph:
            out.append(_escape(" ".join(paragraph)))
            out.append("")
            paragraph.clear()

    def flush_literal() -> None:
        if literal:
            out.extend(["```text", *literal, "```", ""])
            literal.clear()

    for line in lines:
        if not line.strip():
            flush_paragraph()
            flush_literal()
        elif line.startswith(" "):
            flush_paragraph()
            literal.append(line.rstrip())
        else:
            flush_literal()
            paragraph.append(line.strip())
    flush_paragraph()
    flush_literal()
    return "\n".join(out).rstrip() + "\n"


def _title(section: Section) -> str:
    if not section.name:
        return "Top level"
    return f"`[[{section.name}]]`" if section.array else f"`[{section.name}]`"


def _anchor(section: Section) -> str:
    return section.name or "top-level"


def render(text: str) -> str:
    intro, sections = parse(text)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from mailfence.example.toml by packaging/gen_config_docs.py. Do not edit",
        "     this file: change the comments in mailfence.example.toml and run",
        "     `python packaging/gen_config_docs.py`. -->",
        "",
        prose(intro),
        "Sections: "
        + ", ".join(
            f"[{_title(s)}](#{_anchor(s)})" for s in sections if s.groups or s.raw or s.notes
        )
        + ".",
        "",
    ]
    for section in sections:
        if not (section.groups or section.raw or section.notes):
            continue
        out.extend([f"## {_title(section)}", ""])
        for note in section.notes:
            out.append(prose(note))
        if section.raw:
            out.extend(["Default:", "", "```toml", *section.raw, "```", ""])
        for group in section.groups:
            names = ", ".join(f"`{name}` = `{toml_value(value)}`" for name, value in group.keys)
            out.extend([f"- {names}", ""])
            body = prose(group.doc).rstrip("\n")
            out.extend("  " + line if line else "" for line in body.split("\n"))
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    rendered = render(EXAMPLE.read_text(encoding="utf-8"))
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != rendered:
            print(f"{OUTPUT} is out of date: run python packaging/gen_config_docs.py")
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(rendered, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
