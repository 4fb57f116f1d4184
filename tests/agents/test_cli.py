import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from peft import PeftModel

from agents.cli import main
from agents.config import INSTANCE_SETS, expand_instances, load_train_config
from agents.runs import UNFINISHED, is_complete
from strato_env.models import load_model

TINY_RUN = [
    "env.decisions=2",
    "env.inner_steps=1",
    "env.probe_steps=2",
    "ppo.total_timesteps=8",
    "ppo.n_steps=4",
    "ppo.batch_size=4",
    "ppo.n_epochs=1",
    "ppo.n_envs=1",
    "ppo.warm_start_epochs=20",
    "ppo.eval_every=1",
    "validation_instances=[{task: {profile: bottom-heavy}}]",
]
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
RUN_FILES = {
    "config.yaml",
    "allocation.json",
    "adapter",
    "metrics.csv",
    "evaluation.csv",
    "report.md",
    "learning_curve.png",
    "rank_heatmap.png",
    "loss_vs_params.png",
    "tensorboard",
}


def _check_adapter(run: Path, model_name: str) -> dict[str, int]:
    allocation = json.loads((run / "allocation.json").read_text())
    reloaded = PeftModel.from_pretrained(load_model(model_name), run / "adapter")
    for name, rank in allocation.items():
        layer = reloaded.base_model.model.get_submodule(name)
        if rank:
            assert layer.lora_A["default"].weight.shape[0] == rank
        else:
            assert not hasattr(layer, "lora_A"), f"{name} has rank 0 but an adapter"
    for png in run.glob("*.png"):
        assert png.stat().st_size > 1000
    return allocation


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY_RUN, f"runs_dir={runs}", "name=tiny"]) == 0
    return runs / "tiny"


def test_train_writes_a_complete_run_folder(trained_run):
    assert is_complete(trained_run)
    assert RUN_FILES | {"policy.zip", "validation.csv", "meta_training.json"} <= {p.name for p in trained_run.iterdir()}
    with open(trained_run / "validation.csv") as file:  # after the warm start and after each of 2 rollouts
        assert [int(row["timesteps"]) for row in csv.DictReader(file)] == [0, 4, 8]
    meta = json.loads((trained_run / "meta_training.json").read_text())
    assert meta["warm_start"]["decisions"] == 2 and meta["optimizer_steps"] > 8  # one teacher episode
    report = (trained_run / "report.md").read_text()
    assert "| gpt2-tiny/planted/bottom-heavy | validation |" in report
    assert "Warm start: 2 greedy_iterative decisions" in report
    allocation = _check_adapter(trained_run, "gpt2-tiny")
    assert any(allocation.values())
    assert yaml.safe_load((trained_run / "config.yaml").read_text())["env"]["decisions"] == 2
    assert "| gpt2-tiny/planted/top-heavy | train |" in report


def test_apply_runs_the_policy_on_another_family(trained_run, tmp_path):
    out = tmp_path / "applied"
    code = main(["apply", "--policy", str(trained_run / "policy.zip"), "--model", "llama-tiny", "--out", str(out)])
    assert code == 0 and is_complete(out)
    assert RUN_FILES - {"tensorboard", "learning_curve.png"} <= {p.name for p in out.iterdir()}
    allocation = _check_adapter(out, "llama-tiny")
    assert len(allocation) == 28


