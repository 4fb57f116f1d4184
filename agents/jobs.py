"""The jobs behind the `strato` command: train, apply and inspect. Each writes or prints, never half-done."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from agents.config import TrainConfig, merge
from agents.evaluation import gap_closed, uniform_allocation, uniform_loss
from agents.ppo.meta import MetaTraining, meta_train
from agents.ppo.train import EpisodeLog, load_policy, run_policy_episode, save_policy
from agents.runs import RunFolder, learning_curve, loss_versus_params, rank_heatmap
from strato_env.config import EnvConfig, from_dict
from strato_env.env import RankAllocationEnv
from strato_env.models import find_target_modules, load_model
from strato_env.observation import slots_of


def _score(env: RankAllocationEnv, loss: float, allocation: dict[str, int], seed: int) -> dict[str, Any]:
    """One report row: the method's loss against uniform LoRA and (planted) the oracle, at the env's budget."""
    uniform = uniform_loss(env, seed=0)
    static = env.evaluate_allocation(allocation, seed=0)
    return {
        "instance": env.config.label,
        "seed": seed,
        "loss": loss,
        "static_loss": static,
        "uniform_loss": uniform,
        "oracle_loss": env.oracle_loss,
        "gap_closed": gap_closed(loss, uniform, env.oracle_loss),
        "static_gap_closed": gap_closed(static, uniform, env.oracle_loss),
        "params": env.params_of(allocation),
        "budget": env.budget,
    }


def _write_results(
    run: RunFolder,
    env: RankAllocationEnv,
    allocation: dict[str, int],
    rows: list[dict[str, Any]],
    evaluation: list[dict[str, Any]],
    curve_x: str,
    title: str,
    points: list[dict[str, Any]] | None = None,
    notes: list[str] | None = None,
    validation: list[dict[str, Any]] | None = None,
) -> None:
    """allocation.json, adapter/, metrics.csv, evaluation.csv, plots and report.md (written last)."""
    run.write_json("allocation.json", allocation)
    if any(allocation.values()) or env.extra_params:
        env.export_adapter(str(run.path / "adapter"))
    else:
        title += " (no adapter: the allocation adapts no module)"
    run.write_csv("metrics.csv", rows)
    run.write_csv("evaluation.csv", evaluation)
    run.save_figure("learning_curve.png", learning_curve(rows, curve_x, title, validation or []))
    run.save_figure("rank_heatmap.png", rank_heatmap(env.modules, allocation, f"{title}: ranks"))
    references = {
        "uniform LoRA": (env.params_of(uniform_allocation(env)), evaluation[0]["uniform_loss"]),
        title: (evaluation[0]["params"], evaluation[0]["static_loss"]),
    }
    if env.oracle_loss is not None:
        references["oracle"] = (env.params_of(env.oracle_allocation), env.oracle_loss)
    run.save_figure("loss_vs_params.png", loss_versus_params(points or rows, references, env.budget, env.config.label))
    run.write_text("report.md", _report(title, evaluation, run.wall_seconds, notes or []))


def _report(title: str, evaluation: list[dict[str, Any]], wall_seconds: float, notes: list[str]) -> str:
    columns = ["instance", "split", "loss", "static_loss", "uniform_loss", "oracle_loss", "gap_closed", "params"]
    columns.append("budget")
    lines = [
        f"# {title}",
        "",
        f"Wall time: {wall_seconds:.0f} s.",
        "",
        *(line for note in notes for line in (note, "")),
        "`loss`: the method's own episode; `static_loss`: its final allocation trained for one episode from "
        "seed 0, like uniform LoRA and the oracle; `gap_closed` = (uniform - loss) / (uniform - oracle).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in evaluation:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "![learning curve](learning_curve.png)",
        "![ranks](rank_heatmap.png)",
        "![loss versus parameters](loss_vs_params.png)",
        "",
    ]
    return "\n".join(lines)


def _run_name(config: TrainConfig) -> str:
    return config.name or f"{config.agent}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: TrainConfig) -> Path:
    """Train an agent on the config's instances and write a complete run folder; returns its path."""
    run = RunFolder(config.runs_dir, _run_name(config))
    try:
        run.write_yaml("config.yaml", config.to_dict())
        envs = [RankAllocationEnv(config.env_config(instance)) for instance in config.train_instances]
        if config.agent == "go_explore":
            _train_go_explore(config, envs[0], run)
        else:
            _train_policy(config, envs, run)
    except BaseException as error:
        run.mark_interrupted(f"{type(error).__name__}: {error}")
        raise
    run.finish()
    return run.path


