"""torchrun data parallelism: 2 CPU processes (gloo) take the same steps as one process with the whole batch."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import tyro

import nf_bc
import nf_gcbc

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["--total-steps", "4", "--batch-size", "16", "--log-interval", "2", "--eval-interval", "4",
         "--save-interval", "2", "--eval-episodes", "1", "--eval-max-steps", "3", "--warmup-steps", "2",
         "--num-blocks", "2", "--hidden-dim", "32", "--rep-dim", "16", "--no-cuda"]  # fmt: skip
SCRIPTS = {
    "nf_gcbc.py": (nf_gcbc, lambda d: ["--env-id", "pointmaze-medium-navigate-v0", "--dataset-dir", d]),
    "nf_bc.py": (
        nf_bc,
        lambda d: [
            "--source",
            "ogbench",
            "--env-id",
            "pointmaze-medium-navigate-singletask-task1-v0",
            "--dataset-dir",
            d,
            "--obs-horizon",
            "2",
            "--action-horizon",
            "3",
            "--exec-horizon",
            "2",
        ],
    ),
}


def torchrun(script: str, argv, processes: int = 2):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        script,
    ] + argv
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def only_run(path: pathlib.Path) -> str:
    (run,) = [p for p in path.iterdir() if p.is_dir()]
    return str(run)


def policy_of(run_dir: str, step: int):
    return torch.load(f"{run_dir}/checkpoints/step_{step}.pt", weights_only=True)["policy"]


def assert_same_policy(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_match_one_and_resume(tmp_path, pointmaze_dir, script):
    module, data_args = SCRIPTS[script]
    argv = data_args(pointmaze_dir) + QUICK
    single, _ = module.main(tyro.cli(module.Args, args=argv + ["--output-dir", str(tmp_path / "single")]))

    done = torchrun(script, argv + ["--output-dir", str(tmp_path / "ddp")])
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = only_run(tmp_path / "ddp")  # one run directory, written by rank 0 alone
    assert "x 2 processes" in done.stdout
    assert_same_policy(policy_of(single, 4), policy_of(ddp, 4))
    with open(f"{ddp}/eval.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["0", "4"]

    cut = str(tmp_path / "cut")  # the distributed run, stopped after its checkpoint at step 2
    shutil.copytree(ddp, cut)
    os.remove(f"{cut}/checkpoints/step_4.pt")
    resumed = torchrun(script, ["--resume", cut])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    assert_same_policy(policy_of(ddp, 4), policy_of(cut, 4))


def test_a_global_batch_that_does_not_divide_is_a_clear_error(tmp_path, pointmaze_dir):
    module, data_args = SCRIPTS["nf_gcbc.py"]
    argv = data_args(pointmaze_dir) + QUICK + ["--batch-size", "15", "--output-dir", str(tmp_path)]
    done = torchrun("nf_gcbc.py", argv)
    assert done.returncode != 0
    assert (
        "--batch-size 15 is the global batch and must divide evenly among the 2 processes" in done.stdout + done.stderr
    )
    output = done.stdout + done.stderr
    assert output.count("must divide evenly") == 1  # said once, by rank 0
    assert 'nf_gcbc.py", line' not in output  # no traceback from the script (torchrun prints its own summary)
