"""The manual's pages link to each other correctly: every relative link (and #anchor) between README.md,
docs/*.md and bench/README.md names a file that exists and, with an anchor, a heading of that file (GitHub's
anchors: lower case, punctuation dropped, spaces to '-', a repeated heading numbered -1, -2, ...). Measurements
live in bench/README.md only: no date in the manual.

    python tests/test_docs.py        # list the broken links
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(path):
    """The lines outside fenced code blocks and indented blocks (a link there is not a link)."""
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        if not inside and not line.startswith("    "):
            yield line


def anchor(heading):
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)  # GitHub keeps letters, digits, '_', '-' and spaces
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for line in prose(path):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            a = anchor(m.group(2))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def broken_links():
    broken = []
    for page in PAGES:
        for line in prose(page):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file, _, frag = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    broken.append(f"{page.relative_to(ROOT)}: {target}: no file {file}")
                elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                    broken.append(f"{page.relative_to(ROOT)}: {target}: no heading #{frag} in {dest.relative_to(ROOT)}")
    return broken


def test_every_page_exists():
    names = {p.name for p in PAGES if p.exists()}
    assert {"README.md", "data.md", "training.md", "distributed.md", "after-training.md", "troubleshooting.md",
            "development.md"} <= names


def test_every_relative_link_resolves():
    assert not broken_links(), "\n".join(broken_links())


def test_the_links_are_checked():
    """The checker itself finds a missing file, a missing anchor and a link inside code (none)."""
    page = ROOT / "docs" / "_link_check_probe.md"
    page.write_text("# Probe\n\n[a](nothing.md) [b](#no-such) [c](#probe) [d](data.md#formats)\n\n"
                    "```\n[e](nothing-here.md)\n```\n", encoding="utf-8")
    try:
        PAGES.append(page)
        found = [b for b in broken_links() if b.startswith("docs/_link_check_probe.md")]
    finally:
        PAGES.remove(page)
        page.unlink()
    assert found == ["docs/_link_check_probe.md: nothing.md: no file nothing.md",
                     "docs/_link_check_probe.md: #no-such: no heading #no-such in docs/_link_check_probe.md"], found


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if not page.name.startswith("_"):
            assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_no_dated_measurement_in_the_manual():
    """Figures with their dates live in bench/README.md; the manual links there."""
    for page in PAGES[:-1]:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not re.search(r"20\d\d-\d\d-\d\d|\bMeasured\b", line), (
                f"{page.relative_to(ROOT)}:{n}: a dated or measured figure belongs in bench/README.md: {line}")


if __name__ == "__main__":
    print("\n".join(broken_links()) or "every link resolves")