def _train_policy(config: TrainConfig, envs: list[RankAllocationEnv], run: RunFolder) -> None:
    rows: list[dict[str, Any]] = []
    validation = [config.env_config(instance) for instance in config.validation_instances]
    meta = meta_train(
        config.agent,
        config.ppo,
        [env.config for env in envs],
        validation,
        config.seed,
        callbacks=[EpisodeLog(rows.append)],
        tensorboard_log=str(run.path / "tensorboard"),
        progress_bar=True,
    )
    save_policy(meta.model, run.path / "policy.zip")
    if meta.validation:
        run.write_csv("validation.csv", meta.validation)
    run.write_json("meta_training.json", {"optimizer_steps": meta.optimizer_steps, "warm_start": meta.warm_start})

    # scoring restores each env's episode, so envs[0] ends holding the policy's trained adapter for export
    episodes, evaluation = [], []
    splits = {"train": envs, "validation": [RankAllocationEnv(c) for c in validation]}
    splits["test"] = [RankAllocationEnv(config.env_config(i)) for i in config.test_instances]
    for split, split_envs in splits.items():
        for env_ in split_envs:
            episodes.append(run_policy_episode(meta.model, env_, seed=config.seed))
            score = _score(env_, episodes[-1]["loss"], episodes[-1]["allocation"], config.seed)
            evaluation.append(score | {"split": split})
    _write_results(
        run, envs[0], episodes[0]["allocation"], rows, evaluation, "timesteps", config.agent,
        notes=_meta_notes(meta), validation=meta.validation,
    )  # fmt: skip


def _meta_notes(meta: MetaTraining) -> list[str]:
    """The report's lines on the warm start and the validation checkpoints."""
    lines = [f"Meta-training: {meta.optimizer_steps} optimizer steps (probes, warm start and validation included)."]
    if meta.warm_start:
        lines.append(
            f"Warm start: {meta.warm_start['decisions']} {meta.warm_start['teacher']} decisions cloned; the policy's "
            "most likely move is "
            f"the teacher's on {meta.warm_start['agreement']:.1%} of module slots."
        )
    if meta.validation:
        best = max(meta.validation, key=lambda row: row["return"])
        curve = ", ".join(f"{row['timesteps']}: {row['return']:.4g}" for row in meta.validation)
        lines.append(
            f"Validation (mean return of deterministic episodes, by timesteps): {curve}; the policy kept is the one "
            f"at {best['timesteps']} timesteps."
        )
    return lines


def _train_go_explore(config: TrainConfig, env: RankAllocationEnv, run: RunFolder) -> None:
    from agents.go_explore import GoExplore

    agent = GoExplore(config.go_explore)
    rows: list[dict[str, Any]] = []
    with tqdm(total=config.go_explore.max_optimizer_steps, desc="go_explore", unit="step") as bar:

        def progress(steps: int, best_loss: float) -> None:
            bar.update(steps - bar.n)
            bar.set_postfix(best_loss=f"{best_loss:.4g}")
            rows.append({"optimizer_steps": steps, "loss": best_loss})

        result = agent.run(env, seed=config.seed, progress=progress)
    agent.archive.save(str(run.path / "archive.json"))
    _, info = env.reset(seed=config.seed, options={"allocation": result.start} if result.start else None)
    for action in result.trajectory:  # the adapter to export is the one the best trajectory trains
        _, _, _, _, info = env.step(action)
    if not math.isclose(info["loss"], result.loss, rel_tol=1e-6) or info["allocation"] != result.allocation:
        raise RuntimeError(
            f"replaying the best trajectory from reset gave loss {info['loss']} and allocation {info['allocation']}, "
            f"not the archived {result.loss} and {result.allocation}: the episode is not reproducible"
        )
    evaluation = [
        _score(env, result.loss, result.allocation, config.seed)
        | {"split": "train", "search_optimizer_steps": result.optimizer_steps}
    ]
    points = [{"params": env.params_of(e.allocation), "loss": e.loss} for e in agent.archive if np.isfinite(e.loss)]
    _write_results(run, env, result.allocation, rows, evaluation, "optimizer_steps", "go_explore", points)


