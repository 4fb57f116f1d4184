import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agents.bench import BenchConfig, load_bench_config, run_bench
from agents.bench.cells import FINAL_SEED, grid, run_cells
from agents.bench.report import instance_labels, summary_markdown, table_rows
from agents.evaluation import mean_ci, paired_bootstrap
from agents.methods import METHODS
from agents.runs import UNFINISHED, is_complete
from strato_env.config import from_dict

ROOT = Path(__file__).resolve().parents[2]
PLANTED = str(ROOT / "configs" / "bench_planted.yaml")
TASK = {"train_examples": 64, "eval_examples": 16, "test_examples": 16}
TINY = {
    "env": {"decisions": 2, "inner_steps": 5, "probe_steps": 1, "task": TASK},
    "train_instances": [{}],
    "test_instances": [{"model": "bert-tiny"}],
    "seeds": [0],
    "search_steps": [40],
    "quick": {},
}


def _tiny(tmp_path, name, **values) -> BenchConfig:
    return from_dict(BenchConfig, TINY | {"runs_dir": str(tmp_path), "name": name} | values)


def _results(path: Path) -> list[dict[str, str]]:
    with open(path / "results.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = load_bench_config(PLANTED, [f"runs_dir={tmp_path_factory.mktemp('bench')}"], quick=True)
    return config, run_bench(config)


@pytest.mark.slow
def test_quick_bench_writes_every_cell_references_and_plots(quick_run):
    config, path = quick_run
    assert is_complete(path) and config.name == "bench_planted-quick"
    rows = _results(path)
    labels = instance_labels(config)
    expected = set()
    for method in METHODS.values():
        caps = config.search_steps if method.anytime else [0]
        scales = [1.0] if method.name == "oracle" else config.budget_scales
        expected |= {(method.name, i, str(s), str(x), str(c)) for i in labels for s in config.seeds
                     for x in scales for c in caps}  # fmt: skip
    assert {(r["method"], r["instance"], r["seed"], r["budget_scale"], r["search_steps"]) for r in rows} == expected
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    for row in rows:
        assert int(row["params"]) <= int(row["budget"])
        assert row["gap_reference"] == ("oracle" if row["budget_scale"] == "1.0" else "best found")
    final = {(r["method"], r["instance"], r["budget_scale"]): float(r["final_loss"]) for r in rows}
    for label in labels:  # the references are what they claim: the planted optimum beats uniform LoRA
        assert final["oracle", label, "1.0"] < final["uniform", label, "1.0"], label
    summary = (path / "summary.md").read_text()
    images = json.loads((path / "report.json").read_text())["images"]
    assert len(images) == 2 + len(labels)
    for name in images:
        data = (path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
        assert f"({name})" in summary
    assert "## Search track" in summary and "## Amortized track" in summary and "Break-even" in summary
    for label in ["random@40", "tpe@80", "go_explore@80", "greedy", "linear_depth", "adalora", "ppo", "a2c"]:
        assert f"| {label} |" in summary, label


def _probe_steps(config: BenchConfig, instance: dict) -> int:
    return config.make_env(instance).probe_optimizer_steps


@pytest.mark.slow
def test_quick_bench_charges_searches_their_cap_and_policies_their_meta_training_apart(quick_run):
    config, path = quick_run
    rows = [r for r in _results(path) if r["budget_scale"] == "1.0"]
    assert {int(r["final_steps"]) for r in rows} == {config.episode_steps}  # measured by the env
    spent = {(r["method"], r["instance"], int(r["search_steps"])): int(r["optimizer_steps"]) for r in rows}
    train_probe = _probe_steps(config, config.train_instances[0])
    for index, label in enumerate(instance_labels(config)):
        probe = _probe_steps(config, config.test_instances[index])  # importance readers pay the probe
        assert spent["uniform", label, 0] == spent["oracle", label, 0] == spent["linear_depth", label, 0] == 0
        assert spent["greedy", label, 0] == probe
        for method in ("random", "tpe", "go_explore"):
            for cap in config.search_steps:  # a search that used most of its cap, never more
                assert cap // 2 < spent[method, label, cap] <= cap, (method, cap)
        for method in ("ppo", "a2c", "maskable_ppo"):
            policy = json.loads((path / "policies" / f"{method}-s0.json").read_text())
            assert policy["optimizer_steps"] > train_probe  # the train instance's probe, then training
            # per instance: the probe and one episode; the meta-training is reported apart, the same in every cell
            assert spent[method, label, 0] == probe + config.episode_steps
            row = next(r for r in rows if r["method"] == method and r["instance"] == label)
            assert int(row["meta_steps"]) == policy["optimizer_steps"]


@pytest.mark.slow
def test_cells_reproduce_across_process_pool_and_ray(tmp_path):
    ray = pytest.importorskip("ray")  # before any work: without Ray the comparison cannot be made
    methods = ["random", "greedy"]
    serial = _results(run_bench(_tiny(tmp_path, "serial", methods=methods)))
    pooled = _results(run_bench(_tiny(tmp_path, "pool", methods=methods), workers=2))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distributed = _results(run_bench(_tiny(tmp_path, "ray", methods=methods), workers=2, backend="ray"))
    finally:
        ray.shutdown()
    for other in (pooled, distributed):
        assert [(r["method"], r["final_loss"], r["params"]) for r in other] == [
            (r["method"], r["final_loss"], r["params"]) for r in serial
        ]


def test_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    # greedy's probe_decisions can only be checked against the instance's episode length, inside the cell
    config = _tiny(tmp_path, "failing", methods=["random", "greedy"], options={"greedy": {"probe_decisions": 3}})
    path = run_bench(config)
    rows = {r["method"]: r for r in _results(path)}
    assert rows["greedy"]["status"] == "error"
    assert "probe_decisions=3" in rows["greedy"]["error"] and math.isnan(float(rows["greedy"]["final_loss"]))
    assert rows["random"]["status"] == rows["uniform"]["status"] == rows["oracle"]["status"] == "ok"
    assert is_complete(path)
    assert "## Failed cells" in (path / "summary.md").read_text()


def test_publish_writes_one_section_per_benchmark_with_its_plots(tmp_path):
    target = tmp_path / "published"
    for name in ("first", "second", "first"):  # publishing "first" again replaces its section
        run_bench(_tiny(tmp_path, name, methods=["greedy"]), command=f"strato bench {name}", publish=str(target))
    text = (target / "RESULTS.md").read_text()
    assert text.count("<!-- bench:first -->") == text.count("<!-- bench:second -->") == 1
    assert text.index("bench:first") < text.index("bench:second")  # replaced in place, not appended
    for name in ("first", "second"):
        images = json.loads((tmp_path / name / "report.json").read_text())["images"]
        for image in images:
            assert (target / "results" / name / image).read_bytes() == (tmp_path / name / image).read_bytes()
            assert f"](results/{name}/{image})" in text
        assert f"`strato bench {name}`" in text


@pytest.mark.slow
def test_interrupted_bench_resumes_without_rerunning_finished_cells(tmp_path):
    config = _tiny(tmp_path, "resume", methods=["random"], seeds=[0, 1, 2], search_steps=[30])
    config_file = tmp_path / "resume.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    cells = tmp_path / "resume" / "cells"
    process = subprocess.Popen(
        [sys.executable, "-m", "agents.cli", "bench", str(config_file)],
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (cells.is_dir() and any(cells.glob("*.json"))):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in cells.glob("*.json")}
    assert finished and len(finished) < len(grid(config))
    assert (tmp_path / "resume" / UNFINISHED).exists()

    path = run_bench(load_bench_config(str(config_file)))
    assert is_complete(path) and len(_results(path)) == len(grid(config))
    for name, (mtime, text) in finished.items():
        assert (cells / name).stat().st_mtime_ns == mtime and (cells / name).read_text() == text


def test_another_config_under_the_same_name_is_refused(tmp_path):
    run_bench(_tiny(tmp_path, "taken", methods=["greedy"]))
    with pytest.raises(ValueError, match="holds another benchmark"):
        run_bench(_tiny(tmp_path, "taken", methods=["greedy"], seeds=[1]))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"methods": ["ppo", "sac"]}, r"methods='sac' is invalid: allowed: \['uniform', 'oracle', 'random'"),
        ({"test_instances": [{"decisions": 4}]}, r"test_instances\[0\].decisions: set it in env"),
        ({"search_steps": [5, 40]}, r"search_steps=\[5, 40\] is invalid: every cap must be >= one episode \(10 "),
        ({"search_steps": 40}, r"search_steps=40 is invalid: expected a non-empty list of distinct integers"),
        (
            {"test_instances": [{}], "validation_instances": [{"model": "gpt2-tiny"}]},
            r"validation_instances\[0\] \(gpt2-tiny/planted/top-heavy\) is also train_instances\[0\]: train, "
            "validation and test instances must not overlap",
        ),
        (
            {
                "test_instances": [{"generated": {"models": ["gpt2-tiny"], "seeds": [1, 2]}}],
                "train_instances": [{"generated": {"models": ["gpt2-tiny"], "seeds": [2]}}],
            },
            r"test_instances\[1\] \(gpt2-tiny/planted/generated-2\) is also train_instances\[0\]",
        ),
        (
            {"test_instances": [{"generated": {"models": ["gpt2-tiny"]}}]},
            r"test_instances\[0\].generated=.* is invalid: expected \{generated: \{models",
        ),
        ({"test_instances": [{"model": "pretrained:nope"}]}, r"model='pretrained:nope' is invalid: names no base"),
        ({"pretrain": {"base": {"model": "gpt2-tiny"}}}, r"pretrain.base=.* is invalid: expected a mapping with model"),
        ({"budget_scales": [0.5]}, "budget_scales=.* holds 1.0"),
        ({"seeds": [0, 0]}, "seeds=.* a seed is repeated"),
        ({"options": {"dqn": {}}}, "options.dqn: not a method"),
        ({"options": {"tpe": {"n_startup_trial": 2}}}, "unknown key options.tpe.n_startup_trial; allowed keys"),
        ({"options": {"a2c": {"clip_range": 0.1}}}, "unknown key options.a2c.clip_range"),
        ({"options": {"go_explore": {"moves": "layers"}}}, "options.go_explore.moves='layers' is invalid"),
        ({"options": {"maskable_ppo": {"batch_size": 0}}}, "^options.maskable_ppo.batch_size=0 is invalid"),
        ({"options": {"random": {"max_proposals": 0}}}, "^options.random.max_proposals=0 is invalid"),
        ({"options": {"ppo": {"n_envs": 4}}}, "options.ppo.n_envs: set by the benchmark"),
        ({"test_instances": [{"learning_rate": -1}]}, r"test_instances\[0\]: learning_rate=-1"),
        ({"quick": {"seeds": []}}, "quick: seeds=.* non-empty"),
        ({"workers": 2}, "unknown key workers"),
    ],
)
def test_bad_bench_config_names_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict(BenchConfig, TINY | values)


