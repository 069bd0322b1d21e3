"""One home per subject: the module map in finetune.py's docstring and the layout table of docs/development.md
name every finetune_*.py module on disk, and nothing that is not there."""

import re

from conftest import ROOT


def modules_on_disk():
    return {p.name for p in ROOT.glob("finetune_*.py")}


def test_the_module_map_names_every_module():
    import finetune

    mapped = set(re.findall(r"^  (finetune_\w+\.py) ", finetune.__doc__, re.M))
    assert mapped == modules_on_disk(), (
        f"finetune.py's module map: missing {sorted(modules_on_disk() - mapped)}, "
        f"not on disk {sorted(mapped - modules_on_disk())}")


def test_the_layout_table_names_every_module():
    page = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"`(finetune_\w+\.py)`", "\n".join(line for line in page.splitlines()
                                                           if line.startswith("| `"))))
    assert rows == modules_on_disk(), (
        f"docs/development.md, Layout: missing {sorted(modules_on_disk() - rows)}, "
        f"not on disk {sorted(rows - modules_on_disk())}")
