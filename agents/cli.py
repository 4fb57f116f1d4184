"""`strato`: train an allocation policy, apply it to a new model, benchmark methods, inspect a model."""

from __future__ import annotations

import argparse
import sys

from agents.bench.config import BenchConfig
from agents.bench.executors import BACKENDS
from agents.config import ENV_SECTION, TRAIN_HELP_SECTIONS, TrainConfig, config_help, key_lines
from agents.methods import METHODS, trainable_agents

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def _options_help() -> str:
    lines = ["per-method options (options.METHOD.KEY=value):"]
    for name, method in METHODS.items():
        lines += key_lines(f"options.{name}.", method.options, method.options(), skip=method.fixed_options)
    return "\n".join(lines)


def _methods_help(names: list[str]) -> str:
    width = max(map(len, names))
    return "\n".join(f"  {name:<{width}}  {METHODS[name].summary}" for name in names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strato", description=__doc__, formatter_class=DEFAULTS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train an allocation policy or run a Go-Explore search; writes a run folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"agents (agent=NAME):\n{_methods_help(trainable_agents())}\n\n"
        + config_help(TrainConfig, TRAIN_HELP_SECTIONS),
        description="strato train [CONFIG.yaml] [key=value ...]: with no arguments, MaskablePPO on the embedded "
        "default (planted instance on gpt2-tiny).",
    )
    train.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]", help="a YAML config and overrides")

    apply = commands.add_parser(
        "apply", help="run a learned policy on a new model and export its adapter", formatter_class=DEFAULTS
    )
    apply.add_argument("--policy", required=True, help="policy.zip written by `strato train`")
    apply.add_argument("--model", required=True, help="tiny preset, hub id or local model directory")
    apply.add_argument(
        "--task",
        default=None,
        choices=["planted", "causal_lm", "classification"],
        help="task family (default: the policy's training task)",
    )
    apply.add_argument(
        "--data", default=None, help="text file/folder, CSV or hub dataset id (causal_lm, classification)"
    )
    apply.add_argument("--profile", default=None, help="planted rank profile, e.g. bottom-heavy")
    apply.add_argument("--budget", type=int, default=None, help="parameter budget (default: the env's default)")
    apply.add_argument("--seed", type=int, default=0, help="episode seed")
    apply.add_argument("--out", required=True, help="run folder to create")

    bench = commands.add_parser(
        "bench",
        help="run a benchmark grid of methods x instances x seeds; writes results.csv, summary.md and plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"methods (methods=[...]; uniform and the planted oracle always run):\n{_methods_help(list(METHODS))}"
        "\n\n" + config_help(BenchConfig, {"env": ENV_SECTION}) + "\n" + _options_help(),
        description="strato bench CONFIG.yaml [key=value ...], e.g. configs/bench_planted.yaml or "
        "configs/bench_text.yaml. Rerunning the same command resumes an interrupted benchmark.",
    )
    bench.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]", help="a YAML config and overrides")
    bench.add_argument("--quick", action="store_true", help="apply the config's `quick` section (default: False)")
    bench.add_argument("--workers", type=int, default=1, help="cells run at once (default: 1)")
    bench.add_argument("--backend", default="process", choices=BACKENDS, help="process pool or Ray (default: process)")
    bench.add_argument(
        "--publish", default=None, metavar="DIR", help="also write DIR/RESULTS.md and DIR/results/ (default: None)"
    )

    inspect = commands.add_parser(
        "inspect", help="list a model's target modules, shapes and cost per rank", formatter_class=DEFAULTS
    )
    inspect.add_argument("--model", required=True, help="tiny preset, hub id or local model directory")
    inspect.add_argument("--target-modules", default=None, help="regex over module names overriding discovery")

    from inspect import signature

    from strato_env.pretrain import pretrain as pretrain_model

    default = {name: p.default for name, p in signature(pretrain_model).parameters.items()}  # one source of defaults
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain a tiny causal LM preset on a text corpus; writes a Hugging Face model folder",
        formatter_class=DEFAULTS,
        description="strato pretrain --model gpt2-tiny --data CORPUS.txt --out DIR: trains the preset from random "
        "weights on the corpus (deterministic on CPU) and writes DIR, usable as model=DIR. Rerunning the same "
        "command on a finished DIR does nothing.",
    )
    pretrain.add_argument("--model", required=True, help="a tiny causal LM preset, e.g. gpt2-tiny or llama-tiny")
    pretrain.add_argument("--data", required=True, help="a local UTF-8 text file; its last 10%% is held out")
    pretrain.add_argument("--steps", type=int, default=default["steps"], help="optimizer steps")
    pretrain.add_argument("--out", required=True, help="model folder to create")
    pretrain.add_argument(
        "--seed", type=int, default=default["seed"], help="seed of the random init and of the windows drawn"
    )
    pretrain.add_argument(
        "--seq-len", type=int, default=default["seq_len"], help="tokens (UTF-8 bytes) per training window"
    )
    pretrain.add_argument("--batch-size", type=int, default=default["batch_size"], help="windows per step")
    pretrain.add_argument(
        "--learning-rate", type=float, default=default["learning_rate"], help="AdamW's peak learning rate"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides written after an option, e.g. `strato bench CONFIG --quick seeds=[0]`
        if args.command not in ("train", "bench") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items += extra
    from agents import jobs
    from strato_env.engine import keep_freed_memory

    keep_freed_memory()
    try:
        if args.command in ("train", "bench"):
            config_path = args.items[0] if args.items and "=" not in args.items[0] else None
            overrides = args.items[1:] if config_path else args.items
        if args.command == "train":
            from agents.config import load_train_config

            path = jobs.train(load_train_config(config_path, overrides))
            print(f"run folder: {path}")
        elif args.command == "bench":
            from agents.bench import load_bench_config, run_bench

            config = load_bench_config(config_path, overrides, quick=args.quick)
            command = " ".join(["strato", *(argv if argv is not None else sys.argv[1:])])
            path = run_bench(config, args.workers, args.backend, command=command, publish=args.publish)
            print(f"run folder: {path}")
        elif args.command == "apply":
            task = {k: v for k, v in (("name", args.task), ("data", args.data), ("profile", args.profile)) if v}
            path = jobs.apply(args.policy, args.model, args.out, task=task or None, budget=args.budget, seed=args.seed)
            print(f"run folder: {path}")
        elif args.command == "pretrain":
            from strato_env.pretrain import pretrain

            result = pretrain(
                args.model,
                args.data,
                args.out,
                steps=args.steps,
                seed=args.seed,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
            )
            print(f"model folder: {result.path}")
        else:
            print(jobs.inspect(args.model, args.target_modules))
    except ValueError as error:
        print(f"strato {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
