"""The documentation's promises: the CLI reference is the CLI's own help, the README's map reaches
every page of the site, the README stays a front door, and every file in docs/results is named
with the command that rebuilds it. `mkdocs build --strict` (.ci/run) checks links and anchors;
these run without MkDocs."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location("mkdocs_cli_help", REPO / "scripts" / "mkdocs_cli_help.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_has_its_help_block_in_the_cli_page(hook):
    names = hook.commands()
    assert {"train", "predict", "serve"} <= set(names)
    page = (DOCS / "cli.md").read_text()
    hook.check_markers(page, names)  # raises on a command without its block
    without = page.replace("<!-- kneeosteo-help: predict -->", "")
    with pytest.raises(ValueError, match="predict"):
        hook.check_markers(without, names)
    with pytest.raises(ValueError, match="retrain"):
        hook.check_markers(page + "\n<!-- kneeosteo-help: retrain -->\n", names)


def test_the_help_block_is_the_clis_own_help(hook):
    import typer.main

    from kneeosteo.interfaces.cli import app

    block = hook.expand("<!-- kneeosteo-help: train -->\n")
    assert block.startswith('??? note "`kneeosteo train --help`"') and "Usage: kneeosteo train" in block
    command = typer.main.get_command(app).commands["train"]
    options = [o for p in command.params for o in p.opts if o.startswith("--")]
    assert len(options) > 20
    missing = [o for o in options if o not in block]
    assert not missing, missing  # every option the CLI has is in the page, none typed by hand
    assert "Usage: kneeosteo [OPTIONS] COMMAND" in hook.expand("<!-- kneeosteo-help: kneeosteo -->\n")


def test_the_settings_table_and_example_are_the_configs_own(hook, tmp_path):
    """The settings table in the CLI page is built from kneeosteo.config's declaration (every
    setting, its table and help), and the page's TOML example is a file `--config` loads."""
    from kneeosteo.config import load_config, settings

    page = (DOCS / "cli.md").read_text()
    assert page.count(hook.SETTINGS_MARKER) == 1
    table = hook.settings_table()
    for s in settings():
        assert f"| `[{s.section}]` `{s.name}`" in table and s.help.replace("|", "\\|") in table, s.qualified
    example = re.search(r"```toml\n(.*?)```", page, re.DOTALL)
    assert example and "[model]" in example.group(1)
    (tmp_path / "example.toml").write_text(example.group(1))
    cfg = load_config(tmp_path / "example.toml", {})
    assert (cfg.data.preprocess, cfg.optimiser.reweight, cfg.trust.operating_point) == ("bone", "metadata", "youden")


def _nav_pages() -> list[str]:
    nav = (REPO / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    return re.findall(r"^\s+- [^:]+: (\S+\.md)$", nav, re.MULTILINE)


def test_the_readme_map_reaches_every_page_of_the_site():
    readme = (REPO / "README.md").read_text()
    pages = _nav_pages()
    assert len(pages) >= 15 and "index.md" in pages and "results/README.md" in pages
    on_disk = {
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if p.parent == DOCS or p.relative_to(DOCS).as_posix() == "results/README.md"
    }
    assert on_disk == set(pages)  # no top-level page outside the navigation
    unlinked = [p for p in pages if f"](docs/{p})" not in readme]
    assert not unlinked, unlinked
    for target in re.findall(r"\]\(((?:docs/)?[^)#:]+\.(?:md|png))(?:#[^)]*)?\)", readme):
        assert (REPO / target).is_file(), target  # every file the README links to exists


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for section in (
        "## Install",
        "## CLI quickstart",
        "## Python quickstart",
        "## Headline results",
        "## Documentation",
        "## Limitations",
        "## Citing",
        "## Licence",
    ):
        assert section in readme, section
    assert "Predictor()" in readme and "not a diagnostic device" in readme


def _named_in_results_readme() -> list[str]:
    """The files the results README's table names: backticked paths in a row's first cell; a bare
    name takes the folder of the name before it, a `.ext` the stem of the name before it."""
    names = []
    for row in (DOCS / "results" / "README.md").read_text().splitlines():
        if not row.startswith("| `"):
            continue
        folder, stem = "", ""
        for token in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if token.startswith(".") and "/" not in token:
                token = stem + token
            elif "/" not in token:
                token = folder + token
            folder, stem = token.rsplit("/", 1)[0] + "/" if "/" in token else "", token.rsplit(".", 1)[0]
            names.append(token)
    return names


def test_every_results_file_and_figure_is_named_with_its_command():
    named = _named_in_results_readme()
    results = DOCS / "results"
    files = [
        p.relative_to(results).as_posix()
        for p in results.rglob("*")
        if p.is_file() and p.name != "README.md" and "oof" not in p.parts
    ]
    files += ["../" + p.name for p in DOCS.glob("*.png")]  # the figures elsewhere in docs/
    assert len(files) > 40
    unnamed = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in named)]
    assert not unnamed, unnamed
    assert "research/oof/*.npz" in named  # the arrays out of git, with the script that rebuilds them
