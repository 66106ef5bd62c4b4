"""The distributed tests' training on CUDA with NCCL, plus Trainer under FSDP2 (GPU only).

Runs the scenarios of ``tests/test_distributed.py`` (DDP, FSDP2 + torch.distributed.checkpoint
resume, peft LoRA over Linear8bitLt under DDP, Accelerate) with the NCCL backend, one process
per GPU (``--nproc``, default: every visible GPU), so on CUDA the 8-bit state of the DTensor
shards goes through the fused CuPy kernel. Each result is compared with a single-process run
of the same training on the same global batch on ``cuda:0``, with the CPU tests' tolerances,
and one more scenario runs only here: ``transformers.Trainer`` with FSDP2 and
``optimizer_cls_and_kwargs=(optim8.AdamW8bit, ...)``, saving a sharded (DCP) checkpoint
through Accelerate and resuming from it (Accelerate enables FSDP only on GPUs).

    python benchmarks/distributed_nccl.py                # all GPUs
    python benchmarks/distributed_nccl.py --nproc 1      # the 1-GPU NCCL run of the issue
    python benchmarks/distributed_nccl.py --dry-run      # gloo, 2 CPU processes: checks the script itself
    python benchmarks/distributed_nccl.py --dry-run --nproc 1

``--dry-run`` (alias ``--cpu-dry-run``): gloo on the CPU, every process (and the references)
with the host device active, so the CUDA kernels' own source runs on the CPU shards
(``benchmarks/_common.py``). Writes a markdown table to ``benchmarks/results/distributed_nccl.md``
(device named; a dry run writes under ``$OUT/dry-run/`` or a temporary folder), prints one
``SUMMARY`` line (checks within their bounds) and exits non-zero when a scenario fails or
exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common as C

ROOT = Path(__file__).resolve().parent.parent
HOST_DEVICE_ENV = "OPTIM8_BENCH_HOST_DEVICE"  # set for the workers of a dry run: host device active there too
_spec = importlib.util.spec_from_file_location("optim8_test_distributed", ROOT / "tests" / "test_distributed.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

TRAINER_STEPS = 6


def scenario_trainer_fsdp(rank, world, device, out: Path) -> None:
    """Trainer + FSDP2 + AdamW8bit via optimizer_cls_and_kwargs; checkpoint at step 3, resume, compare."""
    import transformers

    import optim8

    def model():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        )
        return transformers.LlamaForCausalLM(config)

    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):
        ids = (torch.arange(16) + int(torch.randint(0, 97, (1,), generator=gen))) % 97
        data.append({"input_ids": ids, "labels": ids.clone()})

    def trainer(output_dir):
        args = transformers.TrainingArguments(
            output_dir=str(output_dir), max_steps=TRAINER_STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
            logging_steps=1, report_to="none", save_strategy="steps", save_steps=TRAINER_STEPS // 2,
            disable_tqdm=True, seed=0, data_seed=0, use_cpu=device == "cpu",
            full_determinism=True,  # the resume is compared bit for bit with the uninterrupted run
            fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        )
        # Trainer refuses optimizers=(opt, sched) under FSDP; it builds ours from the class and kwargs.
        return transformers.Trainer(
            model=model(), args=args, train_dataset=data,
            optimizer_cls_and_kwargs=(optim8.AdamW8bit, {"lr": 5e-3, "min_8bit_size": 1024}),
        )

    first = trainer(out / "trainer")
    first.train()
    opt = first.optimizer.optimizer if hasattr(first.optimizer, "optimizer") else first.optimizer
    sharded = [p for g in opt.param_groups for p in g["params"] if hasattr(p, "device_mesh")]
    state8 = sum("exp_avg_absmax" in s for s in opt.state.values())
    uninterrupted = T.full_params(first.model)
    resumed_trainer = trainer(out / "trainer_resumed")
    resumed_trainer.train(resume_from_checkpoint=str(out / "trainer" / f"checkpoint-{TRAINER_STEPS // 2}"))
    resumed = T.full_params(resumed_trainer.model)
    if rank == 0:
        info = {
            "optimizer": type(opt).__name__,
            "fsdp_enabled": bool(first.is_fsdp_enabled),
            "dtensor_params": len(sharded),
            "params_with_8bit_state": state8,
            "losses": [h["loss"] for h in first.state.log_history if "loss" in h],
            "resume_max_diff": max((uninterrupted[n] - resumed[n]).abs().max().item() for n in uninterrupted),
        }
        (out / "trainer_fsdp.json").write_text(json.dumps(info))


T.SCENARIOS["trainer_fsdp"] = scenario_trainer_fsdp


def _row(name: str, diff: float, bound: float, note: str) -> tuple[str, float, float, bool, str]:
    return name, diff, bound, bool(diff <= bound), note


def compare(out: Path, world: int, ref_device: str) -> list[tuple]:
    """Distributed results against single-process runs on ``ref_device`` (the CPU tests' tolerances)."""
    ref = lambda name: T.single_process(name, ref_device)  # noqa: E731
    gap = max(T._max_diff(ref("mlp8"), ref("mlp32")).values())
    mx = lambda a, b: max(T._max_diff(a, b).values())  # noqa: E731
    rows = [_row("8-bit vs fp32 state, one process (the gap)", gap, math.inf, "scale of the 8-bit bounds")]
    load = lambda f: torch.load(out / f, weights_only=False)  # noqa: E731
    rows.append(_row("DDP, fp32 state", mx(load("ddp32.pt"), ref("mlp32")), T.FP32_TOL, "reduction order only"))
    rows.append(_row("DDP, 8-bit state", mx(load("ddp8.pt"), ref("mlp8")), 0.25 * gap, "code flips only"))
    rows.append(_row("FSDP2, fp32 state", mx(load("fsdp32.pt"), ref("mlp32")), T.FP32_TOL, ""))
    rows.append(_row("FSDP2, 8-bit, shard-aligned blocks", mx(load("fsdp8_aligned.pt"), ref("mlp8_aligned")), 0.25 * gap, ""))
    rows.append(_row("FSDP2, 8-bit, one unaligned weight", mx(load("fsdp.pt"), ref("mlp8")), 2 * gap,
                     "blocks follow shards" if world > 1 else "1 GPU: one shard, blocks as in one process"))
    rows.append(_row("FSDP2 DCP resume vs uninterrupted", mx(load("fsdp.pt"), load("fsdp_resumed.pt")), 0.0, "bit-exact"))
    lora = load("lora.pt")
    rows.append(_row("LoRA over int8, DDP", mx(lora["after"], lora["reference"]), T.FP32_TOL, "adapters only train"))
    acc = load("accelerate.pt")
    rows.append(_row("Accelerate prepare (DDP), 8-bit", mx(acc["params"], ref("mlp8")), 0.25 * gap, acc["info"]["distributed_type"]))
    rows.append(_row("Accelerate save_state/load_state resume", mx(acc["params"], acc["resumed"]), 0.0, "bit-exact"))
    trainer = out / "trainer_fsdp.json"
    if trainer.exists():
        info = json.loads(trainer.read_text())
        ok = info["optimizer"] == "AdamW8bit" and info["params_with_8bit_state"] > 0
        note = f"fsdp={info['fsdp_enabled']} DTensor params={info['dtensor_params']} 8-bit={info['params_with_8bit_state']}"
        if ref_device == "cpu":  # Accelerate enables FSDP only on accelerators: on CPU this Trainer runs DDP
            note += " (CPU: Accelerate runs DDP, not FSDP)"
        else:
            ok = ok and info["fsdp_enabled"] and info["dtensor_params"] > 0
        rows.append(("Trainer + FSDP2 checkpoint resume", info["resume_max_diff"], 0.0, ok and info["resume_max_diff"] == 0.0, note))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=None, help="processes (one GPU each); default: all visible GPUs")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/distributed_nccl.md")
    parser.add_argument("--no-trainer", action="store_true", help="skip the Trainer + FSDP2 scenario")
    parser.add_argument(
        "--dry-run", "--cpu-dry-run", dest="dry_run", action="store_true",
        help="gloo on CPU (default 2 processes), optim8's CUDA kernels on the host device: checks this script, not the GPU",
    )
    args = parser.parse_args()
    if args.dry_run:
        world, backend, device, ref_device = args.nproc or 2, "gloo", "cpu", "cpu"
    else:
        if not torch.cuda.is_available():
            print("distributed_nccl.py needs CUDA GPUs (the CPU version is tests/test_distributed.py)", file=sys.stderr)
            return 2
        world, backend, device, ref_device = args.nproc or torch.cuda.device_count(), "nccl", "cuda", "cuda:0"
        if world > torch.cuda.device_count():
            print(f"--nproc {world} but only {torch.cuda.device_count()} GPUs are visible", file=sys.stderr)
            return 2
    # cuBLAS reads this when a process first uses it: deterministic GEMMs for the bit-exact resumes
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.dry_run:
        os.environ[HOST_DEVICE_ENV] = "1"
    with C.session(args.dry_run):
        return run(args, world, backend, device, ref_device)


def run(args, world, backend, device, ref_device) -> int:
    names = list(T.SCENARIOS) if not args.no_trainer else [n for n in T.SCENARIOS if n != "trainer_fsdp"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        report = T.launch(out, names, world=world, backend=backend, device=device, script=__file__, timeout_s=240)
        seconds = time.perf_counter() - start
        failed = {n: r["error"] for n, r in report.items() if not r["ok"]}
        for name, error in failed.items():
            print(f"--- scenario {name} failed:\n{error}", file=sys.stderr)
        needed = {"ddp", "fsdp", "lora", "accelerate"}
        rows = compare(out, world, ref_device) if not needed & failed.keys() else []
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU, host device (dry run)"
    lines = [
        f"# optim8 distributed: {backend} on {world} x {name}",
        "",
        f"torch {torch.__version__}, {world} process(es), backend {backend}; single-process references on {ref_device}; "
        f"{T.STEPS} steps at lr {T.LR}, global batch {T.GLOBAL_BATCH}. Workers ran {seconds:.1f} s.",
        "",
        "| check | max abs diff | bound | ok | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {diff:.3g} | {bound:.3g} | {'yes' if ok else 'NO'} | {note} |" for name, diff, bound, ok, note in rows]
    lines += [f"| scenario {name} | - | - | NO | failed: {error.strip().splitlines()[-1]} |" for name, error in failed.items()]
    C.write_report(lines, C.report_path(args.out, "distributed_nccl.md"))
    ok = sum(r[3] for r in rows)
    C.summary(
        f"distributed {backend} {world} x {'GPU' if device == 'cuda' else 'CPU'}: checks within bounds",
        f"{ok}/{len(rows)}" + (f", {len(failed)} scenario(s) failed" if failed else ""),
        "all",
    )
    return 0 if rows and all(r[3] for r in rows) and not failed else 1


if __name__ == "__main__":
    if "RANK" in os.environ and "--out" in sys.argv and "--backend" in sys.argv:  # a worker started by T.launch
        parser = argparse.ArgumentParser()
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--backend", default="nccl")
        parser.add_argument("--device", default="cuda")
        parser.add_argument("scenarios", nargs="+", choices=sorted(T.SCENARIOS))
        worker_args = parser.parse_args()
        with C.session(os.environ.get(HOST_DEVICE_ENV) == "1" and worker_args.device == "cpu"):
            T.worker(worker_args.out, worker_args.scenarios, backend=worker_args.backend, device=worker_args.device)
        T.exit_without_finalization()
    else:
        sys.exit(main())