def test_cli_rejects_bad_workers_before_any_work(tmp_path, capsys):
    from agents.cli import main

    assert main(["bench", PLANTED, "--workers", "0", f"runs_dir={tmp_path}"]) == 2  # an override may follow
    assert "workers=0 is invalid: expected an integer >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any folder or work


def test_mean_ci_matches_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([5.0, float("nan")])[0] == 5.0


def test_text_summary_finds_the_parameters_that_match_uniform():
    from agents.bench.report import _parameters_to_match

    def row(method, scale, loss, params):
        return {
            "method": method,
            "instance": "gpt2-tiny/causal_lm/text",
            "budget_scale": scale,
            "seed": 0,
            "final_loss": loss,
            "params": params,
            "budget": 1000,
            "status": "ok",
        }

    rows = [
        row("uniform", 0.5, 3.0, 500),
        row("uniform", 0.7, 2.8, 700),
        row("uniform", 1.0, 2.5, 1000),
        row("tpe", 0.5, 2.6, 480),
        row("tpe", 0.7, 2.4, 650),
        row("tpe", 1.0, 2.3, 990),
        row("random", 0.5, 2.9, 500),
        row("random", 0.7, 2.7, 690),
        row("random", 1.0, 2.6, 1000),
    ]
    lines = "\n".join(_parameters_to_match(rows, planted=set()))
    assert "| gpt2-tiny/causal_lm/text | tpe | 2.3 | 0.7 | 0.650 | yes |" in lines
    assert "| gpt2-tiny/causal_lm/text | random | 2.6 | none | n/a | no |" in lines
    assert "| gpt2-tiny/causal_lm/text | uniform | 2.5 | 1 | 1.000 | no |" in lines
    assert _parameters_to_match(rows, planted={"gpt2-tiny/causal_lm/text"}) == []


