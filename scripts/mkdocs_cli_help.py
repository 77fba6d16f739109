"""MkDocs hook: the CLI reference is the CLI's own ``--help``, never a second copy of it.

A line ``<!-- kneeosteo-help: NAME -->`` in a page (``NAME`` a command, or ``kneeosteo`` for the
top level) is replaced, at build time, by that command's help exactly as ``kneeosteo NAME --help``
prints it (rich's layout at 100 columns, no colour). ``docs/cli.md`` must hold one such line for
every command the CLI has, and no line for a command it lacks: the build fails otherwise, so a new
command cannot go undocumented. mkdocs.yml names this file under ``hooks:``; ``tests/test_docs.py``
tests it without MkDocs.

A line ``<!-- kneeosteo-settings -->`` is replaced by the table of every training setting (its
TOML table and key, default, command-line flag and help), built from the one declaration in
``kneeosteo/config.py``: the docs cannot list a setting the code lacks, or miss one it has.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- kneeosteo-help: ([\w-]+) -->$", re.MULTILINE)
SETTINGS_MARKER = "<!-- kneeosteo-settings -->"
CLI_PAGE = "cli.md"
TOP = "kneeosteo"


def commands() -> list[str]:
    """The CLI's command names, from the typer app itself."""
    import typer.main

    from kneeosteo.interfaces.cli import app

    return sorted(typer.main.get_command(app).commands)


def help_text(name: str) -> str:
    """``kneeosteo NAME --help`` (``NAME == "kneeosteo"``: ``kneeosteo --help``), as the CLI prints it."""
    from typer.testing import CliRunner

    from kneeosteo.interfaces.cli import app

    args = ["--help"] if name == TOP else [name, "--help"]
    result = CliRunner().invoke(
        app, args, prog_name="kneeosteo", env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}
    )
    if result.exit_code != 0:
        raise RuntimeError(f"`kneeosteo {' '.join(args)}` exited {result.exit_code}: {result.output}")
    return "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())


def check_markers(markdown: str, names: list[str]) -> None:
    """Every command has its help marker in the CLI page, and every marker names a command."""
    found = MARKER.findall(markdown)
    missing = sorted(set(names) - set(found))
    unknown = sorted(set(found) - set(names) - {TOP})
    if missing or unknown:
        raise ValueError(
            f"docs/{CLI_PAGE}: commands without a `<!-- kneeosteo-help: NAME -->` line: {missing}; "
            f"lines naming no command: {unknown}"
        )


def expand(markdown: str) -> str:
    """Each marker replaced by a collapsible block holding the command's help."""

    def block(match: re.Match) -> str:
        name = match.group(1)
        shown = "kneeosteo --help" if name == TOP else f"kneeosteo {name} --help"
        body = "\n".join("    " + line if line else "" for line in help_text(name).splitlines())
        return f'??? note "`{shown}`"\n\n    ```text\n{body}\n    ```\n'

    return MARKER.sub(block, markdown)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table() -> str:
    """Every training setting, table by table, from ``kneeosteo.config``'s declaration."""
    from kneeosteo.config import settings

    rows = ["| setting | default | command line | meaning |", "|---|---|---|---|"]
    for s in settings():
        default = "" if s.default in (None, (), {}) else f"`{s.default!r}`".replace("'", '"')
        if isinstance(s.default, bool):
            default = f"`{str(s.default).lower()}`"
        elif isinstance(s.default, tuple) and s.default:
            default = f"`{list(s.default)}`"
        flag = f"`{s.flag}`" if s.flag else ("DATA (argument)" if s.key == "data" else "file only")
        old = f" (flat: `{s.key}`)" if s.key != s.name else ""
        rows.append(f"| `[{s.section}]` `{s.name}`{old} | {default} | {_cell(flag)} | {_cell(s.help)} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs hook
    if page.file.src_uri == CLI_PAGE:
        check_markers(markdown, commands())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_table())
    return expand(markdown) if MARKER.search(markdown) else markdown
