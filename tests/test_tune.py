"""`ft tune`: search-space parsing, pruning decisions on recorded curves, trials that are plain runs,
and a study that survives kill -9 (tiny 2-layer Llama workspace from test_resume_support)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft.config.loader import load_config
from ft.engine.callbacks import TrainControl, read_metrics
from ft.errors import FtError
from ft.workspace import Workspace
from test_resume_support import DATASET, make_workspace, set_args, settings


def _bad(tmp_path: Path, tune_yaml: str) -> str:
    f = tmp_path / "train.yml"
    f.write_text("tune:\n" + tune_yaml)
    with pytest.raises(FtError) as e:
        load_config(f)
    return e.value.message


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "  space:\n    training.learning_rate: {type: loguniform, low: 0, high: 1e-3}\n",
            "loguniform needs low > 0",
        ),
        (
            "  space:\n    training.learning_rate: {type: uniform, low: 1e-3, high: 1e-4}\n",
            "must be below high",
        ),
        ("  space:\n    training.learning_rate: {type: uniform, low: 1e-3}\n", "needs both 'low' and 'high'"),
        ("  space:\n    lora.rank: {type: uniform, low: 4, high: 64}\n", "lora.rank is a whole number"),
        ("  space:\n    lora.rank: {type: choice, choices: [4, 8.5]}\n", "choice 8.5 is not a int"),
        ("  space:\n    lora.rank: {type: choice, choices: []}\n", "non-empty 'choices'"),
        ("  space:\n    training.lr_schedule: {type: uniform, low: 0, high: 1}\n", "takes text values"),
        ("  space:\n    model.name: {type: choice, choices: [a, b]}\n", "'model.name' cannot be searched"),
        (
            "  space:\n    lora.rank: {type: int, low: 4, high: 64, step: 0.5}\n",
            "'step' is for type int only",
        ),
        ("  space:\n    lora.rank: {type: gaussian, low: 4, high: 64}\n", "tune.space.lora.rank.type"),
        ("  timeout: soon\n", "'soon' is not a duration"),
        ("  pruner: hyperband\n", "tune.pruner"),
    ],
)
def test_search_space_errors_name_the_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    msg = _bad(tmp_path, yaml_text)
    assert expected in msg, msg
    assert "tune" in msg, msg  # the message names the section/key it is about


def test_search_space_parses_and_durations() -> None:
    from ft.config.train import parse_duration

    cfg = load_config(
        None,
        [
            'tune.space={"training.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},'
            ' "lora.rank": {"type": "choice", "choices": [4, 8]}, "training.warmup_steps": {"type": "int", "low": 0, "high": 10}}'
        ],
    ).config
    space = cfg.tune.space
    assert space is not None and set(space) == {
        "training.learning_rate",
        "lora.rank",
        "training.warmup_steps",
    }
    assert space["lora.rank"].choices == [4, 8]
    assert [parse_duration(x) for x in ("90s", "45m", "2h", "1h30m", "120")] == [90, 2700, 7200, 5400, 120]


def test_default_space_follows_the_config(tmp_path: Path) -> None:
    from ft.services.project import init_workspace
    from ft.services.tune import default_space

    init_workspace(tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    fixed = default_space(
        ws, ["training.max_steps=40", "training.warmup_steps=4", "training.learning_rate=2e-4"]
    )
    assert fixed["training.learning_rate"].low == pytest.approx(2e-5)
    assert fixed["training.learning_rate"].high == pytest.approx(2e-3)
    assert fixed["training.warmup_steps"].high == 19  # always below max_steps
    assert "training.epochs" not in fixed  # a fixed number of steps stays fixed
    assert {"lora.rank", "lora.alpha", "lora.dropout"} <= set(fixed)
    assert "training.epochs" in default_space(ws)
    assert "lora.rank" not in default_space(ws, ["training.method=full"])


class _Eval:
    def __init__(self, step: int, val_loss: float):
        self.step, self.val_loss = step, val_loss


def _study_with_history(curves: list[dict[int, float]]):
    """A study with finished trials of these validation curves, pruned by ft's own median rule."""
    import optuna

    from ft.services.tune import _sampler_and_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, pruner = _sampler_and_pruner({"seed": 0, "startup_trials": 2, "sampler": "tpe", "pruner": "median"})
    study = optuna.create_study(direction="minimize", pruner=pruner)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, curve in enumerate(curves):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": i / 10}, distributions=dist, value=min(curve.values()), intermediate_values=curve
            )
        )
    return study


@pytest.mark.parametrize(
    ("curve", "pruned_at"),
    [
        ({0: 2.5, 5: 2.0, 10: 1.9, 15: 1.8}, 5),  # worse than the median at the first evaluation after step 0
        ({0: 2.5, 5: 1.0, 10: 0.9, 15: 0.8}, None),  # better everywhere: runs to the end
        ({0: 2.5, 5: 1.5, 10: 1.45, 15: 1.45}, 10),  # fine at 5; at 10 its best so far is above the median
    ],
)
def test_pruning_decisions_on_recorded_curves(curve: dict[int, float], pruned_at: int | None) -> None:
    """Step 0 (the base model, the same for every trial) never prunes; then the median rule of earlier trials."""
    from ft.services.tune import STOP_PRUNED, _Pruning

    study = _study_with_history([{0: 2.5, 5: 1.5, 10: 1.3, 15: 1.2}, {0: 2.5, 5: 1.6, 10: 1.4, 15: 1.3}])
    trial = study.ask({"x": study.trials[0].distributions["x"]})
    control = TrainControl()
    pruning = _Pruning(trial, control, active=True)
    for step, loss in curve.items():
        pruning.on_eval(_Eval(step, loss))
        if control.should_stop:
            break
    assert pruning.pruned_at == pruned_at
    assert control.should_stop is (pruned_at is not None)
    if pruned_at is not None:
        assert control.reason == STOP_PRUNED


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("tune") / "ws")


