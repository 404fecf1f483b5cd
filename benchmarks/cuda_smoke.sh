#!/usr/bin/env bash
# train.py and sample_ddp.py end to end under torchrun, one process per GPU (NPROC=2 on a machine without one:
# two CPU processes over gloo), on the tiny config: train 40 steps, resume to 60, then sample 32 images with the
# fast path and with the plain one (--no-fast) and compare them. Prints what each step wrote; ends with
# "SMOKE PASS" or "SMOKE FAIL: <what>". Logs go to $OUT (default .devout/). PYTHON names the interpreter
# (default python3).
#   bash benchmarks/cuda_smoke.sh                    # here: NPROC=2 on the CPU, about a minute
# On the device machine, which has no omegaconf: carry .whl/ holding omegaconf's wheel (see benchmarks/README.md);
# this script installs it.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import omegaconf" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/smoke_site .whl/*.whl \
    || { echo "SMOKE FAIL: omegaconf is not installed and .whl/ holds no wheel of it"; exit 1; }
  export PYTHONPATH=/tmp/smoke_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
out=${OUT:-.devout}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nproc=${NPROC:-$("$py" -c "import torch; print(torch.cuda.device_count() or 2)")}
launch=(timeout -k 10 "${SMOKE_STEP_TIMEOUT:-240}" "$py" -m torch.distributed.run --standalone
        --nproc_per_node="$nproc")
fail() { echo "SMOKE FAIL: $*"; exit 1; }
step() {  # step NAME COMMAND...: run it, its output to the console and $out/smoke_NAME.log
  local name=$1; shift
  echo "+ $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/smoke_$name.log"
  local rc=${PIPESTATUS[0]}
  echo "-- $name: rc $rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || fail "$name exited with $rc"
}

echo "# cuda_smoke: $nproc process(es), $("$py" -c "import torch; print(torch.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")"
step train "${launch[@]}" train.py configs/tiny_c2i.yaml --output-dir "$work/run" train.max_steps=40 \
  --checkpoint-steps 20 --logging-steps 10 --no-progress
step resume "${launch[@]}" train.py configs/tiny_c2i.yaml --output-dir "$work/run" --resume train.max_steps=60 \
  --checkpoint-steps 20 --logging-steps 10 --no-progress
ls "$work/run/checkpoints"
step sample_fast "${launch[@]}" sample_ddp.py --pretrained "$work/run" --num-fid-samples 32 --local-batch-size 8 \
  --num-steps-per-stage 5 --sample-dir "$work/fast" --no-progress
step sample_plain "${launch[@]}" sample_ddp.py --pretrained "$work/run" --num-fid-samples 32 --local-batch-size 8 \
  --num-steps-per-stage 5 --sample-dir "$work/plain" --no-progress --no-fast
"$py" - "$work" <<'EOF' 2>&1 | tee "$out/smoke_check.log"
import json, sys
from pathlib import Path

import numpy as np

work = Path(sys.argv[1])
steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
checkpoints = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
print(f"metrics rows at steps {steps}; checkpoints {checkpoints}")
assert steps == [10, 20, 30, 40, 50, 60], steps
fast, plain = (np.load(work / f"{name}.npz")["arr_0"] for name in ("fast", "plain"))
assert fast.shape == plain.shape == (32, 32, 32, 3) and fast.dtype == np.uint8, (fast.shape, plain.shape)
diff = np.abs(fast.astype(int) - plain.astype(int))
print(f"fast vs plain samples (uint8 levels): mean {diff.mean():.3f}, max {diff.max()}, "
      f"share of values off by more than 2: {(diff > 2).mean():.4f}; pixel std {fast.std():.1f}")
assert fast.std() > 5, "the fast samples are flat"
assert diff.mean() < 2, "the fast path's images are not the plain path's"
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "the outputs are not what the steps should have written"
cp -r "$work/run/log.txt" "$out/smoke_train_log.txt" 2>/dev/null
echo "SMOKE PASS"
