"""Every `from primekd... import ...` written in the docs, the README and bench/ works:
module moves (issue 16) must take the documentation with them."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"from (primekd(?:\.\w+)*) import (\([^)]*\)|[^\n]*)")


def _documented_imports() -> list[tuple[str, str, str]]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "bench").iterdir())]
    found = []
    for path in files:
        if not path.is_file() or path.suffix not in (".md", ".py", ".sh"):
            continue
        for module, names in IMPORT.findall(path.read_text()):
            names = re.sub(r"#[^\n]*", "", names).strip("()")
            names = re.split(r"[;\"'`]", names)[0]  # a one-liner: `python -c "from ...; ..."`
            for part in names.split(","):
                name = part.split()[0] if part.split() else ""
                if name.isidentifier():
                    found.append((str(path.relative_to(ROOT)), module, name))
    return found


DOCUMENTED = _documented_imports()


def test_the_docs_import_something() -> None:
    assert len(DOCUMENTED) > 30


@pytest.mark.parametrize(("where", "module", "name"), DOCUMENTED,
                         ids=[f"{w}:{m}.{n}" for w, m, n in DOCUMENTED])
def test_documented_import_resolves(where: str, module: str, name: str) -> None:
    loaded = importlib.import_module(module)
    if not hasattr(loaded, name):
        importlib.import_module(f"{module}.{name}")  # a submodule, as `teach import store`
