"""The README documents the CLI as it is: one table with a row per command, every flag of every `--help`."""
import re
from pathlib import Path

import pytest

from paft_jax.launch import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def help_text(*command: str) -> str:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([*command, "--help"])
    return buf.getvalue()


def commands() -> list[str]:
    """The sub-commands, as the top-level usage line lists them: {export,generate,...}."""
    return re.search(r"\{([a-z,-]+)\}", help_text()).group(1).split(",")


def cli_table() -> list[str]:
    """The rows of the CLI reference table: the lines that follow its header up to the first non-row (a blank
    line ends a markdown table, so rows after one would not render as part of it)."""
    lines = README.splitlines()
    start = lines.index("| command | what it does |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_the_cli_table_has_a_row_for_every_command():
    firsts = [re.findall(r"`([a-z-]+)", row.split("|")[1]) for row in cli_table()]
    named = {name for names in firsts for name in names}
    assert set(commands()) - named == set()


@pytest.mark.parametrize("command", commands())
def test_every_flag_of_the_help_is_in_the_readme(command):
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text(command))) - {"--help"}
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![a-z0-9-])", README))
    assert not missing, f"`{command} --help` has flags the README does not mention: {missing}"
