"""Runs survive crashes: atomic checkpoints with a fallback on resume, one process per run directory,
checkpoints that name their script, and SIGTERM / SIGUSR1 / Ctrl-C that stop a run with a checkpoint and the
command that resumes it (the run helpers are identical in every script: tests/test_shared_helpers.py)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import tyro

import nf_bc
import nf_gcbc
import nf_rlbc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "pointmaze-medium-navigate-v0"
QUICK = ["--total-steps", "6", "--batch-size", "16", "--log-interval", "2", "--eval-interval", "3",
         "--save-interval", "3", "--eval-episodes", "2", "--eval-max-steps", "5", "--warmup-steps", "2",
         "--num-blocks", "2", "--hidden-dim", "32", "--no-cuda"]  # fmt: skip


def gcbc(argv):
    return nf_gcbc.main(tyro.cli(nf_gcbc.Args, args=argv))


def params(path, key="policy"):
    return torch.load(path, weights_only=True)[key]


def test_a_checkpoint_cut_short_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, pointmaze_dir, capsys):
    run_dir, _ = gcbc(["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path)] + QUICK)
    expected = params(f"{run_dir}/checkpoints/step_6.pt")
    assert not [f for f in os.listdir(run_dir) + os.listdir(f"{run_dir}/checkpoints") if f.endswith(".tmp")]
    open(f"{run_dir}/checkpoints/step_6.pt", "wb").close()  # what a kill during torch.save used to leave
    with open(f"{run_dir}/eval.csv") as f:
        wall_before = [float(row.split(",")[1]) for row in f.read().split()[1:]]
    gcbc(["--resume", run_dir])
    assert "skipped step_6.pt is not a readable checkpoint" in capsys.readouterr().out
    with open(f"{run_dir}/eval.csv") as f:
        wall_after = [float(row.split(",")[1]) for row in f.read().split()[1:]]
    assert wall_after[:2] == wall_before[:2] and wall_after[2] >= wall_after[1]  # the wall time goes on
    for key, value in expected.items():
        torch.testing.assert_close(params(f"{run_dir}/checkpoints/step_6.pt")[key], value, rtol=0, atol=0)


def test_another_scripts_checkpoint_is_refused_in_one_line(tmp_path, pointmaze_dir):
    argv = ["--source", "ogbench", "--env-id", "pointmaze-medium-navigate-singletask-task1-v0"]
    argv += [
        "--dataset-dir",
        pointmaze_dir,
        "--output-dir",
        str(tmp_path),
        "--obs-horizon",
        "1",
        "--action-horizon",
        "1",
    ]
    argv += ["--exec-horizon", "1"] + QUICK
    bc_run, _ = nf_bc.main(tyro.cli(nf_bc.Args, args=argv))
    with pytest.raises(
        SystemExit, match="a checkpoint of another script, not of nf_gcbc.py|of nf_bc.py, not of nf_gcbc"
    ):
        gcbc(["--resume", bc_run])
    with pytest.raises(SystemExit, match="a checkpoint of nf_bc.py, not of nf_rlbc.py"):
        nf_rlbc.main(tyro.cli(nf_rlbc.Args, args=["--resume", bc_run]))


def test_one_process_per_run_directory(tmp_path, pointmaze_dir, capsys):
    run_dir, _ = gcbc(["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path)] + QUICK)
    assert not os.path.exists(f"{run_dir}/lock")  # released at the end
    with open(f"{run_dir}/lock", "w") as f:
        f.write(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(SystemExit, match=f"in use by process {os.getppid()}"):
        gcbc(["--resume", run_dir])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(f"{run_dir}/lock", "w") as f:
        f.write(str(gone.pid))
    gcbc(["--resume", run_dir])
    assert f"process {gone.pid}, which held it, is gone; taking the run over" in capsys.readouterr().out


def test_a_checkpoint_copied_out_of_its_run_directory_is_refused(tmp_path, pointmaze_dir):
    run_dir, _ = gcbc(["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path / "runs")] + QUICK)
    shutil.copy(f"{run_dir}/checkpoints/step_3.pt", tmp_path / "step_3.pt")
    with pytest.raises(SystemExit, match="not in a run directory's checkpoints/"):
        gcbc(["--resume", str(tmp_path / "step_3.pt")])


@pytest.mark.parametrize("script", ["nf_gcbc.py", "nf_rlbc.py"])
def test_sigterm_saves_prints_the_resume_command_and_the_resumed_run_matches(tmp_path, pointmaze_dir, script):
    """A real run, a real SIGTERM once the first checkpoint exists, then the printed command: the same final
    parameters as an uninterrupted run."""
    env_id = ENV if script == "nf_gcbc.py" else "pointmaze-medium-navigate-singletask-task1-v0"
    argv = ["--env-id", env_id, "--dataset-dir", pointmaze_dir, "--total-steps", "1500", "--batch-size", "16",
            "--num-blocks", "2", "--hidden-dim", "16", "--rep-dim", "8", "--log-interval", "100",
            "--eval-interval", "1500", "--save-interval", "300", "--eval-episodes", "1", "--eval-max-steps", "3",
            "--no-cuda"]  # fmt: skip
    argv += ["--warmup-steps", "10"] if script == "nf_gcbc.py" else ["--encoder-dim", "16", "--critic-dim", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run(
        [sys.executable, script] + argv + ["--output-dir", str(tmp_path / "whole")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "done: " in whole.stdout
    run = subprocess.Popen(
        [sys.executable, script] + argv + ["--output-dir", str(tmp_path / "cut")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not any(f.endswith("step_300.pt") for _, _, files in os.walk(tmp_path / "cut") for f in files):
        assert run.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err[-2000:]
    command = out.strip().splitlines()[-1].split()  # "python nf_x.py --resume RUN_DIR"
    assert command[:3] == ["python", script, "--resume"] and "SIGTERM at step" in out
    (whole_dir,) = os.listdir(tmp_path / "whole")
    cut_dir = command[3]
    steps = sorted(int(f[5:-3]) for f in os.listdir(f"{cut_dir}/checkpoints"))
    assert steps[-1] < 1500  # stopped early, with a checkpoint at the step it stopped
    done = subprocess.run([sys.executable] + command[1:], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    key = "policy" if script == "nf_gcbc.py" else "actor"
    expected = params(tmp_path / "whole" / whole_dir / "checkpoints" / "step_1500.pt", key)
    for name, value in params(f"{cut_dir}/checkpoints/step_1500.pt", key).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
