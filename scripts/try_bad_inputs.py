"""Try the five programs with bad inputs, as a hostile user would, and tabulate what each does.

    python scripts/try_bad_inputs.py > bad_inputs.md

Every case runs as its own process on tiny data made here, in a temporary directory. The table gives the exit
code, the first line printed, whether a traceback appeared, and whether a run directory or temporary file
was left behind. Nothing should end in a traceback, a false number or lost work.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAV, TASK1 = "pointmaze-medium-navigate-v0", "pointmaze-medium-navigate-singletask-task1-v0"
TINY = ["--total-steps", "4", "--batch-size", "8", "--eval-episodes", "1", "--eval-max-steps", "2", "--no-cuda",
        "--num-blocks", "2", "--hidden-dim", "16", "--rep-dim", "8", "--eval-interval", "4",
        "--save-interval", "2"]  # fmt: skip


def python(*argv, env=None):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def main():
    work = tempfile.mkdtemp(prefix="bad_inputs_")
    data, bad, runs = (os.path.join(work, d) for d in ("data", "bad", "runs"))
    python("make_dataset.py", NAV, "--dataset-dir", data, "--num-transitions", "1000", "--episode-steps", "250")
    python("make_dataset.py", "pointmaze-medium-multigoal-v0", "--dataset-dir", data, "--num-episodes", "10")
    os.makedirs(bad)
    with np.load(os.path.join(data, f"{NAV}.npz")) as f:
        arrays = {k: f[k] for k in f.files}
    demos = {
        "observations": np.zeros((40, 2), np.float32),
        "actions": np.zeros((40, 2), np.float32),
        "terminals": np.arange(40) % 20 == 19,
    }

    def dataset(name, **changes):  # a copy of the navigate set (and its -val) with some arrays changed
        directory = os.path.join(bad, name)
        shutil.copytree(data, directory)
        np.savez(os.path.join(directory, f"{NAV}.npz"), **dict(arrays, **changes))
        return directory

    def npz(name, **changes):
        np.savez(os.path.join(bad, f"{name}.npz"), **dict(demos, **changes))
        return ["--env-id", name, "--dataset-dir", bad]

    truncated, empty = dataset("truncated"), dataset("empty")
    with open(os.path.join(truncated, f"{NAV}.npz"), "rb+") as f:
        f.truncate(2_000)
    open(os.path.join(empty, f"{NAV}.npz"), "wb").close()
    gcbc = ["nf_gcbc.py", "--env-id", NAV, "--dataset-dir", data, "--output-dir", runs] + TINY
    done = python(*gcbc)
    (gcbc_run,) = glob.glob(os.path.join(runs, "*"))
    bc_run = python(
        "nf_bc.py",
        "--source",
        "ogbench",
        "--env-id",
        TASK1,
        "--dataset-dir",
        data,
        "--output-dir",
        os.path.join(work, "bc_runs"),
        "--action-horizon",
        "2",
        "--exec-horizon",
        "1",
        *TINY,
    )
    (bc_run,) = glob.glob(os.path.join(work, "bc_runs", "*"))
    os.makedirs(os.path.join(work, "only_bad", "checkpoints"))
    open(os.path.join(work, "only_bad", "checkpoints", "step_2.pt"), "wb").close()
    open(os.path.join(work, "only_bad", "args.json"), "w").close()
    shutil.copy(os.path.join(gcbc_run, "checkpoints", "step_2.pt"), os.path.join(work, "copied.pt"))
    open(os.path.join(work, "a_file"), "w").close()
    assert done.returncode == 0, done.stderr[-2000:]
    no_display = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MUJOCO_GL")}
    cases = [
        ("make_dataset.py", ["pointmaze-medum-navigate-v0"]),
        ("make_dataset.py", [NAV, "--dataset-dir", os.path.join(work, "a_file")]),
        ("make_dataset.py", [NAV, "--num-transitions", "0"]),
        ("make_dataset.py", [NAV, "--num-transitions", "100", "--num-episodes", "2"]),
        ("make_dataset.py", ["antmaze-medium-navigate-v0", "--dataset-dir", bad]),
        ("make_dataset.py", [NAV, "--episode-steps", "1"]),
        ("nf_gcbc.py", ["--env-id", "pointmaze-medum-navigate-v0", "--dataset-dir", data]),
        ("nf_gcbc.py", ["--env-id", TASK1, "--dataset-dir", data]),
        ("nf_gcbc.py", ["--env-id", "pointmaze-large-navigate-v0", "--dataset-dir", bad]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", empty]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", truncated]),
        (
            "nf_gcbc.py",
            [
                "--env-id",
                NAV,
                "--dataset-dir",
                dataset(
                    "nan",
                    observations=np.where(
                        np.arange(len(arrays["observations"]))[:, None] == 9, np.nan, arrays["observations"]
                    ),
                ),
            ],
        ),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", dataset("outside", actions=arrays["actions"] * 5)]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", dataset("short", actions=arrays["actions"][:-5])]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", dataset("ints", actions=arrays["actions"].astype(int))]),
        (
            "nf_gcbc.py",
            ["--env-id", NAV, "--dataset-dir", dataset("unterminated", terminals=np.zeros_like(arrays["terminals"]))],
        ),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--learning-rate", "-1"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--num-blocks", "0"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--eval-max-steps", "-3"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--batch-size", "10000000"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--gamma", "1.5"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--output-dir", os.path.join(work, "a_file")]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--learning-rate", "1e9"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--eval-only"]),
        ("nf_gcbc.py", ["--resume", os.path.join(work, "nowhere")]),
        ("nf_gcbc.py", ["--resume", work]),
        ("nf_gcbc.py", ["--resume", os.path.join(work, "only_bad")]),
        ("nf_gcbc.py", ["--resume", bc_run]),
        ("nf_gcbc.py", ["--resume", os.path.join(work, "copied.pt")]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--capture-video", "ENV:no display"]),
        ("nf_bc.py", ["--env-id", "nothing-here", "--dataset-dir", bad]),
        ("nf_bc.py", npz("int_actions", actions=np.zeros((40, 2), np.int64))),
        ("nf_bc.py", npz("lengths", actions=np.zeros((39, 2), np.float32))),
        ("nf_bc.py", npz("strings", observations=np.array([["a", "b"]] * 40))),
        ("nf_bc.py", npz("zero", observations=np.zeros((0, 2)), actions=np.zeros((0, 2)), terminals=np.zeros(0))),
        ("nf_bc.py", npz("inf", observations=np.full((40, 2), np.inf, np.float32))),
        ("nf_bc.py", npz("no_end", terminals=np.zeros(40, bool))),
        ("nf_bc.py", ["--env-id", "pointmaze-medium-multigoal-v0", "--dataset-dir", data, "--exec-horizon", "9"]),
        ("nf_bc.py", ["--dataset-dir", data, "--policy", "diffusion", "--diffusion-steps", "101"]),
        ("nf_bc.py", ["--dataset-dir", data, "--policy", "difusion"]),
        ("nf_gcbc.py", ["--env-id", NAV, "--dataset-dir", data, "--policy", "flow-matching", "--flow-steps", "0"]),
        ("nf_bc.py", ["--env-id", "pointmaze-medium-multigoal-v0", "--dataset-dir", data, "--eval-env", "Pendulm-v1"]),
        ("nf_bc.py", ["--env-id", "pointmaze-medium-multigoal-v0", "--dataset-dir", data, "--eval-env", "Pendulum-v1"]),
        ("nf_bc.py", ["--source", "minari", "--env-id", "mujoco/hopper/expert-v0"]),
        ("nf_bc.py", ["--source", "ogbench", "--env-id", NAV, "--dataset-dir", data]),
        ("nf_rlbc.py", ["--env-id", NAV, "--dataset-dir", data]),
        ("nf_rlbc.py", ["--env-id", "pointmaze-medium-navigate-singletask-task9-v0", "--dataset-dir", data]),
        ("nf_rlbc.py", ["--resume", gcbc_run, "--finetune-from", gcbc_run]),
        ("nf_rlbc.py", ["--env-id", TASK1, "--dataset-dir", data, "--finetune-from", gcbc_run]),
        ("nf_rlbc.py", ["--env-id", TASK1, "--dataset-dir", data, "--finetune-from", gcbc_run, "--online-steps", "2"]),
        ("nf_rlbc.py", ["--env-id", TASK1, "--dataset-dir", data, "--online-steps", "2", "--online-ratio", "1.5"]),
        ("nf_rlbc.py", ["--env-id", TASK1, "--dataset-dir", data, "--discount", "1"]),
        ("nf_goal_explore.py", ["--env-id", "pointmaze-medum-v0"]),
        ("nf_goal_explore.py", ["--env-id", "cube-single-v0"]),
        ("nf_goal_explore.py", ["--num-envs", "0"]),
        ("nf_goal_explore.py", ["--num-envs", "3", "--total-env-steps", "100"]),
        ("nf_goal_explore.py", ["--buffer-size", "10"]),
        ("nf_goal_explore.py", ["--condition-drop", "0"]),
        ("nf_goal_explore.py", ["--resume", gcbc_run]),
    ]
    print("| program | input | exit | first line printed | traceback | left behind |")
    print("|---|---|---|---|---|---|")
    explore = ["--num-envs", "2", "--max-episode-steps", "10", "--total-env-steps", "40", "--learning-starts", "10",
               "--buffer-size", "100", "--encoder-dim", "16", "--actor-dim", "16", "--eval-episodes", "1",
               "--no-cuda"]  # fmt: skip
    for script, case in cases:
        env = no_display if "ENV:no display" in case else None
        case = [a for a in case if a != "ENV:no display"]
        argv = case
        if script != "make_dataset.py" and "--resume" not in case:  # the case's flags come last and win
            argv = ["--output-dir", os.path.join(work, "case_runs")] + (explore if "explore" in script else TINY) + case
        before = set(glob.glob(os.path.join(work, "**", "*"), recursive=True))
        result = python(script, *argv, env=env)
        after = set(glob.glob(os.path.join(work, "**", "*"), recursive=True))
        left = sorted(os.path.relpath(p, work) for p in after - before if "case_runs" in p or p.endswith(".tmp"))
        output = (result.stderr.strip() or result.stdout.strip()).replace("|", "/")
        lines = [line for line in output.splitlines() if line.strip() and "%/" not in line and "it/s]" not in line]
        first = next((line for line in reversed(lines) if not line.startswith(" ")), "")  # the message, not the log
        shown = " ".join(a if not a.startswith(work) else "$TMP" + a[len(work) :] for a in case)
        traceback = "Traceback (most recent call last)" in result.stderr
        print(
            f"| {script} | `{shown[:90]}` | {result.returncode} | {first[:150].replace(work, '$TMP')} "
            f"| {'YES' if traceback else 'no'} | {', '.join(left[:2]) or 'nothing'} |",
            flush=True,
        )
        shutil.rmtree(os.path.join(work, "case_runs"), ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
