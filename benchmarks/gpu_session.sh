#!/usr/bin/env bash
# One device call: the CUDA tests, then the GPU benchmarks, in at most 8 minutes, ending with one
# summary table. Every step is independent (a failing or missing dependency skips that step, not
# the session) and time-capped (a hang cannot eat the rest). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh            results: $OUT/results.tgz, $OUT/log.txt, $OUT/summary.md
#   bash benchmarks/gpu_session.sh --dry-run  the same steps on the host device at tiny sizes (no GPU;
#                                             CI runs it, tests/test_gpu_session.py)
#
# Needs only torch, numpy and (on a GPU) CuPy: the kernel tests and kernel benchmarks never import
# the Hugging Face stack; the steps that do (HF tests, e2e benchmarks) run last and may fail alone,
# e.g. on an image whose transformers/peft are older than the hf extra's pins. Optional: wheels in
# .whl/ are installed into /tmp/site first and used if they import.
set -u
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/optim8-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))
R=benchmarks/results
STEPS="$OUT/steps.tsv"
: >"$STEPS"
DRYFLAG=()
((DRY)) && DRYFLAG=(--dry-run)

if ((!DRY)) && ls .whl/*.whl >/dev/null 2>&1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site python3 -c "import transformers, peft"; then
    export PYTHONPATH=/tmp/site
fi
# optim8 from this checkout: installed (editable, no dependencies: the image's own packages stay)
# unless it already imports from here
if ! python3 -c "import optim8, os, sys; sys.exit(0 if os.path.realpath(optim8.__file__).startswith(os.path.realpath('.')) else 1)" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . || {
        echo "### editable install failed; importing from the checkout instead"
        ln -sfn ../kernels optim8/kernels && ln -sfn ../layers optim8/layers
        export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
    }
fi
if ((DRY)); then
    python3 -c "import torch, optim8; from optim8.kernels import hostdev; r = hostdev.unavailable_reason(); print('dry run on the host device; torch', torch.__version__); raise SystemExit(r)" || exit 1
else
    python3 -c "import torch, cupy, optim8; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__, torch.cuda.get_device_name())" || exit 1
    python3 -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" || echo "### no usable transformers/peft: the HF steps will fail on their own"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi

save() { tar czf "$OUT/results.tgz" -C "$OUT" --exclude=results.tgz . $R/*.md $R/*.json 2>/dev/null || tar czf "$OUT/results.tgz" -C "$OUT" --exclude=results.tgz . 2>/dev/null; }
step() {  # step NAME CAP_SECONDS command...
    local name=$1 cap=$2 left=$((DEADLINE - SECONDS - 5)) t0=$SECONDS rc
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 15)); then
        echo "### SKIPPED (no time left): $name"
        printf '%s\tskipped\t0\tno time left\n' "$name" >>"$STEPS"
        return
    fi
    echo "### $name: $* (cap ${cap}s, t=${SECONDS}s)"
    timeout -k 5 "$cap" "$@" 2>&1 | tee "$OUT/step-$name.log"
    rc=${PIPESTATUS[0]}
    local tests
    tests=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$OUT/step-$name.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    ((rc == 124 || rc == 137)) && tests="timed out after ${cap}s${tests:+; $tests}"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "${tests:--}" >>"$STEPS"
    echo "### $name rc=$rc t=${SECONDS}s"
    save
}

PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfE)
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
KERNEL_TESTS=(tests/test_cuda_sources.py tests/test_blockwise.py tests/test_int8_kernels.py tests/test_optim_cuda.py tests/test_update_cuda.py $(ls tests/test_*4bit*kernel*.py 2>/dev/null))
HF_TESTS=(tests/test_hf_integration.py tests/test_peft_lora.py tests/test_trainer_resume.py)
if ((DRY)); then  # a few cases of each file: proves the step, not the kernels (CI runs them all)
    KERNEL_SELECT=(-k "every_blocksize and 256 or one_step_bit_exact and 4097 or decode_gemv and kn3 or source_compiles")
    HF_SELECT=(-k "llama")
else
    KERNEL_SELECT=()
    HF_SELECT=()
fi

# the kernel tests first: they fill the kernel cache and show a failing kernel before any timing
step kernel-tests 150 "${PYTEST[@]}" -m cuda "${KERNEL_SELECT[@]}" "${KERNEL_TESTS[@]}"
step bench-optim 60 python3 benchmarks/bench_optim.py "${DRYFLAG[@]}"
step bench-linear8bit 70 python3 benchmarks/bench_linear8bit.py "${DRYFLAG[@]}"
step bench-blockwise 25 python3 benchmarks/bench_blockwise.py "${DRYFLAG[@]}"
step hf-tests 80 "${PYTEST[@]}" -m cuda "${HF_SELECT[@]}" "${HF_TESTS[@]}"
step e2e-lora-fp16 70 python3 benchmarks/e2e_lora.py --dtype fp16 "${DRYFLAG[@]}"
step e2e-full-finetune 60 python3 benchmarks/e2e_full_finetune.py "${DRYFLAG[@]}"
step distributed 50 python3 benchmarks/distributed_nccl.py --nproc 1 "${DRYFLAG[@]}"
step e2e-lora-bf16 50 python3 benchmarks/e2e_lora.py --dtype bf16 "${DRYFLAG[@]}"

{
    echo "## GPU session summary ($( ((DRY)) && echo 'dry run on the host device: no speed is measured' || python3 -c 'import torch; print(torch.cuda.get_device_name())'), ${SECONDS}s)"
    echo
    echo "| step | exit | seconds | tests |"
    echo "| --- | --- | --- | --- |"
    while IFS=$'\t' read -r name rc secs tests; do echo "| $name | $rc | $secs | $tests |"; done <"$STEPS"
    echo
    echo "| benchmark | measured | bar |"
    echo "| --- | --- | --- |"
    grep -h "^SUMMARY |" "$OUT"/step-*.log 2>/dev/null | sed 's/^SUMMARY //'
} >"$OUT/summary.md"
echo "### done t=${SECONDS}s"
cat "$OUT/summary.md"
save
# exit status: 0 when every step that ran exited 0
! awk -F'\t' '$2 != "0" && $2 != "skipped" {bad=1} END {exit !bad}' "$STEPS"
