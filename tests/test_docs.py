"""The documentation's relative links resolve, and the README stays short. Pure file reading: no JAX."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
# [text](target) or ![alt](target), an optional "title" after the target; text may hold one level of [].
_LINK = re.compile(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^\s<>()]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def doc_files() -> list[Path]:
    """README.md, every docs/*.md and benchmarks/README.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks (``` or ~~~)."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
            else:
                lines.append((number, line))
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip().strip(fence[0]):
            fence = None
    return lines


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code (fenced blocks and inline code spans)."""
    return [(number, m.group(2)) for number, line in outside_fences(text)
            for m in _LINK.finditer(_INLINE_CODE.sub("code", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lowercase, punctuation other than - and _
    removed, spaces turned into -."""
    text = _LINK.sub(r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a file's headings (outside code); a repeated heading gets -1, -2, ... as on GitHub."""
    counts: dict[str, int] = {}
    found = set()
    for _, line in outside_fences(text):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """One message per relative link of `path` whose file, folder or #anchor does not exist."""
    problems = []
    for number, target in links(path.read_text()):
        if re.match(r"(https?|mailto):", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: ({target})"
        if not resolved.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            problems.append(f"{where}: no heading of {resolved.relative_to(root)} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert path.exists(), path
    assert broken_links(path) == []


def test_readme_is_at_most_250_lines():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_links_in_code_are_ignored_and_others_found():
    text = "\n".join([
        "See [the docs](docs/a.md#x) and `[not](a/link)`.",
        "```bash",
        "echo [x](y)",
        "```",
        "~~~",
        "[x](z)",
        "~~~",
        "[after](b.md) ![image](c.png \"title\")",
    ])
    assert links(text) == [(1, "docs/a.md#x"), (8, "b.md"), (8, "c.png")]


def test_anchors_are_githubs():
    text = "\n".join(["# The demo (`configs/demo.py`)", "## The paper's settings", "## Tests", "## Tests",
                      "```", "# not a heading", "```"])
    assert anchors(text) == {"the-demo-configsdemopy", "the-papers-settings", "tests", "tests-1"}
    assert slug("Train and evaluate: `python -m tam_jax.main`") == "train-and-evaluate-python--m-tam_jaxmain"


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Part one\n\n```\n## Fenced\n```\n")
    (tmp_path / "folder").mkdir()
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#part-one) [dir](folder) [web](https://x.org/nope) [bad anchor](a.md#fenced)\n"
                    "[missing](nope.md) [self](#here)\n")
    assert [p.split(": ", 1)[1] for p in broken_links(page, root=tmp_path)] == [
        "(a.md#fenced): no heading of a.md has the anchor #fenced",
        "(nope.md): nope.md does not exist",
        "(#here): no heading of b.md has the anchor #here",
    ]
