"""The README's front door stays true: its Usage examples run, its test command is CI's."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_usage_examples_run(capsys):
    usage = README[README.index("## Usage"):README.index("## Coming from torch.ao.pruning")]
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md (Usage)", "exec"), namespace)
    assert "torch.mul" in capsys.readouterr().out  # print(prepared.code) shows the mask nodes
    # the last example prepares a TransformerEncoderLayer through torch.export
    masks = [n for n, _ in namespace["prepared"].named_buffers() if n.endswith("_mask")]
    assert masks == ["linear1.weight_mask", "linear2.weight_mask"]


def test_quickstart_commands_are_what_ci_runs():
    quickstart = README[README.index("## Quickstart"):README.index("## Usage")]
    commands = re.findall(r"^(?!#)(\S.*)$", re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1), re.M)
    assert len(commands) == 2
    assert commands[0].endswith("python -m fx_sparsity demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci
