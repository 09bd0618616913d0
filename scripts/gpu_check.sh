#!/usr/bin/env bash
# The one prepared check for a fresh GPU machine that has PyTorch but none of our other packages and no network.
#
# 1. Where pip reaches a package index (this repository's machines), fetch the wheels once, for the GPU machine's
#    Python (default 3.12; PYVER=3.11 for another):
#        bash scripts/gpu_check.sh --prepare          # writes .whl/ (git-ignored, ~30 MB)
# 2. Copy the repository with .whl/ to the GPU machine and run, from the repository root:
#        bash scripts/gpu_check.sh                    # writes $OUT/summary.md (OUT defaults to gpu_check_out)
#    It installs the wheels into /tmp/site, makes a small cube-single dataset, runs each script ~2,000 steps on
#    CUDA with an evaluation, times a 250-episode cube evaluation, runs benchmarks/train_speed.py, and writes one
#    summary, every step under a timeout, the issue's targets first; steps that would start after DEADLINE (540 s)
#    are skipped, so the whole check fits a 10-minute call. A smoke test on a CPU machine:
#        STEPS=100 TRANSITIONS=3000 TIME_SCALE=4 DEADLINE=3600 OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  PYVER=${PYVER:-3.12}
  rm -rf .whl && mkdir -p .whl
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=" --platform $p"; done
  # what the scripts import beyond the GPU image's packages (torch, numpy, tensorboard, tqdm, matplotlib, imageio,
  # absl-py, lxml, typing-extensions are there), pinned as in requirements.txt
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    $platforms -d .whl gymnasium==1.4.0 farama-notifications==0.0.6 tyro==1.0.17 docstring-parser==0.18.0 \
    typeguard==4.6.1 ogbench==1.2.2 mujoco==4.0.0 mujoco-core==4.0.0 glfw==2.11.0 dm_control==1.0.50 dm-env==1.6
  # dm_control's wheel (56 MB) is mostly assets of other environments; OGBench uses its mjcf package only
  python3 - <<'EOF'
import glob, os, zipfile
path = glob.glob(".whl/dm_control-*.whl")[0]
drop = ("dm_control/locomotion/", "dm_control/suite/dog_assets/", "dm_control/mujoco/testing/",
        "dm_control/blender/", "dm_control/mjcf/test_assets/", "dm_control/suite/all_domains.png")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".slim", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if item.filename.startswith(drop):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l + b"\n" for l in data.split(b"\n") if l and not l.decode().startswith(drop))
        dst.writestr(item, data)
os.replace(path + ".slim", path)
EOF
  du -sh .whl && ls .whl
  exit 0
fi

OUT=${OUT:-gpu_check_out}
STEPS=${STEPS:-2000}
TRANSITIONS=${TRANSITIONS:-20_000}
TIME_SCALE=${TIME_SCALE:-1}  # multiplies every step's time limit
DEADLINE=${DEADLINE:-540}  # seconds: a step that would start later is skipped (the device tool stops a call at 600)
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
DATA=/tmp/gpu_check_data
RUNS=/tmp/gpu_check_runs
rm -rf "$RUNS"  # this check's runs only
export PYTHONUNBUFFERED=1
: >"$SUMMARY"
say() { echo "$@" | tee -a "$SUMMARY"; }
# step NAME SECONDS COMMAND...: runs the command under a timeout, its output in $OUT/NAME.log, its time in the summary
step() {
  local name=$1 limit=$(($2 * TIME_SCALE))
  shift 2
  local begin=$SECONDS
  if ((begin + 20 > DEADLINE)); then
    say "- $name: skipped, past the deadline ($DEADLINE s)"
    return 1
  fi
  ((begin + limit > DEADLINE)) && limit=$((DEADLINE - begin))
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  say "- $name: exit $rc in $((SECONDS - begin)) s$([[ $rc == 124 ]] && echo " (timed out at $limit s)")"
  return $rc
}

say "# GPU check, $(date -u +%F' '%H:%M) UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/install.log" 2>&1 || say "- installing the wheels failed: see install.log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: everything runs on the CPU"
print(f"- torch {torch.__version__}, {name}")
EOF
DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

say ""
say "## Steps"
step dataset 150 python3 make_dataset.py cube-single-play-v0 --num-transitions "$TRANSITIONS" \
  --dataset-dir $DATA --num-workers 8
COMMON=(--dataset-dir $DATA --output-dir $RUNS --total-steps "$STEPS" --eval-interval "$STEPS" --save-interval "$STEPS"
  --log-interval 500)
# the issue's targets first: training speed and batch-1 latency, then the 250-episode evaluation
step train_speed_eager 120 python3 benchmarks/train_speed.py --device "$DEVICE" --rounds 3 --min-time 0.3
step train_speed_compiled 180 python3 benchmarks/train_speed.py --device "$DEVICE" --compile --policies flow \
  --scripts nf_gcbc nf_rlbc --rounds 3 --min-time 0.3
