"""The one console command, `simsearch`, dispatching to each stage's own `main(argv)`.

Stages are imported only when their subcommand runs, so a serving-only install (no PyTorch)
can run `serve`, `index` and `triton`.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("pretrain.train", "SimCLR pretraining on an image folder (torchrun for many GPUs)"),
    "eval": ("pretrain.evaluate", "kNN and linear-probe accuracy of a checkpoint's encoder"),
    "export": ("export.cli", "checkpoint -> verified ONNX model directory + Triton repository"),
    "index": ("index.cli", "build / query / stats / remove an image index"),
    "serve": ("server.cli", "run the HTTP API and search page"),
    "triton": ("tritonlocal.launcher", "serve a model directory with a local Triton server (CPU)"),
    "demo": ("simsearch.demo", "pretrain, export, index and serve a folder in one go"),
}
# pyproject.toml's extras each command needs besides the base install and an ONNX Runtime (cpu or gpu);
# `index` needs `serve` only for --triton-url
EXTRAS: dict[str, tuple[str, ...]] = {
    "pretrain": ("train",), "eval": ("train",), "export": ("train",), "index": (), "serve": ("serve",),
    "triton": ("serve", "triton"), "demo": ("serve", "train"),
}


def _usage() -> str:
    lines = ["usage: simsearch COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`simsearch COMMAND --help` for each command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from simsearch import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"simsearch: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # FAISS and PyTorch run OpenMP; its threads spin while they wait by default, which on a machine
    # whose cores are shared (serve --workers N, an indexer beside a server) makes a k-means or a
    # batched search tens of times slower. Set before the libraries load; the user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:  # a serving-only install, or the API image (no PyTorch, no tritonlocal)
        extras = ",".join(("cpu", *EXTRAS.get(name, ())))
        print(f"simsearch {name}: module {e.name!r} is not installed; install what this command needs "
              f"with: pip install '.[{extras}]'", file=sys.stderr)
        return 2
    try:
        result = module.main(rest)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (`index` says more for a build)
        print(f"simsearch {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `simsearch index dups ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
