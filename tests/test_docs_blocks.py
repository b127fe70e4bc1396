"""Every ```python block in README.md and docs/*.md runs as written, on its own (fresh namespace, its own
imports and model), so the docs cannot drift from the library. Fragments that cannot run alone (several
processes, `...`) use a ```text fence."""
import os
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(page, match.group(1), id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.slow
@pytest.mark.parametrize("page, code", _blocks())
def test_block_runs_on_its_own(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})


def test_every_page_is_scanned():
    assert len(list(_blocks())) >= 20 and os.path.exists(ROOT / "docs" / "architecture.md")
