"""The command line (python -m fx_sparsity / fx-sparsity): demo, inspect, bench; exit codes and errors."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fx_sparsity as fxs
from fx_sparsity.__main__ import main
from fx_sparsity.demo import DemoConfig, run_demo

TESTS = os.path.dirname(__file__)


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestInspect:
    def test_table_is_format_sparse_graph(self, capsys):
        code, out, err = run_main(capsys, "inspect", "models:mlp", "--input-shape", "2,16")
        assert (code, err) == (0, "")
        from models import mlp

        torch.manual_seed(0)
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
        sparsifier.step()
        header, blank, table = out.partition("\n\n")
        assert header.startswith("models:mlp: Sequential traced with tracer='symbolic'; "
                                 "WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4)) on "
                                 "0.weight, 2.weight, 4.weight")
        # inspect's own random inputs: compare the parts that do not depend on them
        assert table.replace("f32[2, ", "f32[B, ") == fxs.format_sparse_graph(
            prepared, example_inputs=(torch.randn(2, 16),)).replace("f32[2, ", "f32[B, ") + "\n"

    @pytest.mark.slow
    def test_export_options_and_code(self, capsys):
        code, out, _ = run_main(capsys, "inspect", "models:encoder_layer", "--input-shape", "2,5,32",
                                "--tracer", "export", "--level", "0.75", "--block-shape", "1,2",
                                "--tensors", "linear1.weight, linear2.weight", "--code")
        assert code == 0
        assert "on linear1.weight, linear2.weight" in out
        assert "aten.linear.default" in out and "f32[2, 5, 64]" in out
        rows = [line.split() for line in out.splitlines() if line.startswith("mul") and "torch.mul" in line]
        assert [r[-4:] for r in rows] == [["linear1.weight", "75.0%", "1x2", "75.0%"],
                                          ["linear2.weight", "75.0%", "1x2", "75.0%"]]
        assert "# <- mask linear2.weight: 75.0% zeros (level 75.0%, 1x2)" in out

    def test_integer_inputs(self, capsys):
        code, out, _ = run_main(capsys, "inspect", "models:tied", "--input-shape", "1,3", "--input-dtype", "int64")
        assert code == 0 and "i64[1, 3]" in out

    @pytest.mark.parametrize("spec, message", [
        ("models", "'models' is not MODULE:FACTORY: name a module and a callable"),
        ("models:", "'models:' is not MODULE:FACTORY"),
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz': no module named 'no_such_module_xyz'"),
        ("models:mpl", "'models' has no attribute 'mpl'; did you mean mlp?"),
        ("models:F.nope", "'models:F' has no attribute 'nope'"),
        ("models:F", "'models:F' is a module, not a callable"),
        ("builtins:dict", "builtins:dict() returned a dict, not a torch.nn.Module"),
        ("torch.nn:ReLU", "ReLU has no nn.Linear, so the default config is empty; name the tensors"),
    ])
    def test_bad_factory(self, capsys, spec, message):
        code, out, err = run_main(capsys, "inspect", spec)
        assert code == 2 and out == ""
        assert err.startswith("fx-sparsity inspect: error: ") and message in err, err

    def test_failures_of_the_model_exit_1(self, capsys):
        code, _, err = run_main(capsys, "inspect", "collections:namedtuple")
        assert code == 1 and "collections:namedtuple() raised TypeError" in err
        # symbolic tracing cannot see through the encoder layer's fast path checks
        code, _, err = run_main(capsys, "inspect", "models:encoder_layer", "--input-shape", "2,5,32")
        assert code == 1 and "scope=\"layers\"" in err and "tracer=\"export\"" in err, err

    @pytest.mark.slow
    def test_scope_and_keyword_inputs(self, capsys):
        # the encoder layer's own forward does not trace: the error says scope="layers", and --scope layers works
        code, out, err = run_main(capsys, "inspect", "models:encoder_layer", "--input-shape", "2,5,32", "--scope",
                                  "layers", "--code")
        assert code == 0, err
        assert "scope='layers'" in out and "[linear1]" in out and "# linear1" in out
        code, out, err = run_main(capsys, "inspect", "models:encoder_layer", "--input-shape", "2,5,32", "--tracer",
                                  "export", "--kwarg", "is_causal=False")
        assert code == 0, err
        code, _, err = run_main(capsys, "inspect", "models:mlp", "--input-shape", "2,16", "--kwarg", "foo=1")
        assert code == 2 and "check the --kwarg names against Sequential.forward" in err, err
        code, _, err = run_main(capsys, "inspect", "models:mlp", "--kwarg", "foo")
        assert code == 2 and "bad --kwarg 'foo': expected NAME=VALUE" in err, err
        code, _, err = run_main(capsys, "inspect", "models:mlp", "--scope", "nowhere")
        assert code == 2 and "bad --scope 'nowhere'" in err, err

    @pytest.mark.parametrize("args, message", [
        (["--input-shape", "1,a"], "bad --input-shape '1,a': expected positive integers separated by commas"),
        (["--input-shape", "0,16"], "bad --input-shape '0,16'"),
        (["--input-shape", ""], "bad --input-shape ''"),
        (["--block-shape", "1,2,3"], "bad --block-shape '1,2,3': a block has 2 dims"),
        (["--level", "1.5"], "bad --level '1.5': a sparsity level is a fraction of zeros in [0, 1]"),
        (["--tracer", "export"], "--tracer export needs --input-shape"),
        (["--input-shape", "2,15"], "running Sequential on an input of shape (2, 15) failed"),
    ])
    def test_bad_arguments(self, capsys, args, message):
        code, _, err = run_main(capsys, "inspect", "models:mlp", *args)
        assert code == 2, err
        assert message in err, err

    @pytest.mark.parametrize("args, message", [
        (["models:mlp", "--input-shape", "2,7"],
         "running Sequential on an input of shape (2, 7) failed: mat1 and mat2 shapes cannot be multiplied "
         "(2x7 and 16x32); pass --input-shape matching the model's first layer ('0' is a Linear with "
         "in_features=16)"),
        (["models:encoder_layer", "--input-shape", "2,5,31", "--tracer", "export"],
         "running TransformerEncoderLayer on an input of shape (2, 5, 31) failed: "),
        (["models:mlp", "--input-shape", "2,16", "--input-dtype", "int64"],
         "running Sequential on an input of shape (2, 16) (int64) failed: mat1 and mat2 must have the same dtype"),
        (["models:mlp", "--input-shape", "2,16", "--input-shape", "2,16"],
         "running Sequential on inputs of shapes (2, 16), (2, 16) failed: "),
    ], ids=["wrong-width", "export", "wrong-dtype", "two-inputs"])
    def test_input_that_does_not_fit_is_one_line(self, capsys, args, message):
        """No traceback (torch's shape propagation prints one): one line naming shape, model and failure."""
        code, out, err = run_main(capsys, "inspect", *args)
        assert code == 2 and out == "", err
        assert err.startswith("fx-sparsity inspect: error: " + message), err
        assert "Traceback" not in err and err.count("\n") == 1, err

    def test_input_check_leaves_the_model_as_it_was(self):
        from fx_sparsity.inspect_cli import check_inputs_run

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout())
        model[2].eval()  # mixed modes survive
        before = {k: v.clone() for k, v in model.state_dict().items()}
        check_inputs_run(model, (torch.randn(3, 4),))
        assert [m.training for m in model.modules()] == [True, True, True, False]
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BatchNorm update

    def test_argparse_errors_return_2(self, capsys):
        code, _, err = run_main(capsys, "inspect")
        assert code == 2 and "the following arguments are required: MODULE:FACTORY" in err
        code, _, err = run_main(capsys, "inspect", "models:mlp", "--tracer", "jit")
        assert code == 2 and "invalid choice: 'jit'" in err
        code, out, _ = run_main(capsys)
        assert code == 2 and "{demo,inspect,bench}" in out


