"""Command line: ``python -m fx_sparsity {demo,inspect,bench}`` (also the ``fx-sparsity`` script).

Exit status: 0 done; 1 the model or a library step failed; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fx-sparsity",
        description="torch.ao.pruning as a torch.fx graph transformation: run the demo, inspect a model's "
                    "sparse graph, or run the benchmarks.",
        epilog="exit status: 0 done, 1 the model or a library step failed, 2 bad arguments")
    sub = parser.add_subparsers(dest="command", metavar="{demo,inspect,bench}")

    demo = sub.add_parser(
        "demo", help="prune a digits classifier to 90%% end to end (built-in data, ~15 s)",
        description="Train an MLP on scikit-learn's 8x8 digits, prune it gradually with WeightNormSparsifier "
                    "and CubicSL, fine-tune, print the annotated graph, lower it with the dynamic "
                    "sparse-quantized mapping, and compare accuracy and latency with the dense model. The data "
                    "needs scikit-learn, which the demo extra installs.")
    demo.add_argument("--level", default="0.9", help="target sparsity level, a fraction (default 0.9)")
    demo.add_argument("--block-shape", default="1,4", help="sparse block shape rows,cols (default 1,4)")
    demo.add_argument("--steps", type=int, default=None,
                      help="pruning steps, one training epoch each (default 30; 5 with --fast)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, init and shuffling (default 0)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for this size)")
    demo.add_argument("--fast", action="store_true", help="a small model and few epochs: seconds, for tests")
    demo.add_argument("--plot", metavar="FILE.png", help="write mask heatmaps and the schedule (needs matplotlib)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    inspect = sub.add_parser(
        "inspect", help="print the annotated sparse graph of MODULE:FACTORY",
        description="Build the model MODULE:FACTORY() returns, prepare it with a WeightNormSparsifier (every "
                    "nn.Linear weight unless --tensors), compute the masks once and print the annotated graph.")
    inspect.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. mypkg.models:make_mlp")
    inspect.add_argument("--input-shape", action="append", metavar="D0,D1,...",
                         help="shape of an example input, e.g. 1,16 (repeat for several inputs); gives the "
                              "shape column, and is required with --tracer export")
    inspect.add_argument("--input-dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16",
                                                                      "int64", "int32"],
                         help="dtype of the example inputs (integer inputs are zeros); default float32")
    inspect.add_argument("--tracer", default="symbolic", choices=["symbolic", "export"])
    inspect.add_argument("--scope", default="model", metavar="SCOPE",
                         help="model (default), layers, or MODULE:CLASS of the blocks to trace one by one "
                              "(e.g. transformers.models.llama.modeling_llama:LlamaDecoderLayer)")
    inspect.add_argument("--kwarg", action="append", metavar="NAME=VALUE",
                         help="a keyword input passed with the example inputs, a Python literal (repeat for "
                              "several), e.g. --kwarg use_cache=False")
    inspect.add_argument("--level", default="0.5", help="sparsity level (default 0.5)")
    inspect.add_argument("--block-shape", default="1,4", help="sparse block shape rows,cols (default 1,4)")
    inspect.add_argument("--tensors", help="comma-separated tensor fqns to sparsify (default: every nn.Linear weight)")
    inspect.add_argument("--code", action="store_true", help="also print the generated code with mask lines marked")
    inspect.add_argument("--seed", type=int, default=0, help="torch seed before calling the factory (default 0)")

    sub.add_parser("bench", add_help=False, help="run the benchmark suite (arguments go to it; try bench --help)")
    return parser


def _error(command: str, message: str, code: int) -> int:
    print(f"fx-sparsity {command}: error: {message}", file=sys.stderr)
    return code


def _bench(argv: list[str]) -> int:
    if importlib.util.find_spec("fx_sparsity.benchmarks") is None:
        return _error("bench", "the benchmarks are not part of this installation (fx_sparsity.benchmarks is "
                               "missing: a partial install); reinstall it: "
                               "pip install --force-reinstall --no-deps fx-sparsity", 2)
    from fx_sparsity import benchmarks

    try:
        code = benchmarks.main(argv)
    except SystemExit as e:  # its argparse (--help, usage errors) or its own exit
        if isinstance(e.code, str):
            return _error("bench", e.code, 1)
        return int(e.code or 0)
    return int(code or 0)


def _demo(args) -> int:
    from .demo import DemoConfig, MissingExtra, run_demo
    from .inspect_cli import CLIError, parse_block_shape, parse_level

    try:
        overrides = dict(level=parse_level(args.level), block_shape=parse_block_shape(args.block_shape),
                         seed=args.seed, threads=args.threads, plot=args.plot)
    except CLIError as e:
        return _error("demo", str(e), e.code)
    if args.steps is not None:
        if args.steps < 1:
            return _error("demo", f"bad --steps {args.steps}: need at least 1 pruning step", 2)
        overrides["steps"] = args.steps
    if args.threads < 1:
        return _error("demo", f"bad --threads {args.threads}: need at least 1", 2)
    cfg = DemoConfig.fast(**overrides) if args.fast else DemoConfig(**overrides)
    try:
        run_demo(cfg, progress=not args.no_progress)
    except MissingExtra as e:
        return _error("demo", str(e), 2)
    return 0


def _inspect(args) -> int:
    from .inspect_cli import CLIError, inspect_model, parse_block_shape, parse_level

    try:
        text = inspect_model(
            args.factory, input_shapes=args.input_shape, input_dtype=args.input_dtype, tracer=args.tracer,
            level=parse_level(args.level), block_shape=parse_block_shape(args.block_shape),
            tensors=[t.strip() for t in args.tensors.split(",") if t.strip()] if args.tensors else None,
            code=args.code, seed=args.seed, scope=args.scope, kwargs=args.kwarg)
    except CLIError as e:
        return _error("inspect", str(e), e.code)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors; callers get the status
        return int(e.code or 0)
    if args.command == "demo":
        return _demo(args)
    if args.command == "inspect":
        return _inspect(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
