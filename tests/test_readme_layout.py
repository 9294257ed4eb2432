"""README's "Layout" table names every module of the package: a new module without its line fails here."""

import re

from helpers import REPO


def layout_section() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"^## Layout\n(.*?)^## ", text, re.S | re.M).group(1)


def test_every_module_has_its_line_in_the_layout():
    named = set(re.findall(r"`(gpt2/[\w/]+\.py)`", layout_section()))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "gpt2").rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set(), "add these to README's Layout table"
    assert named - modules == set(), "README's Layout table names modules that do not exist"
