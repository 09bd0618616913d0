"""Does a change change any number? Short runs of every script and policy on two versions of the code, compared.

    python scripts/compare_commits.py --before HEAD~1                  # that commit against the working tree
    python scripts/compare_commits.py --before 0bc46d9 --after main

Each version is checked out with `git worktree` (`--after .`, the default, is the working tree as it is). Both
versions train on the same tiny datasets (made once, here) with tiny networks for a few hundred steps, with
evaluations and checkpoints on the way, one CPU thread per run. Then every checkpoint is compared tensor by
tensor (networks, optimisers, RNG states, replay buffers) and every eval.csv value by value, the step columns
and wall time aside, as are columns that only the second version writes (they have nothing to be compared
with). A step column may change meaning (nf_rlbc's `step` counts offline and online steps together since the
two phases became one loop), which the checkpoints' file names, one per global step, still pin down.
Prints one line per run and exits 1 when anything differs (`--atol` allows a float tolerance).
"""

import csv
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "16", "--num-blocks", "2", "--hidden-dim", "32", "--rep-dim", "16", "--no-cuda"]
EVAL = ["--eval-episodes", "2", "--eval-max-steps", "20", "--log-interval", "50"]
GCBC = ["--env-id", "pointmaze-medium-navigate-v0", "--total-steps", "200", "--eval-interval", "100"]
GCBC += ["--save-interval", "100", "--warmup-steps", "20"]
BC = ["--env-id", "pointmaze-medium-multigoal-v0", "--total-steps", "200", "--eval-interval", "100"]
BC += ["--save-interval", "100", "--warmup-steps", "20", "--action-horizon", "4", "--exec-horizon", "2"]
RLBC = ["--env-id", "pointmaze-medium-navigate-singletask-task1-v0", "--total-steps", "200", "--online-steps", "100"]
RLBC += [
    "--eval-interval",
    "100",
    "--save-interval",
    "100",
    "--encoder-dim",
    "32",
    "--critic-dim",
    "32",
    "--alpha",
    "1",
]
EXPLORE = ["--num-envs", "2", "--max-episode-steps", "50", "--total-env-steps", "400", "--learning-starts", "40"]
EXPLORE += ["--goal-hold-steps", "15", "--num-candidates", "16", "--buffer-size", "1000", "--encoder-dim", "32"]
EXPLORE += ["--actor-dim", "32", "--eval-interval", "200", "--save-interval", "200", "--eval-episodes", "1"]
RUNS = {  # name: (script, arguments)
    "gcbc_flow": ("nf_gcbc.py", GCBC + TINY + EVAL),
    "gcbc_gaussian": ("nf_gcbc.py", GCBC + TINY + EVAL + ["--policy", "gaussian"]),
    "bc_flow": ("nf_bc.py", BC + TINY + EVAL),
    "bc_gaussian": ("nf_bc.py", BC + TINY + EVAL + ["--policy", "gaussian"]),
    "gcbc_flow_matching": ("nf_gcbc.py", GCBC + TINY + EVAL + ["--policy", "flow-matching"]),
    "bc_diffusion": ("nf_bc.py", BC + TINY + EVAL + ["--policy", "diffusion"]),
    "bc_flow_matching": ("nf_bc.py", BC + TINY + EVAL + ["--policy", "flow-matching"]),
    "bc_ogbench_flow": ("nf_bc.py", ["--source", "ogbench"] + RLBC[:2] + BC[2:] + TINY + EVAL),
    "rlbc_flow": ("nf_rlbc.py", RLBC + TINY + EVAL),
    "rlbc_gaussian": ("nf_rlbc.py", RLBC + TINY + EVAL + ["--policy", "gaussian"]),
    "rlbc_fql": ("nf_rlbc.py", RLBC + TINY + EVAL + ["--policy", "fql", "--flow-steps", "3"]),
    "rlbc_flow_entropy_anneal": (
        "nf_rlbc.py",
        RLBC + TINY + EVAL + ["--entropy-weight", "0.1", "--online-bc", "anneal"],
    ),
    "explore_min_density": ("nf_goal_explore.py", EXPLORE + TINY + EVAL),
    "explore_uniform": ("nf_goal_explore.py", EXPLORE + TINY + EVAL + ["--goal-strategy", "uniform"]),
    "explore_oracle": ("nf_goal_explore.py", EXPLORE + TINY + EVAL + ["--goal-strategy", "oracle"]),
    "explore_gaussian": ("nf_goal_explore.py", EXPLORE + TINY + EVAL + ["--density", "gaussian"]),
}
STEP_COLUMNS = ("step", "env_steps", "updates", "wall_time")


