"""The operator's documents cannot drift from the code.

The README's configuration table is generated from `relay.config`: when a variable changes,
regenerate it with `RELAY_UPDATE_DOCS=1 .venv/bin/pytest tests/test_docs.py`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import pytest
from pydantic_core import PydanticUndefined

from relay.ops.cli import main
from relay.settings import Settings, documented_variables, env_var

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
ASSIGNMENT = re.compile(r"^#?\s*(RELAY_[A-Z0-9_]+)=")


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return "(empty)"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "(unset)"
    if value == "":
        return "(empty)"
    return f"`{value}`"


def config_table() -> str:
    """The Markdown table of every RELAY_ variable, its default and its meaning."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    documented = documented_variables()
    for name in Settings.model_fields:
        variable = env_var(name)
        if variable not in documented:
            continue
        meaning = documented[variable].replace("|", "\\|")
        rows.append(f"| `{variable}` | {_default(name)} | {meaning} |")
    return "\n".join(rows)


def _readme_table(text: str) -> str:
    assert START in text, f"README.md lacks {START}"
    assert END in text, f"README.md lacks {END}"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_readme_config_table_matches_the_settings() -> None:
    text = README.read_text()
    expected = config_table()
    if os.environ.get("RELAY_UPDATE_DOCS") == "1":
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(f"{head}{START}\n{expected}\n{END}{tail}")
        text = README.read_text()
    assert _readme_table(text) == expected, (
        "README.md's configuration table is stale: "
        "RELAY_UPDATE_DOCS=1 .venv/bin/pytest tests/test_docs.py"
    )


def test_env_example_documents_every_variable_with_a_comment() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    found: list[str] = []
    for index, line in enumerate(lines):
        match = ASSIGNMENT.match(line)
        if not match:
            continue
        found.append(match.group(1))
        # The nearest line above that is not another assignment must be a comment.
        above = index - 1
        while above >= 0 and ASSIGNMENT.match(lines[above]):
            above -= 1
        assert above >= 0, f"{match.group(1)} has no comment"
        assert lines[above].startswith("# "), f"{match.group(1)} has no comment above it"
        assert above == index - 1, f"{match.group(1)} shares its comment with another variable"
    assert len(found) == len(set(found)), "a variable is listed twice"
    assert set(found) == set(documented_variables())


def test_env_example_loads_once_filled_in(tmp_path: Path, rsa_key_file: Path) -> None:
    """Filling in the blanks of .env.example gives a valid production configuration."""
    from relay.config import load_settings

    text = ENV_EXAMPLE.read_text()
    text = text.replace("/etc/formrelay/dkim-rsa.pem", str(rsa_key_file))
    text = text.replace("RELAY_SECRET_KEY=\n", "RELAY_SECRET_KEY=" + "k" * 40 + "\n")
    text = text.replace(
        "RELAY_HCAPTCHA_SITEKEY=\n", "RELAY_HCAPTCHA_SITEKEY=abcdef01-2345-6789-abcd-ef0123456789\n"
    )
    text = text.replace("RELAY_HCAPTCHA_SECRET=\n", "RELAY_HCAPTCHA_SECRET=0xsecret\n")
    env_file = tmp_path / "env"
    env_file.write_text(text)
    settings = load_settings({}, env_file=env_file)
    assert settings.env == "production"
    assert settings.support_address == "support@example.com"


def test_readme_starts_with_the_two_command_quickstart() -> None:
    text = README.read_text()
    first_block = re.search(r"```(?:sh|shell|bash|console)?\n(.*?)```", text, re.S)
    assert first_block is not None
    commands = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    # Nothing but the title and a sentence or two before it.
    assert text.index(first_block.group(0)) < 600


def _commands(group: click.Group, prefix: str = "") -> set[str]:
    names: set[str] = set()
    for name, command in group.commands.items():
        names.add(prefix + name)
        if isinstance(command, click.Group):
            names |= _commands(command, prefix + name + " ")
    return names


def _code(text: str) -> list[str]:
    """Inline code spans and the lines of fenced blocks: where commands are shown."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", rest)


def test_documents_show_only_commands_that_exist() -> None:
    """Every `relay <command>` the operator's guide shows is a real command."""
    existing = _commands(main)
    for document in (README, ROOT / "docs" / "operations.md"):
        if not document.exists():
            continue
        for snippet in _code(document.read_text()):
            for match in re.finditer(
                r"(?:^|[\s/])relay ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", snippet
            ):
                first, second = match.group(1), match.group(2)
                name = f"{first} {second}" if f"{first} {second}" in existing else first
                assert name in existing, f"{document.name} shows `relay {name}`: no such command"


@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_relative_links_resolve(document: str) -> None:
    path = ROOT / document
    if not path.exists():
        pytest.fail(f"{document} is missing")
    for target in re.findall(r"\]\((?!https?://|#|mailto:)([^)#\s]+)", path.read_text()):
        assert (path.parent / target).exists(), f"{document} links to missing {target}"


@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_section_links_resolve(document: str) -> None:
    """`[...](#anchor)` points at a heading, with GitHub's slug rules."""
    text = (ROOT / document).read_text()
    text_without_code = re.sub(r"```.*?```", "", text, flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text_without_code, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in slugs, f"{document} links to #{anchor}, which is no heading"
