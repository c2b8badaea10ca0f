"""Command line: `python -m cldm generate|convert|batch|bench|train|demo-eval ...`.

generate and convert live in `cldm.cli`; the wings are imported only when their command runs: bench in
`cldm.bench.command`, batch in `cldm.scale.batch`, train and demo-eval in `cldm.training.cli` (inference never
loads the training code or diffusers, and a preprocessor's model only when `--preprocessor` names it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cldm import cli
from cldm.errors import CldmError


def _training():
    from cldm.training import cli as training

    return training


def _bench():
    from cldm.bench import command

    return command


def _batch():
    from cldm.scale import batch  # the preprocessors; Ray only with --ray

    return batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cldm", description="Stable Diffusion 1.5 + ControlNet")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_generate_args(sub.add_parser("generate", help="make pictures from a prompt and hint images"))
    cli.add_convert_args(
        sub.add_parser("convert", help="rewrite weights: .ckpt/.pth -> .safetensors, diffusers <-> original")
    )
    bench = sub.add_parser(
        "bench", help="time our model beside diffusers on the same random weights (SD1.5, or --family sdxl|sd2)"
    )
    _bench().add_bench_args(bench)
    words = sys.argv[1:] if argv is None else argv
    batch = sub.add_parser("batch", help="many pictures from a jobs file (.csv/.jsonl); --ray to run it on Ray")
    if any(w in ("batch", "-h", "--help") for w in words):  # the preprocessors load only for a batch
        _batch().add_batch_args(batch)
    wants_training = any(w in ("train", "demo-eval", "-h", "--help") for w in words)
    if wants_training:  # their options name training constants: parse them only when asked for
        training = _training()
        training.add_train_args(
            sub.add_parser("train", help="train the small shapes model family (VAE, base, ControlNets) from scratch")
        )
        training.add_demo_eval_args(
            sub.add_parser("demo-eval", help="measure how well the demo model follows hints and prompts")
        )
    else:
        sub.add_parser("train", help="train the small shapes model family (VAE, base, ControlNets) from scratch")
        sub.add_parser("demo-eval", help="measure how well the demo model follows hints and prompts")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if a.command == "generate":
            cli.cmd_generate(a)
        elif a.command == "convert":
            cli.cmd_convert(a)
        elif a.command == "batch":
            return _batch().cmd_batch(a)  # 1 when a row failed
        elif a.command == "bench":
            _bench().cmd_bench(a)
        elif a.command == "train":
            _training().cmd_train(a)
        else:
            _training().cmd_demo_eval(a)
    except CldmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
