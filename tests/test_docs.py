"""The docs a person reads: every option documented once, the README short, its links alive."""
import dataclasses
import re
from pathlib import Path

from segquant_compile.config import GROUPS

ROOT = Path(__file__).resolve().parents[1]


def test_every_option_is_in_the_options_table_exactly_once():
    text = (ROOT / "docs" / "options.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \|", text, re.M)
    options = [f for group in GROUPS.values() for f in dataclasses.fields(group)]   # the flat option names
    fields = [f.name for f in options] + ["preset"]
    assert sorted(rows) == sorted(fields), (set(rows) ^ set(fields))
    for f in options:   # each row states the shipped default
        row = next(line for line in text.splitlines() if line.startswith(f"| `{f.name}` |"))
        shown = f"`{f.default!r}`".replace("'", '"') if isinstance(f.default, tuple) else f"`{f.default}`"
        assert row.split("|")[3].strip() in (shown, "none", "`{}`"), (f.name, row)

def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for doc in ("docs/options.md", "docs/results.md", "docs/design.md", "CHANGELOG.md"):
        assert f"({doc})" in text and (ROOT / doc).is_file(), doc
    for path in ("docs/results.md", "docs/design.md", "docs/options.md"):
        for link in re.findall(r"\]\(([^)#:]+)\)", (ROOT / path).read_text()):
            assert (ROOT / path).parent.joinpath(link).resolve().exists(), (path, link)


def test_every_preset_is_documented_and_valid():
    from segquant_compile.presets import PRESETS
    text = (ROOT / "docs" / "options.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `preset` |"))
    for name in PRESETS:
        assert f"`{name}`" in row and f'| `"{name}"` |' in text, name
