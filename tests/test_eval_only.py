"""--eval-only with --resume evaluates a finished run's checkpoint without training: every script, through its
CLI; the result is printed and written beside the run, and nothing of the run changes."""

import json
import os

import pytest
import tyro

import nf_bc
import nf_gcbc
import nf_goal_explore
import nf_rlbc

TINY = ["--batch-size", "16", "--num-blocks", "2", "--hidden-dim", "16", "--rep-dim", "8", "--no-cuda"]
STEPS = [
    "--total-steps",
    "4",
    "--eval-interval",
    "4",
    "--save-interval",
    "4",
    "--eval-episodes",
    "1",
    "--eval-max-steps",
    "3",
]
SCRIPTS = {
    "nf_gcbc": (nf_gcbc, lambda d: ["--env-id", "pointmaze-medium-navigate-v0", "--dataset-dir", d] + STEPS),
    "nf_bc": (nf_bc, lambda d: ["--source", "ogbench", "--env-id", "pointmaze-medium-navigate-singletask-task1-v0",
                                "--dataset-dir", d, "--action-horizon", "2", "--exec-horizon", "1"] + STEPS),
    "nf_rlbc": (nf_rlbc, lambda d: ["--env-id", "pointmaze-medium-navigate-singletask-task1-v0", "--dataset-dir", d,
                                    "--encoder-dim", "16", "--critic-dim", "16"] + STEPS),
    "nf_goal_explore": (nf_goal_explore, lambda d: ["--num-envs", "2", "--max-episode-steps", "10",
                                                    "--total-env-steps", "40", "--learning-starts", "10",
                                                    "--buffer-size", "100", "--encoder-dim", "16", "--actor-dim", "16",
                                                    "--num-candidates", "4", "--eval-interval", "40",
                                                    "--save-interval", "40", "--eval-episodes", "1",
                                                    "--eval-max-steps", "3"]),
}  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_eval_only_evaluates_a_checkpoint_without_training(tmp_path, pointmaze_dir, name, capsys):
    module, argv = SCRIPTS[name]
    run = lambda a: module.main(tyro.cli(module.Args, args=a))  # noqa: E731
    run_dir, _ = run(argv(pointmaze_dir) + TINY + ["--output-dir", str(tmp_path)])
    before = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in ("eval.csv", "args.json")}
    checkpoints = sorted(os.listdir(f"{run_dir}/checkpoints"))
    assert run(["--resume", run_dir, "--eval-only", "--eval-episodes", "2"])[0] == run_dir
    step = 40 if name == "nf_goal_explore" else 4
    with open(f"{run_dir}/eval_only_step_{step}.json") as f:
        result = json.load(f)
    assert result["episodes"] == 2 and result["step"] == step and 0 <= result["success"] <= 1
    assert f"written to {run_dir}/eval_only_step_{step}.json" in capsys.readouterr().out
    assert sorted(os.listdir(f"{run_dir}/checkpoints")) == checkpoints  # nothing trained, nothing saved
    assert before == {f: os.path.getmtime(os.path.join(run_dir, f)) for f in before}
    with pytest.raises(SystemExit, match="--eval-only evaluates a run's checkpoint: give it --resume"):
        run(argv(pointmaze_dir) + TINY + ["--output-dir", str(tmp_path), "--eval-only"])


def test_summarize_runs_tabulates_eval_only_results(tmp_path, pointmaze_dir, capsys):
    import importlib.util

    module, argv = SCRIPTS["nf_gcbc"]
    run = lambda a: module.main(tyro.cli(module.Args, args=a))  # noqa: E731
    run_dir, _ = run(argv(pointmaze_dir) + TINY + ["--output-dir", str(tmp_path)])
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "summarize_runs.py")
    spec = importlib.util.spec_from_file_location("summarize_runs", path)
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    with pytest.raises(SystemExit, match="no runs with args.json and eval_only_step_N.json"):
        summarize.main(str(tmp_path), eval_only=True)
    run(["--resume", run_dir, "--eval-only", "--eval-episodes", "2"])
    capsys.readouterr()
    summarize.main(str(tmp_path), eval_only=True)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| pointmaze")]
    assert len(rows) == 1 and "| 4 |" in rows[0] and rows[0].endswith("| - |")  # step 4; no wall time


def test_plot_curves_groups_seeds_and_skips_missing_values(tmp_path):
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "plot_curves.py")
    spec = importlib.util.spec_from_file_location("plot_curves", path)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    runs = {
        "a1": ("flow", 3, "0,0.1\n10,0.5\n20,0.7\n"),
        "a2": ("flow", 3, "0,0.3\n10,nan\n"),
        "b": ("flow", 10, "0,1"),
    }
    for name, (exp, alpha, rows) in runs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "args.json").write_text(
            json.dumps(dict(env_id="e", exp_name=exp, policy="flow", alpha=alpha))
        )
        (tmp_path / name / "eval.csv").write_text("step,success\n" + rows)
    groups = plot.read_groups([str(tmp_path)], "success", "step", label_args=["alpha"])
    assert sorted(groups) == [("e", "flow", "flow", "alpha 10"), ("e", "flow", "flow", "alpha 3")]
    seeds = groups[("e", "flow", "flow", "alpha 3")]
    assert sorted(len(xs) for xs, _ in seeds) == [1, 3]  # the nan row is left out
    plot.main(plot.Args(roots=[str(tmp_path)], out=str(tmp_path / "c.png"), label_args=["alpha"]))
    assert (tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no runs with args.json and a 'return' column"):
        plot.read_groups([str(tmp_path)], "return", "step")
