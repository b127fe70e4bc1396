"""The README's front door stays true: its Usage examples run, its test command is CI's,
its links into docs/ resolve, and it stays short."""
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_PATH = ROOT / "README.md"
README = README_PATH.read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 160


def _section(text: str, heading: str) -> str:
    """The text of the `## heading` section, up to the next `## ` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


@pytest.mark.slow
def test_usage_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _section(README, "Usage"), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md (Usage)", "exec"), namespace)
    assert "torch.mul" in capsys.readouterr().out  # print(prepared.code) shows the mask nodes
    # the last example prepares a TransformerEncoderLayer through torch.export
    masks = [n for n, _ in namespace["prepared"].named_buffers() if n.endswith("_mask")]
    assert masks == ["linear1.weight_mask", "linear2.weight_mask"]


def test_quickstart_commands_are_what_ci_runs():
    quickstart = _section(README, "Quickstart")
    commands = re.findall(r"^(?!#)(\S.*)$", re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1), re.M)
    assert len(commands) == 2
    assert commands[0].endswith("python -m fx_sparsity demo")
    install = commands[0].split("&&")
    assert "torch==" in install[0] and "pip install -e" in install[1]  # torch first, then the project
    assert "[demo]" in install[1]  # the demo's own extra, not the test tooling
    ci = (ROOT / ".ci" / "run").read_text()
    setup, test = commands[1].rsplit("&&", 1)
    assert '".[test]"' in setup and test.strip() in ci


def test_readme_is_short():
    assert len(README.splitlines()) <= MAX_README_LINES


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _relative_links(path: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_readme_links_to_docs_exist():
    links = [t for t in _relative_links(README_PATH) if t.startswith("docs/")]
    assert links, "README links to no docs/ page"
    for target in links:
        file = target.split("#")[0]
        assert file.endswith(".md"), target
        assert (ROOT / file).is_file(), f"README links to {target}, which does not exist"
    # every docs page is reachable from the README
    linked = {t.split("#")[0] for t in links}
    assert {f"docs/{p.name}" for p in DOCS} <= linked


def test_links_between_pages_resolve():
    for page in [README_PATH, *DOCS]:
        for target in _relative_links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.is_file(), f"{page.name}: link {target} points at no file"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{page.name}: link {target}: no such heading in {dest.name}"


@pytest.mark.slow  # builds and fine-tunes a tiny Llama
def test_which_scope_example_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: str(tmp_path))
    blocks = re.findall(r"```python\n(.*?)```", _section(README, "Which scope?"), re.S)
    assert len(blocks) == 1
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile("import torch\nimport fx_sparsity as fxs\n" + blocks[0], "README.md (Which scope?)", "exec"),
             namespace)
    assert isinstance(namespace["prepared"], namespace["LlamaForCausalLM"])
    assert capsys.readouterr().out.strip().endswith("tensor(0.5000)")


def test_structured_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _section(README, "Structured pruning: a smaller model"), re.S)
    assert len(blocks) == 1
    namespace = {}
    exec(compile("import torch, torch.nn as nn\nimport fx_sparsity as fxs\n" + blocks[0], "README.md (Structured)",
                 "exec"), namespace)
    assert capsys.readouterr().out.strip() == "torch.Size([32, 16, 3, 3])"
