"""The documentation stays short, current and navigable: the README fits in 12 KB, the generated
reference pages equal what app/cli/reference.py writes from the code today, every setting and every
make target is documented in exactly one of them, and every relative link and #anchor in the
README, CONTRIBUTING.md and docs/ resolves, as a hosting service renders them."""

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if not (REPO / "README.md").is_file():  # inside the image: the docs stay out of its build context
    pytest.skip("the README and docs/ are not here", allow_module_level=True)

from app.cli import reference  # noqa: E402  (after the skip: the image has no Makefile to read either)
from app.config import Config  # noqa: E402

README_LIMIT = 12 * 1024
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED_FILES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *DOCS]


def _generated() -> dict[str, str]:
    return {rel: getattr(reference, func)() for rel, func in reference.PAGES.items()}


def test_readme_fits_in_12_kb():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_LIMIT, (
        f"README.md is {size:,} bytes, over {README_LIMIT:,}: move detail into a docs/ page and link it"
    )


@pytest.mark.parametrize("rel", sorted(reference.PAGES))
def test_generated_page_is_current(rel):
    path = REPO / rel
    committed = path.read_text(encoding="utf-8") if path.is_file() else None
    assert committed == _generated()[rel], (
        f"{rel} is {'missing' if committed is None else 'stale'}: it is generated from the config dataclasses "
        f"and the Makefile. Regenerate it with `{reference.REGENERATE}` "
        f'(or: .venv/bin/python -c "from app.cli.reference '
        f"import {reference.PAGES[rel]}; print({reference.PAGES[rel]}(), end='')\" > {rel}) and commit it"
    )


def _rows(pattern: str) -> Counter:
    """How many table rows of all generated pages document each name."""
    return Counter(name for text in _generated().values() for name in re.findall(pattern, text, flags=re.M))


def _make_help_targets() -> list[str]:
    # The Makefile's own `help` target lists exactly these lines (its grep: ^[a-z-]+:.*## ).
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return re.findall(r"^([a-z-]+):.*## ", text, flags=re.M)


def test_every_setting_is_documented_in_exactly_one_generated_page():
    rows = _rows(r"^\| `([A-Z][A-Z0-9_]*)` \|")
    variables = list(Config.variables())
    assert not [v for v in variables if rows[v] != 1], (
        f"settings not documented exactly once: {', '.join(f'{v} ({rows[v]}x)' for v in variables if rows[v] != 1)}"
    )
    extra = sorted(set(rows) - set(variables))
    assert not extra, f"rows for names that are not settings: {extra}"


def test_every_make_target_is_documented_in_exactly_one_generated_page():
    targets = _make_help_targets()
    assert len(targets) >= 10, "the Makefile's `## ` help comments were not found"
    rows = _rows(r"^\| `make ([a-z-]+)` \|")
    assert not [t for t in targets if rows[t] != 1], (
        f"make targets not documented exactly once: {', '.join(f'{t} ({rows[t]}x)' for t in targets if rows[t] != 1)}"
    )
    extra = sorted(set(rows) - set(targets))
    assert not extra, f"rows for targets `make help` does not list: {extra}"


# ---- links -------------------------------------------------------------------------------------------


def _unfenced(text: str) -> str:
    """The text without fenced code blocks, where nothing is a heading or a link."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append(line)
    return "\n".join(out)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans."""
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", _unfenced(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped (letters of any
    script, digits, '_' and '-' stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Counter = Counter()
    out = set()
    text = _unfenced(path.read_text(encoding="utf-8"))  # a heading's `code` stays: its text counts
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(m.group(1))
        out.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


def links(path: Path) -> list[str]:
    """The target of every inline link and image outside code: `[text](target "title")`."""
    pattern = r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
    return re.findall(pattern, _prose(path.read_text(encoding="utf-8")))


def _broken(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto: ... not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    return bad


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert not _broken(path), f"{path.relative_to(REPO)}: broken links: {'; '.join(_broken(path))}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = REPO / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme) if t.partition("#")[0]}
    orphans = [p.name for p in DOCS if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link (readers would never find them): {orphans}"


def test_the_link_checker_catches_what_it_should(tmp_path):
    """The checks above pass only if the checker can fail: a missing file, a missing anchor, and the
    slug rules (case, punctuation, code, repeated headings) on a page of known headings."""
    (tmp_path / "page.md").write_text(
        "# Resume, overwrite and `checkpoints`\n## Q&A: 显存/内存?\n## Q&A: 显存/内存?\n```\n# not a heading\n```\n",
        encoding="utf-8",
    )
    assert anchors(tmp_path / "page.md") == {"resume-overwrite-and-checkpoints", "qa-显存内存", "qa-显存内存-1"}
    (tmp_path / "doc.md").write_text(
        "[ok](page.md#qa-显存内存-1) [gone](nothere.md) [bad](page.md#q-a) "
        "[web](https://example.com/x.md) `[code](skipped.md)` [self](#nowhere)\n",
        encoding="utf-8",
    )
    assert [b.split(":")[0] for b in _broken(tmp_path / "doc.md")] == ["nothere.md", "page.md#q-a", "#nowhere"]
