#!/usr/bin/env bash
# One GPU pass: everything a session lent a GPU should measure, in one command that ends within
# its budget (default 460 s, under 8 minutes on one H200), in priority order:
#   1 kernels      benchmarks/kernels.py: lightning kernel vs XLA chunked vs cuDNN softmax; GLA;
#                  softmax: flash kernel (packed) vs cuDNN vs blocked XLA; GEMMs
#   2 llama_bf16   benchmarks/train_step.py llama-1b, T 2048, batch 8, scanned layers, bf16
#   3 llama_fp8    the same with precision.fp8=current
#   4 tnl_8k       benchmarks/train_step.py tnl-1b, T 8192, batch 2, scanned layers
#   5 hgrn2_8k     the same for hgrn2-1b (its GLA kernel)
#   6 moe          benchmarks/moe.py, 16K tokens, D 2048, E 8 top-2, F 2816, bf16
#   7 gpu_tests    pytest -m gpu over the test files that carry the marker
# and, only when named in --parts (a second call: fla autotunes for minutes on first calls):
#   8 peers_jax    benchmarks/peers.py: jaxllm's lightning and GLA kernels vs jla's (Mosaic GPU)
#   9 peers_torch  benchmarks/peers_torch.py: fla's chunk_simple_gla and chunk_gla, same table
#                  (both need the flash-linear-attention, fla-core, jax-linear-attention wheels
#                  in .whl)
# Each part runs under its own `timeout` (capped by what is left of the budget); a failing part
# is recorded (exit code, last lines of its log) and the pass goes on. After every part the
# folder holds summary.md (the markdown tables), summary.json and logs.tar.gz (each part's log
# and JSON): three files, so the device tool's 8-file limit on $OUT is never reached.
#
#   bash benchmarks/gpu.sh [--out DIR] [--python PY] [--smoke] [--budget S] [--parts a,b,...]
#
# --out      results folder; default $OUT (set by the device tool), else benchmarks/results/gpu
# --python   interpreter; default $PYTHON, else python3
# --smoke    (or JAXLLM_GPU_SMOKE=1) the same parts with tiny shapes on the CPU: the plumbing
# --budget   seconds for the whole pass (default 460; smoke 1500)
# --parts    comma-separated subset of the part names above, e.g. for a rerun on a warm machine
# Extra train-step overrides for both llama runs: JAXLLM_GPU_LLAMA_SET="key=value ..."; their
# batch: JAXLLM_GPU_LLAMA_BATCH (default 8).
#
# When a .whl folder sits at the repository root and the interpreter cannot import pydantic, the
# carried wheels are installed to /tmp/site first (the device tool's README), skipping any the
# image already has at the same or a newer version. See benchmarks/README.md, "The GPU pass".
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

SMOKE=${JAXLLM_GPU_SMOKE:-0}
OUT_DIR=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
BUDGET=""
PARTS="kernels,llama_bf16,llama_fp8,tnl_8k,hgrn2_8k,moe,gpu_tests"

while (($#)); do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --python) PY=$2; shift ;;
    --python=*) PY=${1#--python=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    --parts) PARTS=$2; shift ;;
    --parts=*) PARTS=${1#--parts=} ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $SMOKE == 1 ]] || SMOKE=0
if [[ -z $BUDGET ]]; then
  if ((SMOKE)); then BUDGET=1500; else BUDGET=460; fi
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))
KILL_AFTER=10  # seconds between timeout's TERM and its KILL
MIN_PART=20    # a part that would get less than this is skipped

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
RAW=$(mktemp -d "${TMPDIR:-/tmp}/jaxllm-gpu.XXXXXX") || exit 1
STATUS=$RAW/status.tsv
: >"$STATUS"

export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ((SMOKE)); then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  # a rerun on the same (warm) machine reuses the compiled programs
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm-jax-cache}
  # one process at a time: give XLA's pool 92% of the card instead of 75%, leaving ~11 GiB to
  # cuDNN / cuBLAS workspaces
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
fi

log() { echo "[gpu.sh $(($(date +%s) - START))s] $*"; }

