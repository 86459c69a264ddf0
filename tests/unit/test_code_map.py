"""The README's Code map names every module under worker/ and models/, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def code_map() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^## Code map\n(.*?)^## ", readme, flags=re.M | re.S)
    assert found, "README.md has no '## Code map' section"
    return found[1]


def modules() -> set[str]:
    """Every module of the two packages, as a path from the checkout's root (package markers aside)."""
    return {
        path.relative_to(ROOT).as_posix()
        for package in ("worker", "models")
        for path in (ROOT / package).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }


def named(text: str) -> set[str]:
    return set(re.findall(r"`((?:worker|models)/[\w/]+\.py)`", text))


def test_every_module_has_a_row_in_the_code_map():
    missing = sorted(modules() - named(code_map()))
    assert not missing, f"modules without a row in README.md's Code map: {missing}"


def test_the_code_map_names_no_module_that_is_gone():
    gone = sorted(named(code_map()) - modules())
    assert not gone, f"README.md's Code map names modules that do not exist: {gone}"


def test_every_package_states_its_job_and_exports_a_short_list():
    for init in sorted((ROOT / "worker").rglob("__init__.py")):
        if init.parent == ROOT / "worker":
            continue  # the top package: Celery's entry point, documented in its own docstring
        source = init.read_text(encoding="utf-8")
        assert source.lstrip().startswith('"""'), f"{init.relative_to(ROOT)} has no docstring"
        exported = re.search(r"__all__ = \[(.*?)\]", source, flags=re.S)
        assert exported, f"{init.relative_to(ROOT)} has no __all__"
        assert 1 <= exported[1].count('"') // 2 <= 20