class TestBench:
    def test_forwards_arguments(self, capsys):
        if importlib.util.find_spec("fx_sparsity.benchmarks") is None:
            pytest.skip("no fx_sparsity.benchmarks in this build")
        code, out, _ = run_main(capsys, "bench", "--help")
        assert code == 0 and "usage:" in out

    def test_missing_benchmarks(self, capsys, monkeypatch):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "fx_sparsity.benchmarks" else real(name, *a))
        code, _, err = run_main(capsys, "bench", "--quick")
        assert code == 2 and "the benchmarks are not part of this installation" in err


class TestDemo:
    @pytest.mark.slow
    def test_fast_run(self, tmp_path, capsys):
        plot = tmp_path / "masks.png"
        has_matplotlib = importlib.util.find_spec("matplotlib") is not None
        args = ["demo", "--fast", "--no-progress", "--level", "0.8", "--seed", "1"]
        code, out, err = run_main(capsys, *args, *(["--plot", str(plot)] if has_matplotlib else []))
        assert code == 0, err
        for needle in ("[1/5] dense", "[4/5] the prepared graph", "mask memory:",
                       "[5/5] lowered with the dynamic sparse-quantized mapping",
                       "SparseQuantizedDynamicLinear", "test accuracy", "sparse 80% (masked)",
                       "80%-sparse accuracy"):
            assert needle in out, needle
        if has_matplotlib:
            assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    @pytest.mark.slow
    def test_numbers(self):
        import io

        out = io.StringIO()
        result = run_demo(DemoConfig.fast(level=0.9, steps=3), out=out, progress=False)
        assert abs(result.sparsity - 0.9) < 0.01
        assert [s for s, _, _ in result.schedule] == [0, 1, 2, 3, 4]
        assert result.schedule[-1][1] == pytest.approx(0.9) and result.schedule[1][1] < 0.9
        assert result.lowering_error is None
        # fast mode trains briefly (the full demo's numbers are in the README); still real accuracies
        assert 0.9 < result.dense_accuracy <= 1 and 0.6 < result.sparse_accuracy <= 1
        assert abs(result.lowered_accuracy - result.sparse_accuracy) < 0.05
        assert set(result.latency_ms) == {"dense", "sparse", "lowered", "auto"}
        assert torch.get_num_threads() >= 1

    def test_missing_sklearn(self, capsys, monkeypatch):
        from fx_sparsity.demo import MissingExtra, load_digits_split

        message = ("the demo's data (scikit-learn's bundled digits) needs scikit-learn: "
                   'pip install "fx-sparsity[demo]"')
        for name in ("sklearn", "sklearn.datasets"):  # import sklearn.datasets -> ImportError, cached or not
            monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(MissingExtra) as info:
            load_digits_split(0)
        assert str(info.value) == message
        code, out, err = run_main(capsys, "demo", "--fast", "--no-progress")
        assert code == 2 and out == ""  # refused before any training
        assert err == f"fx-sparsity demo: error: {message}\n"

    @pytest.mark.slow  # runs the demo in a fresh process
    def test_no_sparse_beta_warning(self):
        """torch's "Sparse CSR tensor support is in beta" (once per process): not shown by the demo."""
        proc = subprocess.run([sys.executable, "-W", "always::UserWarning", "-m", "fx_sparsity", "demo", "--fast",
                               "--no-progress", "--steps", "1"], cwd=TESTS, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "lowered (auto: " in proc.stdout  # the CSR/BSR candidates were built
        assert "tensor support is in beta" not in proc.stderr, proc.stderr

    def test_missing_matplotlib(self, capsys, monkeypatch, tmp_path):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        code, out, err = run_main(capsys, "demo", "--fast", "--plot", str(tmp_path / "x.png"))
        assert code == 2 and out == ""  # refused before any training
        assert "--plot needs matplotlib, which is not installed: pip install 'fx-sparsity[plot]'" in err

    @pytest.mark.parametrize("args, message", [
        (["--steps", "0"], "bad --steps 0"),
        (["--block-shape", "4"], "bad --block-shape '4'"),
        (["--level", "x"], "bad --level 'x'"),
        (["--threads", "0"], "bad --threads 0"),
    ])
    def test_bad_arguments(self, capsys, args, message):
        code, out, err = run_main(capsys, "demo", "--fast", *args)
        assert code == 2 and out == "" and message in err


@pytest.mark.slow  # a fresh interpreter
def test_python_dash_m_entry_point():
    """One real process: `python -m fx_sparsity` wires main() to the exit status."""
    proc = subprocess.run([sys.executable, "-m", "fx_sparsity", "inspect", "models"], cwd=TESTS,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "fx-sparsity inspect: error: 'models' is not MODULE:FACTORY" in proc.stderr