step nf_gcbc 120 python3 nf_gcbc.py --env-id cube-single-play-v0 "${COMMON[@]}" --eval-episodes 10 --eval-envs 10
GCBC_RUN=$(ls -d $RUNS/cube-single-play-v0__nf_gcbc__* 2>/dev/null | head -1)
if [[ -n "$GCBC_RUN" ]]; then  # 5 tasks x 50 episodes, the issue's evaluation target (60 s)
  step eval_250_episodes 150 python3 nf_gcbc.py --resume "$GCBC_RUN" --eval-only --eval-episodes 50 --eval-envs 50
  cp "$GCBC_RUN"/eval_only_step_*.json "$OUT/eval_in_process.json" 2>/dev/null
  step eval_250_episodes_8_workers 150 python3 nf_gcbc.py --resume "$GCBC_RUN" --eval-only --eval-episodes 50 \
    --eval-envs 48 --eval-workers 8
fi
step nf_gcbc_compiled 150 python3 nf_gcbc.py --env-id cube-single-play-v0 "${COMMON[@]}" --eval-episodes 10 \
  --eval-envs 10 --compile --exp-name compiled
step nf_rlbc 100 python3 nf_rlbc.py --env-id cube-single-play-singletask-task2-v0 "${COMMON[@]}" --eval-episodes 10 \
  --eval-envs 10
step nf_rlbc_fql 100 python3 nf_rlbc.py --env-id cube-single-play-singletask-task2-v0 "${COMMON[@]}" --policy fql \
  --alpha 300 --eval-episodes 10 --eval-envs 10 --exp-name fql
step nf_bc 100 python3 nf_bc.py --source ogbench --env-id cube-single-play-singletask-task2-v0 "${COMMON[@]}" \
  --eval-episodes 10 --eval-envs 10
step nf_goal_explore 100 python3 nf_goal_explore.py --env-id pointmaze-medium-v0 --output-dir $RUNS \
  --total-env-steps "$STEPS" --eval-interval "$STEPS" --save-interval "$STEPS" --compile
step train_speed_explore 120 python3 benchmarks/train_speed.py --device "$DEVICE" --compile --policies flow \
  --scripts nf_goal_explore --rounds 3 --min-time 0.3

say ""
say "## --compile (on CUDA: the whole step as one CUDA graph) against eager, the same seed and batches"
python3 - "$RUNS" "$STEPS" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import glob, sys, torch
runs, steps = sys.argv[1], sys.argv[2]
found = {}
for name in ("nf_gcbc", "compiled"):
    paths = glob.glob(f"{runs}/cube-single-play-v0__{name}__*/checkpoints/step_{steps}.pt")
    found[name] = torch.load(paths[0], weights_only=True)["policy"] if paths else None
if None in found.values():
    print(f"- a run is missing its step-{steps} checkpoint: {[k for k, v in found.items() if v is None]}")
else:
    diff = max((found["compiled"][k].float() - v.float()).abs().max().item() for k, v in found["nf_gcbc"].items())
    size = max(v.float().abs().max().item() for v in found["nf_gcbc"].values())
    print(f"- largest weight difference after {steps} steps: {diff:.3g} (largest weight {size:.3g})")
EOF
say ""
say "## Evaluations (the last row of each run's eval.csv)"
for csv in $RUNS/*/eval.csv; do
  [[ -f "$csv" ]] && say "- $(basename "$(dirname "$csv")"): $(head -1 "$csv") = $(tail -1 "$csv")"
done
python3 - "$OUT"/eval_in_process.json $RUNS/*/eval_only_step_*.json <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, os, sys
for path, how in zip(sys.argv[1:], ("in this process", "in 8 worker processes")):
    if os.path.exists(path):
        r = json.load(open(path))
        print(f"- --eval-only {how}, {r['episodes']} episodes per task: success {r['success']:.3f} (times: above)")
EOF
say ""
say "## Training speed (benchmarks/train_speed.py)"
for name in train_speed_eager train_speed_compiled train_speed_explore; do
  grep -E "^\||^training" "$OUT/$name.log" 2>/dev/null | tee -a "$SUMMARY"
  say ""
done
say "## Training speed of the runs (tqdm's last rate)"
for name in nf_gcbc nf_gcbc_compiled nf_rlbc nf_rlbc_fql nf_bc nf_goal_explore; do
  rate=$(tr '\r' '\n' <"$OUT/$name.log" 2>/dev/null | grep -oE "[0-9.]+it/s" | tail -1)
  say "- $name: ${rate:-?}"
done