@pytest.mark.parametrize("name", ["bench_planted", "bench_text", "bench_transfer"])
def test_shipped_bench_configs_load_full_and_quick(name):
    path = str(ROOT / "configs" / f"{name}.yaml")
    full, quick = load_bench_config(path), load_bench_config(path, quick=True)
    assert (full.name, quick.name) == (name, f"{name}-quick")
    assert len(full.seeds) >= 3 and len(quick.seeds) == 1
    assert quick.episode_steps < full.episode_steps and max(quick.search_steps) < max(full.search_steps)
    if name == "bench_transfer":  # GPT-2 family in training, other families in test
        train = {full.env_config(i).model for i in full.train_instances + full.validation_instances}
        assert train == {"gpt2-tiny", "gpt2-tiny-6x32"}
        assert {full.env_config(i).model for i in full.test_instances} == {"llama-tiny", "bert-tiny"}
    else:  # the quick run exercises every method; bench_planted's full run leaves out all learners but PPO
        every = set(METHODS) - {"uniform", "oracle"}
        assert set(quick.methods) == every
        left_out = {"a2c", "maskable_ppo", "trpo"} if name == "bench_planted" else set()
        assert set(full.methods) == every - left_out


def test_the_final_retrains_of_one_instance_and_seed_run_together_and_match_one_at_a_time(tmp_path):
    """The allocations of one (instance, scale, seed) are trained together; each final loss is the test loss a
    lone static run of that allocation from FINAL_SEED + the cell's seed gives, to float summation order."""
    config = _tiny(tmp_path, "together", methods=["random", "greedy"])
    path = run_bench(config)
    rows = {r["method"]: r for r in _results(path)}
    env = config.make_env(config.test_instances[0], 1.0)
    episode = env.config.decisions * env.config.inner_steps
    for method in ("uniform", "oracle", "random", "greedy"):
        cell = json.loads(
            (path / "cells" / f"{method}-i0-s0-x1{'-b40' if method == 'random' else ''}.json").read_text()
        )
        alone = env.evaluate_allocation(cell["allocation"], seed=FINAL_SEED, split="test")
        assert float(rows[method]["final_loss"]) == pytest.approx(alone, rel=1e-5), method
        assert cell["final_steps"] == episode