def _run_config_of(policy: str) -> dict[str, Any]:
    """The env settings of the run that trained `policy` (its config.yaml), if it sits in a run folder."""
    config_path = Path(policy).parent / "config.yaml"
    if not config_path.is_file():
        return {}
    return (yaml.safe_load(config_path.read_text()) or {}).get("env", {})


def apply(
    policy: str, model: str, out: str, task: dict[str, Any] | None = None, budget: int | None = None, seed: int = 0
) -> Path:
    """Run a trained policy on a new model's env (no policy training) and write a run folder with its adapter."""
    if not Path(policy).is_file():
        raise ValueError(f"--policy {policy!r}: no such file")
    agent = load_policy(policy)
    env_values = merge(_run_config_of(policy), {"model": model, "max_modules": slots_of(agent.observation_space)})
    env_values.pop("budget", None)  # the trained-on budget does not fit another model
    if task:
        env_values["task"] = merge(env_values.get("task", {}), task) if task.get("name") in (None, "planted") else task
    if budget is not None:
        env_values["budget"] = budget
    env_config = from_dict(EnvConfig, env_values)
    out_path = Path(out)
    run = RunFolder(out_path.parent, out_path.name)
    try:
        run.write_yaml("config.yaml", {"policy": str(policy), "seed": seed, "env": env_config.to_dict()})
        env = RankAllocationEnv(env_config)
        episode = run_policy_episode(agent, env, seed=seed)
        evaluation = [_score(env, episode["loss"], episode["allocation"], seed) | {"split": "applied"}]
        _write_results(
            run, env, episode["allocation"], episode["decisions"], evaluation, "decision", f"policy on {model}"
        )
    except BaseException as error:
        run.mark_interrupted(f"{type(error).__name__}: {error}")
        raise
    run.finish()
    return run.path


def inspect(
    model: str, target_modules: list[str] | str | None = None, rank_ladder: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
) -> str:
    """A table of the model's target modules: kind, layer, shape and LoRA parameters per rank."""
    config = from_dict(EnvConfig, {"model": model, "target_modules": target_modules, "rank_ladder": rank_ladder})
    modules = find_target_modules(load_model(config.model), config.target_modules)
    ranks = [r for r in config.rank_ladder if r > 0]
    header = f"{'module':<48} {'kind':<14} {'stack':<8} {'layer':>5} {'in':>6} {'out':>6} {'per rank':>9} " + " ".join(
        f"{'r=' + str(r):>9}" for r in ranks
    )
    lines = [f"{model}: {len(modules)} target modules", header, "-" * len(header)]
    for m in modules:
        stack = "cross" if m.cross_attention else m.stack
        lines.append(
            f"{m.name:<48} {m.kind:<14} {stack:<8} {m.layer:>5} {m.in_features:>6} {m.out_features:>6} "
            f"{m.params_per_rank:>9} " + " ".join(f"{r * m.params_per_rank:>9}" for r in ranks)
        )
    total = sum(m.params_per_rank for m in modules)
    lines.append(f"{'all modules (uniform rank)':<92} {total:>9} " + " ".join(f"{r * total:>9}" for r in ranks))
    return "\n".join(lines)
