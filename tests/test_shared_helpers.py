"""The single-file convention: helpers that do the same thing in several scripts are identical copies, so that a
diff across scripts shows only what is different about the algorithm."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = {
    ("nf_gcbc.py", "nf_bc.py", "nf_rlbc.py", "nf_goal_explore.py"): [
        "mlp", "save_video", "load_checkpoint", "run_directory", "RunLog", "non_finite_step", "cuda_graphed",
    ],
    ("nf_gcbc.py", "nf_bc.py", "nf_rlbc.py"): [
        "load_ogbench", "did_you_mean", "seeded_reset", "episode_noise", "run_episodes", "save_checkpoint",
        "restore_rng", "EnvPool", "env_worker",
    ],
    ("nf_bc.py", "nf_rlbc.py"): ["flatten_observation", "load_minari", "scale_actions"],
    ("nf_gcbc.py", "nf_bc.py"): [
        "init_distributed", "agree", "leave_together", "lr_factor", "time_embedding", "matching_width",
    ],
}  # fmt: skip


def definitions(script: str):
    source = (ROOT / script).read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body if hasattr(node, "name")}


@pytest.mark.parametrize("scripts,names", SHARED.items())
def test_shared_helpers_are_identical_copies(scripts, names):
    found = {script: definitions(script) for script in scripts}
    for name in names:
        copies = {script: found[script].get(name) for script in scripts}
        assert None not in copies.values(), f"{name} is missing from {[s for s, c in copies.items() if c is None]}"
        assert len(set(copies.values())) == 1, f"{name} differs between {scripts}"
