"""The README and docs/ stand alone and name only what exists."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

import peftkern

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
TEXTS = [ROOT / "README.md", *PAGES, ROOT / "peftkern" / "__init__.py"]


def test_one_page_per_use_linked_from_readme_and_package_docstring():
    names = {page.name for page in PAGES}
    assert {"training.md", "serving.md", "soft-prompts.md", "bottleneck-adapters.md", "vendoring.md"} <= names
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert f"docs/{name}" in readme and f"docs/{name}" in peftkern.__doc__, name


@pytest.mark.parametrize("path", TEXTS, ids=[p.name for p in TEXTS])
def test_no_links_outside_the_repository_and_every_peftkern_name_exists(path):
    text = path.read_text()
    assert "../shared" not in text and "/work/" not in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (path.parent / link).exists(), f"{path.name}: broken link {link}"
    # Public names only: peftkern._C exists only where the CUDA extension was built.
    for dotted in sorted(set(re.findall(r"\bpeftkern((?:\.[A-Za-z][A-Za-z0-9_]*)+)", text))):
        target, parts = peftkern, dotted.strip(".").split(".")
        for index, part in enumerate(parts):
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # docs name the current API only
                if hasattr(target, part):
                    target = getattr(target, part)
                    continue
            module = "peftkern." + ".".join(parts[: index + 1])
            target = importlib.import_module(module)