summarize() {
  "$PY" "$ROOT/benchmarks/gpu_summary.py" "$RAW" "$OUT_DIR" "$@" ||
    echo "gpu.sh: the summary failed (see $RAW)" >&2
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$RAW" . 2>/dev/null
}

# run_part NAME CAP_S CMD...: CMD under timeout, log and JSON in $RAW, one line in status.tsv.
run_part() {
  local name=$1 cap=$2
  shift 2
  if [[ ,$PARTS, != *,$name,* ]]; then
    return
  fi
  local left=$((DEADLINE - $(date +%s) - KILL_AFTER))
  local limit=$((cap < left ? cap : left))
  if ((limit < MIN_PART)); then
    log "$name: skipped, ${left}s of the budget left"
    printf '%s\tskipped\t\t0\t%s\n' "$name" "$limit" >>"$STATUS"
    summarize
    return
  fi
  log "$name: start (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after="$KILL_AFTER" "$limit" "$@" >"$RAW/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  if [[ $name == gpu_tests && $rc == 5 ]]; then
    status=none  # pytest: no test collected
  fi
  log "$name: $status (exit $rc) in $(($(date +%s) - t0))s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$limit" \
    >>"$STATUS"
  summarize
}

# --- carried wheels (the device tool's README): only where .whl exists and pydantic is missing
SITE=${JAXLLM_GPU_SITE:-/tmp/site}
if [[ -d $ROOT/.whl ]] && ! "$PY" -c "import pydantic" 2>/dev/null; then
  mapfile -t WHEELS < <(
    "$PY" - "$ROOT"/.whl/*.whl <<'EOF'
import importlib.metadata as md
import os
import re
import sys


def key(v):
    return [int(x) for x in re.findall(r"\d+", v)[:4]]


for path in sys.argv[1:]:
    name, version = os.path.basename(path).split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or key(have) < key(version):
        print(path)
EOF
  )
  log "installing ${#WHEELS[@]} carried wheel(s) to $SITE: ${WHEELS[*]##*/}"
  if ((${#WHEELS[@]})) && timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}"; then
    export PYTHONPATH=$SITE:$PYTHONPATH
  else
    log "the wheel install failed: the parts that import jaxllm will fail"
  fi
fi

# --- what ran where
{
  echo "date: $(date -u +%FT%TZ)"
  echo "smoke: $SMOKE  budget_s: $BUDGET  parts: $PARTS"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "JAX_PLATFORMS: $JAX_PLATFORMS"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION: ${XLA_PYTHON_CLIENT_MEM_FRACTION:-unset}"
  echo "JAXLLM_GPU_LLAMA_SET: ${JAXLLM_GPU_LLAMA_SET:-unset}"
  echo "JAXLLM_GPU_LLAMA_BATCH: ${JAXLLM_GPU_LLAMA_BATCH:-unset}"
  if command -v nvidia-smi >/dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  fi
  timeout 90 "$PY" -c "import sys, jax, flax, pydantic
print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__,
      '| pydantic', pydantic.__version__)
print('devices:', jax.devices())" 2>&1 | tail -n 5
} >"$RAW/env.txt"
cat "$RAW/env.txt"

# --- the parts, in priority order
if ((SMOKE)); then
  KERNELS=(--lengths 128 256 --gla-lengths 128 --softmax-lengths 128 --batch 1 --heads 4
    --head-dim 32 --gemm 128 --rounds 2)
  TINY=(model.d_model=64 model.n_layers=2 model.d_ff=128 model.vocab_size=256)
  LLAMA=(llama-1b model.scan_layers=true "${TINY[@]}" model.n_heads=4 model.n_kv_heads=2)
  LLAMA_SHAPE=(--seq-len 64 --batch 2 --steps 2)
  TNL=(tnl-1b model.scan_layers=true "${TINY[@]}" model.n_heads=2 --seq-len 128 --batch 1
    --steps 2)
  MOE=(--tokens 512 --d-model 64 --experts 8 --top-k 2 --expert-d-ff 128 --dtype bfloat16
    --iters 2 --ep 1)
  HGRN2=(hgrn2-1b model.scan_layers=true "${TINY[@]}" --seq-len 128 --batch 1 --steps 2)
  PEERS=(--lengths 128 --batch 1 --heads 2 --head-dim 64 --rounds 2)
  CAP=(400 300 300 300 300 300 300 300 300)
else
  KERNELS=(--lengths 2048 8192 32768 65536 --softmax-lengths 2048 8192 --batch 4 --heads 32
    --head-dim 128 --gemm 8192 --rounds 5)
  LLAMA=(llama-1b model.scan_layers=true)
  LLAMA_SHAPE=(--seq-len 2048 --batch "${JAXLLM_GPU_LLAMA_BATCH:-8}" --steps 10)
  TNL=(tnl-1b model.scan_layers=true --seq-len 8192 --batch 2 --steps 10)
  MOE=(--tokens 16384 --d-model 2048 --experts 8 --top-k 2 --expert-d-ff 2816 --dtype bfloat16
    --iters 10 --ep 1)
  HGRN2=(hgrn2-1b model.scan_layers=true --seq-len 8192 --batch 2 --steps 10)
  PEERS=(--lengths 2048 8192 32768 --batch 4 --heads 32 --head-dim 128 --rounds 5)
  CAP=(200 75 75 90 90 90 60 150 300)
fi
read -r -a LLAMA_SET <<<"${JAXLLM_GPU_LLAMA_SET:-}"

run_part kernels "${CAP[0]}" "$PY" benchmarks/kernels.py "${KERNELS[@]}" \
  --out "$RAW/kernels.json"
# train_step.py's argparse takes the preset and its key=value overrides before the options
run_part llama_bf16 "${CAP[1]}" "$PY" benchmarks/train_step.py "${LLAMA[@]}" \
  ${LLAMA_SET[@]+"${LLAMA_SET[@]}"} "${LLAMA_SHAPE[@]}" --out "$RAW/llama_bf16.json"
run_part llama_fp8 "${CAP[2]}" "$PY" benchmarks/train_step.py "${LLAMA[@]}" precision.fp8=current \
  ${LLAMA_SET[@]+"${LLAMA_SET[@]}"} "${LLAMA_SHAPE[@]}" --out "$RAW/llama_fp8.json"
run_part tnl_8k "${CAP[3]}" "$PY" benchmarks/train_step.py "${TNL[@]}" --out "$RAW/tnl_8k.json"
run_part hgrn2_8k "${CAP[4]}" "$PY" benchmarks/train_step.py "${HGRN2[@]}" \
  --out "$RAW/hgrn2_8k.json"
run_part moe "${CAP[5]}" "$PY" benchmarks/moe.py "${MOE[@]}" --out "$RAW/moe.json"

mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu\b' tests | sort)
if ((${#GPU_TESTS[@]})); then
  run_part gpu_tests "${CAP[6]}" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$RAW/gpu_tests.xml" "${GPU_TESTS[@]}"
elif [[ ,$PARTS, == *,gpu_tests,* ]]; then
  log "gpu_tests: no test file carries pytest.mark.gpu"
  echo "no test file under tests/ carries pytest.mark.gpu" >"$RAW/gpu_tests.log"
  printf '%s\tnone\t\t0\t-\n' gpu_tests >>"$STATUS"
fi

run_part peers_jax "${CAP[7]}" "$PY" benchmarks/peers.py "${PEERS[@]}" \
  --dump "$RAW/peers_ref.npz" --out "$RAW/peers_jax.json"
run_part peers_torch "${CAP[8]}" "$PY" benchmarks/peers_torch.py "${PEERS[@]}" \
  --dump "$RAW/peers_ref.npz" --out "$RAW/peers_torch.json"

summarize --print
log "done in $(($(date +%s) - START))s: $OUT_DIR/summary.md, summary.json, logs.tar.gz"
awk -F'\t' '$2 == "ok" || $2 == "none" { n++ } END { exit (n == NR ? 0 : 1) }' "$STATUS"
rc=$?
rm -rf "$RAW"  # all of it is in logs.tar.gz
exit "$rc"
