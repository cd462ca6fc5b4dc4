"""The documentation: README.md is the landing page that links every page under docs/, and every relative link and
anchor in them resolves."""

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from servers import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
PARSER = MarkdownIt("commonmark").enable("table")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
"""A link with a scheme (https:, mailto:) leaves the repository; those are not checked (no network)."""


def slugs(path: Path) -> list[str]:
    """The anchors GitHub gives the headings of a Markdown file: the heading's text in lower case, punctuation other
    than '-' and '_' dropped, spaces turned into '-', and '-1', '-2', ... appended to repeated slugs."""
    tokens = PARSER.parse(path.read_text())
    seen: dict[str, int] = {}
    anchors = []
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.append(slug if count == 0 else f"{slug}-{count}")
    return anchors


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file, outside code blocks and code spans."""
    return [child.attrGet("href") for token in PARSER.parse(path.read_text()) if token.type == "inline"
            for child in token.children if child.type == "link_open"]


def broken_links(path: Path) -> list[str]:
    """The relative links of `path` whose file does not exist or whose `#anchor` names no heading of that file."""
    broken = []
    for href in links(path):
        if SCHEME.match(href):
            continue
        target, _, anchor = href.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            broken.append(f"{href}: no file {resolved}")
        elif anchor and anchor not in slugs(resolved):
            broken.append(f"{href}: no heading with the anchor #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_and_anchors_resolve(page):
    assert broken_links(page) == []


def test_every_doc_is_linked_from_the_readme():
    linked = {(ROOT / href.partition("#")[0]).resolve() for href in links(README) if not SCHEME.match(href)}
    assert DOCS and [doc for doc in DOCS if doc.resolve() not in linked] == []


def test_readme_starts_with_the_two_commands():
    title, _, _, first_block = PARSER.parse(README.read_text())[:4]
    assert title.type == "heading_open" and title.tag == "h1"
    assert first_block.type == "fence", "the first thing after the title must be the code block with the commands"
    commands = [line.split("#")[0].strip() for line in first_block.content.splitlines()]
    assert commands == ["make serve", "make test"]
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert {"serve", "test"} <= set(targets)


def test_the_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Real weights (local paths only)\n\n## Caches\n\n## Caches\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#real-weights-local-paths-only) [ok](other.md#caches-1) "
                    "[ok](#page) [web](https://example.com/x.md) `[code](nowhere.md)`\n\n"
                    "[gone](missing.md) [bad anchor](other.md#caches-2)\n\n```\n[fenced](nowhere.md)\n```\n")
    assert broken_links(page) == [f"missing.md: no file {tmp_path.resolve() / 'missing.md'}",
                                  "other.md#caches-2: no heading with the anchor #caches-2 in other.md"]