def test_go_explore_run_writes_its_archive(tmp_path):
    code = main(
        [
            "train",
            "agent=go_explore",
            "env.decisions=2",
            "env.inner_steps=1",
            "env.probe_steps=2",
            "go_explore.max_optimizer_steps=6",
            f"runs_dir={tmp_path}",
            "name=ge",
        ]
    )
    assert code == 0 and is_complete(tmp_path / "ge")
    archive = json.loads((tmp_path / "ge" / "archive.json").read_text())
    finished = [c for c in archive["cells"] if c["finished"]]
    best = min(finished, key=lambda c: (c["loss"], c["optimizer_steps"]))
    allocation = _check_adapter(tmp_path / "ge", "gpt2-tiny")
    assert allocation == best["allocation"]  # the run exports the archive's best finished trajectory
    with open(tmp_path / "ge" / "evaluation.csv") as file:
        row = next(csv.DictReader(file))
    assert float(row["loss"]) == pytest.approx(best["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.n_step=4"], "unknown key ppo.n_step"),
        (["env.budgett=10"], "unknown key budgett"),
        (["agent=dqn"], "agent='dqn' is invalid"),
        (["env.inner_steps=0"], "inner_steps=0 is invalid"),
        (["train_instances=[{model: gpt2-tiny, task: {profile: diagonal}}]"], "task.profile='diagonal'"),
        (["seed=1", "bogus"], "expected key=value"),
        (["train_instances.0.task.profile=mlp-only"], "train_instances={'0': {'task'"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(overrides, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_train_config(None, overrides)
    assert main(["train", *overrides, f"runs_dir={tmp_path}"]) == 2
    assert message.split("'")[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # rejected before any work: no run folder


def test_an_override_that_does_not_fit_the_file_is_a_clear_error(tmp_path, capsys):
    transfer = str(CONFIGS_DIR / "transfer.yaml")  # its train_instances is a list: a mapping cannot merge into it
    with pytest.raises(ValueError, match="the overrides do not fit the config"):
        load_train_config(transfer, ["train_instances.0.task.profile=mlp-only"])
    assert main(["train", transfer, "train_instances.0.task.profile=mlp-only", f"runs_dir={tmp_path}"]) == 2
    assert "strato train: error: the overrides do not fit the config" in capsys.readouterr().err


def test_yaml_config_file_with_an_unknown_key(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("agent: go_explore\nenv: {decisions: 2, inner_steps: 1}\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown key bogus"):
        load_train_config(str(config))


@pytest.mark.slow
def test_a_run_interrupted_mid_training_stays_marked_unfinished_with_the_reason(tmp_path):
    """Ctrl-C (SIGINT) during a real `strato train`: the folder keeps UNFINISHED, saying why, and no report."""
    run = tmp_path / "interrupted"
    overrides = [
        "env.decisions=2",
        "env.inner_steps=1",
        "env.probe_steps=1",
        "ppo.n_envs=1",
        "ppo.total_timesteps=4000",
        "ppo.warm_start_epochs=2",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "agents.cli", "train", *overrides, f"runs_dir={tmp_path}", "name=interrupted"],
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # as in a terminal: a suite started in the background (`pytest &`) passes SIGINT on ignored, and Python
        # keeps an inherited SIG_IGN, so the child would never see the Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "tensorboard").glob("*/events.*")):  # training has started
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # never leave a training process behind the suite
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"strato train kept running 60 s after SIGINT; its stderr ends: {stderr[-2000:].decode()}")
    assert process.returncode != 0 and b"KeyboardInterrupt" in stderr
    marker = (run / UNFINISHED).read_text()
    assert marker.startswith("interrupted after") and "KeyboardInterrupt" in marker
    assert not is_complete(run) and not (run / "report.md").exists() and not (run / "policy.zip").exists()


def test_inspect_lists_modules(capsys):
    assert main(["inspect", "--model", "bert-tiny"]) == 0
    out = capsys.readouterr().out
    assert "bert-tiny: 24 target modules" in out and "encoder.layer.3.output.dense" in out
    assert "cls.predictions" not in out


CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("bench_")], ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    written = yaml.safe_load(path.read_text())
    config = load_train_config(str(path))
    resolved = config.to_dict()
    for key, value in written.items():  # every key the file sets reaches the resolved config unchanged
        if isinstance(value, dict) and key in ("ppo", "go_explore"):
            assert {k: resolved[key][k] for k in value} == value, key
        elif key in INSTANCE_SETS:  # `generated` entries expand to one instance per model and seed
            assert resolved[key] == expand_instances(value, key), key
        else:
            assert resolved[key] == value, key
    for instance in config.train_instances + config.test_instances:
        assert config.env_config(instance).decisions == written.get("env", {}).get("decisions", 8)