def test_no_search_reads_the_test_data(tmp_path, monkeypatch):
    """Every loss a search computes is on validation data; the test split is read only by the final runs, after
    every search of the group is done."""
    import strato_env.episodes as episodes
    from agents.bench import cells as cells_module

    reads, phase = [], {"now": "search"}
    evaluate_losses, evaluate_allocations = (
        episodes.evaluate_losses,
        cells_module.RankAllocationEnv.evaluate_allocations,
    )

    def spy_losses(*args, **kwargs):
        split = kwargs.get("split", args[4] if len(args) > 4 else "eval")
        reads.append((phase["now"], split))
        return evaluate_losses(*args, **kwargs)

    def final_runs(self, allocations, seeds, split="eval"):
        if split == "test":
            phase["now"] = "final"
        return evaluate_allocations(self, allocations, seeds, split)

    monkeypatch.setattr(episodes, "evaluate_losses", spy_losses)
    monkeypatch.setattr(cells_module.RankAllocationEnv, "evaluate_allocations", final_runs)
    config = _tiny(tmp_path, "spy", methods=["random", "tpe", "greedy", "go_explore"])
    cells = [c for c in grid(config) if not METHODS[c.method].learned]
    results = run_cells(config, cells, {})
    assert all(r["status"] == "ok" for r in results)
    searching = {split for when, split in reads if when == "search"}
    assert searching == {"eval"} and ("final", "test") in reads


