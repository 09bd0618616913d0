import pathlib
import sys
import tempfile

# The scripts and flow.py live at the repository root, as in CleanRL; make them importable from tests/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import make_dataset  # noqa: E402

MINARI_ID = "test/pendulum/random-v0"


@pytest.fixture(scope="session", autouse=True)
def contained_tempfiles(tmp_path_factory):
    """OGBench's maze envs write their MuJoCo model with tempfile.mkstemp and never delete it (about 7 kB per env
    made): keep those files in pytest's own temporary directory, which pytest prunes, instead of /tmp. TMPDIR
    reaches the scripts' subprocesses and evaluation workers."""
    path = str(tmp_path_factory.mktemp("tempfiles"))
    patch = pytest.MonkeyPatch()
    patch.setattr(tempfile, "tempdir", path)
    patch.setenv("TMPDIR", path)
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def pointmaze_dir(tmp_path_factory):
    """A tiny pointmaze-medium-navigate set (4 + 1 episodes x 250 steps), for goal-conditioned and singletask names."""
    path = tmp_path_factory.mktemp("pointmaze")
    make_dataset.make_dataset(
        make_dataset.Args(
            env_name="pointmaze-medium-navigate-v0",
            dataset_dir=str(path),
            num_transitions=1_000,
            episode_steps=250,
            num_workers=1,
        )
    )
    return str(path)


@pytest.fixture(scope="session")
def minari_dir(tmp_path_factory):
    """Random Pendulum play (12 episodes x 40 steps, 1-D actions in [-2, 2]) as a local Minari dataset with
    reference scores; MINARI_DATASETS_PATH points at it for the session."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    path = tmp_path_factory.mktemp("minari")
    patch = pytest.MonkeyPatch()
    patch.setenv("MINARI_DATASETS_PATH", str(path))
    env = gymnasium.make("Pendulum-v1")
    rng = np.random.default_rng(0)
    buffers = []
    for episode in range(12):
        ob, _ = env.reset(seed=episode)
        obs, actions, rewards = [ob], [], []
        for _ in range(40):
            action = rng.uniform(-2, 2, 1).astype(np.float32)
            ob, reward, *_ = env.step(action)
            obs.append(ob), actions.append(action), rewards.append(reward)
        buffers.append(
            EpisodeBuffer(
                observations=np.array(obs),
                actions=np.array(actions),
                rewards=np.array(rewards),
                terminations=np.zeros(40, bool),
                truncations=np.arange(40) == 39,
            )
        )
    minari.create_dataset_from_buffers(
        MINARI_ID,
        buffers,
        env=env,
        eval_env="Pendulum-v1",
        algorithm_name="random",
        ref_min_score=-1500.0,
        ref_max_score=0.0,
    )
    yield str(path)
    patch.undo()
