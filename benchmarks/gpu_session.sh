#!/usr/bin/env bash
# One device call that runs the CUDA tests and the GPU benchmarks within a 10-minute limit,
# each step capped so that a hang cannot eat the rest. Run from the repository root:
#   bash benchmarks/gpu_session.sh            (results: $OUT/results.tgz and $OUT/log.txt)
# Optional: wheels in .whl/ (transformers/peft versions the GPU image lacks) are installed
# into /tmp/site first; the machine's own packages are used if they do not import.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/optim8-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
DEADLINE=$((SECONDS + ${BUDGET_S:-565}))
R=benchmarks/results

if ls .whl/*.whl >/dev/null 2>&1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site python3 -c "import transformers, peft"; then
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || {
    echo "### editable install failed; importing from the checkout instead"
    ln -sfn ../kernels optim8/kernels && ln -sfn ../layers optim8/layers
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
}
python3 -c "import torch, cupy, transformers, peft, optim8; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

save() { tar czf "$OUT/results.tgz" $R/*.md $R/*.json 2>/dev/null; }
step() {  # step CAP_SECONDS command...
    local cap=$1 left=$((DEADLINE - SECONDS - 5))
    shift
    ((left < cap)) && cap=$left
    if ((cap < 20)); then echo "### SKIPPED (no time left): $*"; return; fi
    echo "### $* (cap ${cap}s, t=${SECONDS}s)"
    timeout -k 5 "$cap" "$@"
    echo "### rc=$? t=${SECONDS}s"
    save
}

# the tests first: they fill the kernel cache and show a failing kernel before any timing
PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)
step 210 python3 -m pytest -q -m cuda -p no:cacheprovider $PER_TEST --continue-on-collection-errors -rfE
step 60 python3 benchmarks/bench_optim.py
step 90 python3 benchmarks/e2e_lora.py --dtype fp16
step 70 python3 benchmarks/e2e_full_finetune.py
step 75 python3 benchmarks/bench_linear8bit.py
step 25 python3 benchmarks/bench_blockwise.py
step 120 python3 benchmarks/distributed_nccl.py --nproc 1
step 70 python3 benchmarks/e2e_lora.py --dtype bf16
echo "### done t=${SECONDS}s"
save