def _trial_settings(steps: int = 8) -> list[str]:
    return [s for s in settings(steps, save=4, evals=2) if not s.startswith("lora.rank")]


def test_a_trial_is_a_plain_run(tiny_ws: Workspace) -> None:
    """Same settings and seed: the trial's losses equal those of `ft train` with the same --set values."""
    from ft.services.training import run_training
    from ft.services.tune import tune

    space = 'tune.space={"lora.rank": {"type": "choice", "choices": [8]}, "training.learning_rate": {"type": "choice", "choices": [0.002]}}'
    res = tune(
        tiny_ws,
        name="same",
        trials=1,
        overrides=[*_trial_settings(), space, "tune.pruner=none"],
        dataset=DATASET,
    )
    (row,) = res.trials
    assert row.status == "completed" and row.params == {"lora.rank": 8, "training.learning_rate": 0.002}
    plain = run_training(
        tiny_ws, [*_trial_settings(), "lora.rank=8", "training.learning_rate=0.002"], dataset=DATASET
    )
    trial_rows = read_metrics(tiny_ws.run_dir(row.run_id) / "metrics.jsonl")
    plain_rows = read_metrics(Path(plain.path) / "metrics.jsonl")

    def curve(rows: list[dict]) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows if r["type"] in ("train", "eval")]

    assert len(curve(trial_rows)) == 8 + 5  # every step's loss and the evaluations at 0, 2, 4, 6, 8
    assert curve(trial_rows) == curve(plain_rows)
    assert row.value == pytest.approx(plain.best_val_loss)
    best = Path(res.best_config)
    assert best.is_file()
    cfg = load_config(best).config  # the best configuration is a train.yml `ft train --config` takes
    assert cfg.lora.rank == 8 and cfg.training.learning_rate == 0.002 and cfg.training.max_steps == 8
    from ft.services.runs import list_runs

    assert [r.id for r in list_runs(tiny_ws, study="same").runs] == [row.run_id]


def test_study_prunes_and_writes_results(tiny_ws: Workspace) -> None:
    from ft.services.tune import tune

    # Learning rates from useless to good: with the median rule after 2 full trials, a bad one is pruned.
    space = 'tune.space={"training.learning_rate": {"type": "choice", "choices": [0.003, 0.002, 1e-7]}}'
    res = tune(
        tiny_ws,
        name="prune",
        trials=4,
        overrides=[*_trial_settings(12), space, "tune.sampler=random", "tune.startup_trials=2"],
        dataset=DATASET,
    )
    statuses = [t.status for t in res.trials]
    assert len(res.trials) == 4 and "failed" not in statuses, res.trials
    finished = 0
    for t in res.trials:  # after two finished trials, a learning rate that learns nothing is pruned
        if t.params["training.learning_rate"] == 1e-7 and finished >= 2:
            assert t.status == "pruned", res.trials
        finished += t.status in ("completed", "pruned")
    pruned = [t for t in res.trials if t.status == "pruned"]
    assert pruned, res.trials
    for t in pruned:
        run = tiny_ws.registry().get("runs", id=t.run_id)
        assert run["status"] == "pruned" and run["meta"]["step"] < 12 and t.pruned_at_step is not None
    assert res.best is not None and res.best.params["training.learning_rate"] in (0.003, 0.002)
    assert any(p.endswith("history.png") for p in res.plots)
    with pytest.raises(FtError, match="already exists"):
        tune(tiny_ws, name="prune", trials=1)


@pytest.mark.slow
def test_kill_minus_9_then_resume(tiny_ws: Workspace, tmp_path: Path) -> None:
    """kill -9 in the middle of trial 1: finished trials are kept, the killed one is failed and re-run."""
    args = [
        "tune",
        "--name",
        "killed",
        "--trials",
        "3",
        "--dataset",
        DATASET,
        *set_args([*_trial_settings(40), "tune.pruner=none"]),
        "--json",
    ]
    log = (tmp_path / "tune.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ft", "--workspace", str(tiny_ws.root), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    db = tiny_ws.root / "ft.db"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if db.is_file():
            with sqlite3.connect(db) as con:
                rows = con.execute("select name, meta from runs where name like 'killed-t1'").fetchall()
            if rows and json.loads(rows[0][1] or "{}").get("step", 0) >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the study ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from ft.services.tune import tune

    res = tune(tiny_ws, resume="killed")
    by_status = [(t.number, t.status) for t in res.trials]
    assert by_status[:2] == [(0, "completed"), (1, "interrupted")], by_status
    assert sum(t.status == "completed" for t in res.trials) == 3  # the budget is met
    assert any("trial 1 was interrupted" in n for n in res.notes)
    # The interrupted trial's values were tried again.
    assert any(t.number > 1 and t.params == res.trials[1].params for t in res.trials)
