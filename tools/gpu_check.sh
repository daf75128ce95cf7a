#!/usr/bin/env bash
# Every GPU check in one command (at most ~9 minutes on one H200): the CUDA tests, the benchmark's GPU
# sweep and one Fashion-MNIST epoch.  Results and logs go into the folder given as the argument.
#
#   tools/gpu_check.sh OUT_DIR            (run from the repository root, on a machine with a CUDA GPU)
#
# The device machine's python3 already holds torch (2.11+cu130), numpy, scikit-learn, pytest and tqdm;
# relgrad is imported from the working tree (PYTHONPATH), nothing is installed.  Each stage has its own
# time limit and its own log, so one failing stage still leaves the others' results.
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== [$name] $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t ))s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
  "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('numpy', numpy.__version__)"; \
  date -u +%Y-%m-%dT%H:%M:%SZ; git rev-parse HEAD 2>/dev/null; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. CUDA tests (autocast fp16/bf16, TF32, compile aot_eager + inductor, sync-free step, checkpoints both ways,
#    DDP with CUDA tensors, benchmark smoke) and the CPU library tests on this machine's torch.
stage cuda-tests 240 $PY -m pytest -q -o addopts="-p no:cacheprovider" -rs tests/test_cuda.py tests/test_torch_library.py \
      --junitxml="$OUT/cuda-tests.xml"

# 2. The benchmark's GPU sweep (relative vs plain/ordinary/autodiff/lu/gemm, float32, L=2).
stage bench 210 $PY -m relgrad.bench --backends torch --devices cuda --dims 1024,2048,4096,8192,16384 \
      --batches 10,100 --budget 6 --repeats 10 --out "$OUT/bench_cuda.csv"

# 3. One Fashion-MNIST epoch at the paper's setting on the GPU (the data travel in _data/fashion-mnist
#    when /usr/share/datasets/fashion-mnist is absent there: copy the four .gz files and carry _data).
DATA=""
for d in /usr/share/datasets/fashion-mnist "$PWD/_data/fashion-mnist"; do [ -d "$d" ] && DATA=$d && break; done
if [ -n "$DATA" ]; then
  stage fmnist-epoch 120 $PY -m relgrad.experiments --dataset fashion-mnist --data-dir "$DATA" --device cuda \
        --method relative --batch-size 10 --lr 1e-4 --alpha 0.01 --epochs 1 --out "$OUT/fmnist_cuda_epoch.csv"
else
  echo "fmnist-epoch skipped: no Fashion-MNIST files (/usr/share/datasets/fashion-mnist or _data/fashion-mnist)" | tee -a "$OUT/summary.txt"
fi
echo "=== done (status $status)"; cat "$OUT/summary.txt"
exit $status
