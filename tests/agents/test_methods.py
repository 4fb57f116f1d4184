"""The method registry drives `strato train`, `strato bench`, option validation and dispatch."""

from __future__ import annotations

import csv
import json
import re
import zipfile
from dataclasses import dataclass

import pytest
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, PPO

from agents.bench import BenchConfig, run_bench
from agents.cli import main
from agents.config import load_train_config
from agents.methods import METHODS, Method
from agents.ppo.train import A2CConfig, PPOConfig, TRPOConfig, load_policy
from agents.result import SearchResult
from strato_env.config import from_dict
from strato_env.validation import check_int

TINY_BENCH = {
    "env": {"decisions": 2, "inner_steps": 5, "probe_steps": 1, "task": {"train_examples": 64, "eval_examples": 16}},
    "test_instances": [{}],
    "seeds": [0],
    "search_steps": [40],
}


@dataclass
class LastLayerOptions:
    """Options of the test method."""

    rank: int = 4
    """Rank given to every module of the last layer."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)


def last_layer(env, seed, cap, options: LastLayerOptions) -> SearchResult:
    last = max(m.layer for m in env.modules)
    return SearchResult("last_layer", {m.name: options.rank if m.layer == last else 0 for m in env.modules}, 0)


@pytest.fixture
def registered(monkeypatch):
    """A new method, added by one registry entry."""
    entry = Method("last_layer", "every module of the last layer at one rank", LastLayerOptions, last_layer)
    monkeypatch.setitem(METHODS, "last_layer", entry)
    return entry


def test_one_registry_entry_adds_a_method_to_the_cli_the_bench_and_validation(registered, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert re.search(r"^  last_layer +every module of the last layer at one rank$", help_text, re.MULTILINE)
    assert "options.last_layer.rank=4" in help_text and "Rank given to every module of the last layer." in help_text

    with pytest.raises(ValueError, match=r"rank=0 is invalid: expected an integer >= 1"):
        from_dict(BenchConfig, TINY_BENCH | {"methods": ["last_layer"], "options": {"last_layer": {"rank": 0}}})
    with pytest.raises(ValueError, match=r"unknown key options.last_layer.ranks"):
        from_dict(BenchConfig, TINY_BENCH | {"methods": ["last_layer"], "options": {"last_layer": {"ranks": 2}}})

    config = from_dict(
        BenchConfig,
        TINY_BENCH | {"methods": ["last_layer"], "options": {"last_layer": {"rank": 2}}, "runs_dir": str(tmp_path)},
    )
    path = run_bench(config)
    with open(path / "results.csv") as file:
        rows = {row["method"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"uniform", "oracle", "last_layer"} and rows["last_layer"]["status"] == "ok"
    cell = json.loads(next((path / "cells").glob("last_layer-*.json")).read_text())
    assert sorted(set(cell["allocation"].values())) == [0, 2]  # its options reached its search

    assert main(["train", "agent=last_layer", f"runs_dir={tmp_path}"]) == 2  # not a trainable agent
    assert "agent='last_layer' is invalid: allowed ['go_explore', 'ppo', 'maskable_ppo', 'a2c', 'trpo']" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("agent", "cls"), [("ppo", PPO), ("maskable_ppo", MaskablePPO), ("a2c", A2C)])
def test_the_agent_selects_the_learner(agent, cls, tmp_path):
    ppo_only = [] if agent == "a2c" else ["ppo.batch_size=4", "ppo.n_epochs=1"]
    overrides = [f"agent={agent}", "env.decisions=2", "env.inner_steps=1", "env.probe_steps=1",
                 "ppo.total_timesteps=4", "ppo.n_steps=4", "ppo.n_envs=1", "ppo.warm_start_epochs=2",
                 *ppo_only]  # fmt: skip
    assert main(["train", *overrides, f"runs_dir={tmp_path}", "name=run"]) == 0
    policy = tmp_path / "run" / "policy.zip"
    with zipfile.ZipFile(policy) as archive:
        assert json.loads(archive.read("strato.json"))["algorithm"] == agent
    assert type(load_policy(str(policy))) is cls
    assert (tmp_path / "run" / "tensorboard" / f"{agent}_1").is_dir()


def test_options_of_another_learner_are_rejected_not_dropped():
    assert type(load_train_config(None, ["agent=a2c"]).ppo) is A2CConfig
    assert type(load_train_config(None, ["agent=trpo"]).ppo) is TRPOConfig
    assert type(load_train_config(None, ["agent=ppo"]).ppo) is PPOConfig
    for key in ("clip_range=0.1", "batch_size=4", "n_epochs=2"):
        with pytest.raises(ValueError, match=rf"unknown key ppo.{key.split('=')[0]}; .*\(agent=a2c\)"):
            load_train_config(None, ["agent=a2c", f"ppo.{key}"])
    with pytest.raises(ValueError, match=r"go_explore: does not apply to agent='ppo'"):
        load_train_config(None, ["agent=ppo", "go_explore.max_optimizer_steps=10"])
    with pytest.raises(ValueError, match=r"ppo: does not apply to agent='go_explore'"):
        load_train_config(None, ["agent=go_explore", "ppo.n_steps=4"])
