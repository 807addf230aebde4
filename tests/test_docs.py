"""The repository documents itself: every relative link in the README and docs/ points at a file in it, and
nothing sends a reader to files a clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if ROOT not in (path, *path.parents) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_no_references_outside_the_repository() -> None:
    sources = [*DOCS, *ROOT.glob("gateway/**/*.py"), *ROOT.glob("defense_models/**/*.py"), *ROOT.glob("bench/**/*.py")]
    bad = [f"{p.relative_to(ROOT)}" for p in sources if "../shared" in p.read_text() or "ECOSYSTEM.md" in p.read_text()]
    assert not bad, bad
