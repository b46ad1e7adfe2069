"""Documentation a clone can follow: every relative link resolves inside the repository; the method is
described in it; licence, citation and content warnings are there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)  # code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_every_relative_link_resolves_inside_the_repository():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
    assert relative_links(ROOT / "README.md"), "the README links nothing"
    for md in docs:
        for target in relative_links(md):
            path = (md.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{md.name} links {target}, outside the repository"
            assert path.exists(), f"{md.name} links {target}, which a clone does not have"


def test_readme_points_to_the_method_and_the_sources():
    links = relative_links(ROOT / "README.md")
    assert "docs/method.md" in links and "docs/sources.md" in links


def test_licence_citation_and_content_warnings():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "cff-version:" in (ROOT / "CITATION.cff").read_text()
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "Content warning" in head
    assert "Content warning" in (ROOT / "data" / "README.md").read_text()


def test_no_issue_numbers_in_code_or_config():
    pat = re.compile(r"\bissue\s*#?\d+", re.I)
    for folder in ("lib", "configs", "tools", "notebooks/src", "tests", "scripts"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".toml", ".sh", ".md"):
                assert not pat.search(p.read_text(encoding="utf-8")), p