def test_paired_bootstrap_resamples_instances_and_seeds():
    # two instances: one where the method is always 10% better, one where it is 10% worse on one seed of two
    mean, low, high = paired_bootstrap({"a": [-0.1, -0.1, -0.1], "b": [-0.1, -0.1, -0.1]})
    assert mean == pytest.approx(-0.1) and low == pytest.approx(-0.1) and high == pytest.approx(-0.1)
    mean, low, high = paired_bootstrap({"a": [-0.2, -0.2], "b": [0.1, -0.1]})
    assert mean == pytest.approx(-0.1)  # instances weigh alike: (-0.2 + 0.0) / 2
    assert low == pytest.approx(-0.2) and high == pytest.approx(0.05)  # resampled means lie in [-0.2, 0.1]
    assert low < 0 < high  # the interval holds 0: no win is claimed
    assert paired_bootstrap({"a": [-0.1, -0.1], "b": [-0.3, -0.2]})[2] < 0  # every draw better: a win
    assert all(math.isnan(v) for v in paired_bootstrap({"a": [math.nan]}))


def test_non_finite_and_failed_cells_are_counted_not_dropped(tmp_path):
    config = _tiny(tmp_path, "counted", methods=["random", "greedy"])
    cell = {"instance": 0, "seed": 0, "scale": 1.0, "budget": 100, "params": 100, "optimizer_steps": 10,
            "wall_s": 1.0, "allocation": {}}  # fmt: skip
    cells = [
        cell | {"method": "uniform", "status": "ok", "final_loss": 2.0},
        cell | {"method": "oracle", "status": "ok", "final_loss": 1.0},
        cell | {"method": "greedy", "status": "ok", "final_loss": math.nan},
        cell | {"method": "random", "steps": 40, "status": "error", "error": "ValueError: boom"},
    ]
    rows = table_rows(config, cells)
    status = {r["method"]: r["status"] for r in rows}
    assert status == {"uniform": "ok", "oracle": "ok", "greedy": "non-finite", "random": "error"}
    summary = summary_markdown(config, rows, None, [])
    assert "Cells: 4 (2 finished, 2 failed or non-finite)" in summary
    assert "| greedy | n/a | n/a | n/a | n/a | n/a | 0/1 |" in summary
    assert "- greedy on bert-tiny/planted/top-heavy, seed 0: final loss nan" in summary
    assert "- random@40 on bert-tiny/planted/top-heavy, seed 0: ValueError: boom" in summary


def test_a_bench_pretrains_its_base_once_and_adapts_it(tmp_path, corpus):
    text = {"name": "causal_lm", "data": corpus, **TASK}
    values = {
        "methods": ["greedy"],
        "pretrain": {"base": {"model": "gpt2-tiny", "data": corpus, "steps": 5, "seq_len": 32}},
        "env": TINY["env"] | {"task": text},
        "test_instances": [{"model": "pretrained:base"}],
    }
    path = run_bench(_tiny(tmp_path, "text", **values))
    rows = _results(path)
    assert {r["method"] for r in rows} == {"uniform", "greedy"} and all(r["status"] == "ok" for r in rows)
    base = next((tmp_path / "pretrained").glob("base-*"))
    assert rows[0]["instance"] == f"{base.name}/causal_lm/corpus.txt"
    written = (base / "model.safetensors").stat().st_mtime_ns
    run_bench(_tiny(tmp_path, "text-again", **values))  # the same arguments: the base is reused, not retrained
    assert (base / "model.safetensors").stat().st_mtime_ns == written
    assert len(list((tmp_path / "pretrained").iterdir())) == 1