@dataclass
class Args:
    before: str
    """git revision of the reference version"""
    after: str = "."
    """git revision to compare with it, or . for the working tree"""
    only: str = ""
    """run only the runs whose name contains this"""
    atol: float = 0.0
    """absolute tolerance of the comparison (0: bit-identical)"""
    workers: int = 2
    """runs side by side"""
    keep: str = ""
    """a directory to keep the runs in (default: a temporary one)"""


def checkout(revision: str, where: str) -> str:
    if revision == ".":
        return ROOT
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", where, revision], check=True, capture_output=True)
    return where


def train(tree: str, script: str, argv, data: str, out: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    command = [sys.executable, script] + argv + ["--output-dir", out]
    if script != "nf_goal_explore.py":
        command += ["--dataset-dir", data]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} (in {tree}) failed:\n{done.stderr[-3000:]}")
    (run_dir,) = glob.glob(os.path.join(out, "*"))
    return run_dir


def differences(a, b, atol: float, where: str = ""):
    """Paths inside two checkpoints (nested dicts, lists, tensors, numbers, strings) where they differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        # a step counter may change meaning (the checkpoints' names pin it down); the writer's name is new
        metadata = ("args", "step", "script") if where == "" else ()
        if set(a) - set(metadata) != set(b) - set(metadata):
            yield f"{where}: keys {sorted(set(a) ^ set(b))} in one only"
        for key in sorted(set(a) & set(b), key=str):
            if key in metadata:
                continue
            yield from differences(a[key], b[key], atol, f"{where}/{key}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            yield f"{where}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        elif a.is_floating_point() and atol > 0:
            if not torch.allclose(a, b, rtol=0, atol=atol, equal_nan=True):
                yield f"{where}: max |diff| {(a - b).abs().max().item():.3g}"
        elif not torch.equal(a, b) and not (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ):
            yield f"{where}: differs"
    elif a != b:
        yield f"{where}: {str(a)[:60]} vs {str(b)[:60]}"


def batched_critics(checkpoint):
    """An nf_rlbc checkpoint from before the two critics became one batched network (nets.{member}.{layer}.*) in
    the batched layout (weights.k [2, in, out], biases.k, norm_weights.k, norm_biases.k [2, 1, out]), its critic
    optimiser's state in the batched network's parameter order, so that the two versions can be compared."""
    if "nets.0.0.weight" not in checkpoint.get("critic", {}):
        return checkpoint
    old_keys = list(checkpoint["critic"])  # the old parameter order: member 0's layers, then member 1's
    layers = sorted({int(k.split(".")[2]) for k in old_keys})
    linears = [j for j in layers if checkpoint["critic"][f"nets.0.{j}.weight"].ndim == 2]
    norms = [j for j in layers if j not in linears]
    new = {f"weights.{k}": (j, "weight") for k, j in enumerate(linears)}
    new |= {f"biases.{k}": (j, "bias") for k, j in enumerate(linears)}
    new |= {f"norm_weights.{k}": (j, "weight") for k, j in enumerate(norms)}
    new |= {f"norm_biases.{k}": (j, "bias") for k, j in enumerate(norms)}

    def stacked(tensors, j, name):
        return torch.stack([t.T if name == "weight" and j in linears else t[None] for t in tensors])

    for part in ("critic", "target_critic"):
        state = checkpoint[part]
        checkpoint[part] = {
            key: stacked([state[f"nets.{m}.{j}.{name}"] for m in (0, 1)], j, name) for key, (j, name) in new.items()
        }
    optimizer = checkpoint["critic_optimizer"]
    index = {key: i for i, key in enumerate(old_keys)}
    states = {}
    for i, (key, (j, name)) in enumerate(new.items()):
        members = [optimizer["state"][index[f"nets.{m}.{j}.{name}"]] for m in (0, 1)]
        states[i] = {s: stacked([x[s] for x in members], j, name) if s != "step" else members[0][s] for s in members[0]}
    optimizer["state"] = states
    optimizer["param_groups"][0]["params"] = list(range(len(new)))
    return checkpoint


def compare(run_a: str, run_b: str, atol: float):
    problems = []
    names_a = sorted(os.path.basename(p) for p in glob.glob(f"{run_a}/checkpoints/*.pt"))
    names_b = sorted(os.path.basename(p) for p in glob.glob(f"{run_b}/checkpoints/*.pt"))
    if names_a != names_b:
        problems.append(f"checkpoints {names_a} vs {names_b}")
    for name in sorted(set(names_a) & set(names_b)):
        a, b = (batched_critics(torch.load(f"{r}/checkpoints/{name}", weights_only=True)) for r in (run_a, run_b))
        problems += [f"{name}{d}" for d in differences(a, b, atol)]
    rows = []
    for run in (run_a, run_b):
        with open(f"{run}/eval.csv") as f:
            rows.append([{k: v for k, v in r.items() if k not in STEP_COLUMNS} for r in csv.DictReader(f)])
    if len(rows[0]) != len(rows[1]):
        problems.append(f"eval.csv: {len(rows[0])} vs {len(rows[1])} rows")
    for i, (x, y) in enumerate(zip(*rows)):
        if set(x) - set(y):  # a column the new version adds (e.g. val_loss) has nothing to be compared with
            problems.append(f"eval.csv row {i}: columns {sorted(set(x) - set(y))} are gone")
        for key in sorted(set(x) & set(y)):
            same = x[key] == y[key] or (atol > 0 and abs(float(x[key]) - float(y[key])) <= atol)
            if not same:
                problems.append(f"eval.csv row {i} {key}: {x[key]} vs {y[key]}")
    return names_a, sum(len(r) for r in rows[:1]), problems


def main(args: Args):
    sys.path.insert(0, ROOT)
    import make_dataset

    work = args.keep or tempfile.mkdtemp(prefix="compare_commits_")
    os.makedirs(work, exist_ok=True)
    trees = {}
    try:
        for label, revision in (("before", args.before), ("after", args.after)):
            trees[label] = checkout(revision, os.path.join(work, f"tree_{label}"))
        data = os.path.join(work, "data")
        if not os.path.exists(os.path.join(data, "pointmaze-medium-multigoal-v0.npz")):
            for name, size in (
                ("pointmaze-medium-navigate-v0", dict(num_transitions=2_000, episode_steps=250)),
                ("pointmaze-medium-multigoal-v0", dict(num_episodes=20)),
            ):
                make_dataset.make_dataset(make_dataset.Args(env_name=name, dataset_dir=data, num_workers=1, **size))
        runs = {name: run for name, run in RUNS.items() if args.only in name}

        def both(name):
            script, argv = runs[name]
            dirs = [train(trees[label], script, argv, data, os.path.join(work, label, name)) for label in trees]
            return name, compare(*dirs, args.atol)

        failed = 0
        with ThreadPoolExecutor(args.workers) as pool:
            for name, (checkpoints, evaluations, problems) in pool.map(both, runs):
                verdict = "same" if not problems else f"DIFFERENT ({len(problems)})"
                print(f"{name:26s} {len(checkpoints)} checkpoints, {evaluations} evaluations: {verdict}", flush=True)
                for problem in problems[:10]:
                    print(f"    {problem}")
                failed += bool(problems)
        print(
            f"{len(runs) - failed} of {len(runs)} runs give the same numbers"
            + (f" (atol {args.atol})" if args.atol else "")
        )
    finally:
        for label, tree in trees.items():
            if tree != ROOT:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main(tyro.cli(Args))
