"""Convergence of AdamW8bit against 32-bit AdamW: a small GPT trained from scratch on real text.

Text: the English documentation shipped with every CPython (``pydoc_data/topics.py``: the
language reference topics, ~0.75 MB), byte-level (vocabulary 256), last 10% held out.
Model: a pre-norm GPT (causal self-attention + GELU MLP, learned positions, tied
embeddings). Both runs use the same seed, initial weights, batch order and hyper-parameters
(AdamW, betas (0.9, 0.95), weight decay 0.1, linear warmup + cosine decay); the only
difference is the optimizer: ``torch.optim.AdamW`` (fp32 state) against
``optim8.AdamW8bit`` (8-bit state for every tensor >= 4096 elements; the embeddings too with
``--embedding-bits none``, else they keep fp32 state, optim8's default).

``--optimizer lion|sgd|rmsprop|adagrad|ademamix`` compares that optimizer's 32-bit and 8-bit
classes instead (same seed, weights, batches; its own default lr unless ``--lr``), writing
``convergence_<optimizer>.*``.

    python benchmarks/convergence.py            # CPU, ~15 min on 2 cores with the defaults
    python benchmarks/convergence.py --device cuda --steps 5000 --d-model 256 --layers 6

Writes ``benchmarks/results/convergence.md`` (+ ``.json`` with both curves) and
``convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import optim8

RESULTS = Path(__file__).resolve().parent / "results"


def load_text() -> bytes:
    import pydoc_data.topics as topics

    # the topic texts themselves, not the Python source around them
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, *, vocab: int, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 1))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.t()


def param_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --optimizer -> (32-bit class, 8-bit class, default lr, extra hyper-parameters)
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, optim8.AdamW8bit, 3e-3, dict(betas=(0.9, 0.95), eps=1e-8)),
    "lion": (optim8.Lion32bit, optim8.Lion8bit, 3e-4, dict(betas=(0.9, 0.99))),
    "sgd": (optim8.SGD32bit, optim8.SGD8bit, 0.3, dict(momentum=0.9, nesterov=True)),
    "rmsprop": (optim8.RMSprop32bit, optim8.RMSprop8bit, 1e-3, dict(alpha=0.99, eps=1e-8)),
    "adagrad": (optim8.Adagrad32bit, optim8.Adagrad8bit, 3e-2, dict(eps=1e-10)),
    "ademamix": (optim8.AdEMAMix32bit, optim8.AdEMAMix8bit, 3e-3, dict(betas=(0.9, 0.95, 0.999), alpha=5.0)),
}


def make_optimizer(name, args, groups):
    cls32, cls8, lr, hp = OPTIMIZERS[args.optimizer]
    hp = dict(hp, lr=args.lr if args.lr is not None else lr)
    if args.optimizer == "ademamix":  # the paper's warm-ups over the run
        hp.update(t_alpha=args.steps, t_beta3=args.steps)
    if name.endswith("32"):
        return cls32(groups, **hp)
    return cls8(groups, embedding_bits=None if args.embedding_bits == "none" else 32, **hp)


def train(name, args, data, device):
    torch.manual_seed(args.seed)
    model = GPT(vocab=256, d=args.d_model, layers=args.layers, heads=args.heads, context=args.context).to(device)
    groups = param_groups(model, args.weight_decay)
    opt = make_optimizer(name, args, groups)

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    train_data, eval_data = data
    batches = torch.Generator().manual_seed(args.seed + 1)
    eval_starts = torch.randint(0, len(eval_data) - args.context - 1, (args.eval_batches, args.batch), generator=torch.Generator().manual_seed(7))

    def batch_at(src, starts):
        x = torch.stack([src[s : s + args.context] for s in starts.tolist()])
        y = torch.stack([src[s + 1 : s + 1 + args.context] for s in starts.tolist()])
        return x.long().to(device), y.long().to(device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = 0.0
        for starts in eval_starts:
            x, y = batch_at(eval_data, starts)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.train()
        return total / len(eval_starts)

    curve = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
    start = time.perf_counter()
    smoothed = None
    for step in range(args.steps):
        starts = torch.randint(0, len(train_data) - args.context - 1, (args.batch,), generator=batches)
        x, y = batch_at(train_data, starts)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % 10 == 0:
            curve["step"].append(step)
            curve["train_loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve["eval_step"].append(step + 1)
            curve["eval_loss"].append(evaluate())
            print(f"{name} step {step + 1}: train(smoothed) {smoothed:.4f} eval {curve['eval_loss'][-1]:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    n_params = sum(p.numel() for p in model.parameters())
    return curve, {"seconds": time.perf_counter() - start, "state_bytes_per_param": state_bytes / n_params, "params": n_params}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    ap.add_argument("--embedding-bits", choices=("32", "none"), default="32",
                    help="8-bit runs: embeddings keep fp32 state (32, optim8's default) or follow optim_bits (none)")
    ap.add_argument("--lr", type=float, default=None, help="default: per optimizer (AdamW 3e-3)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    text = torch.frombuffer(bytearray(load_text()), dtype=torch.uint8)
    split = int(0.9 * len(text))
    data = (text[:split], text[split:])
    runs = {}
    o = args.optimizer
    n32, n8 = f"{o}32", f"{o}8"
    for name in (n32, n8):
        runs[name] = train(name, args, data, device)
    cls32, cls8 = OPTIMIZERS[o][:2]
    label32 = f"{cls32.__module__.split('.')[0]}.{cls32.__name__}"
    label8 = f"optim8.{cls8.__name__}" + (" (embeddings 8-bit too)" if args.embedding_bits == "none" else "")
    lr = args.lr if args.lr is not None else OPTIMIZERS[o][2]

    final32 = runs[n32][0]["eval_loss"][-1]
    final8 = runs[n8][0]["eval_loss"][-1]
    rel = (final8 - final32) / final32
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or ("cuda" if device.type == "cuda" else "")  # a GPU run keeps the CPU results
    stem = "convergence" + (f"_{o}" if o != "adamw" else "") + (f"_{tag}" if tag else "")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    record = {
        "config": vars(args),
        "device": where,
        "text_bytes": len(text),
        "final_eval_loss": {n32: final32, n8: final8},
        "relative_difference": rel,
        "runs": {k: {"curve": c, **info} for k, (c, info) in runs.items()},
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, label, color in ((n32, f"{label32} (32-bit state)", "tab:blue"), (n8, f"{label8} (8-bit state)", "tab:orange")):
        curve = runs[name][0]
        ax.plot(curve["step"], curve["train_loss"], color=color, alpha=0.3, lw=0.8)
        ax.plot(curve["eval_step"], curve["eval_loss"], color=color, marker="o", lw=2, label=f"{label}: eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.set_title(f"byte-level GPT on CPython's pydoc topics ({runs[n32][1]['params'] / 1e6:.2f}M params, {args.steps} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)

    lines = [
        f"# Convergence: {label8} vs {label32} ({where})",
        "",
        f"Byte-level GPT ({args.layers} layers, d={args.d_model}, {args.heads} heads, context {args.context}, "
        f"{runs[n32][1]['params']:,} parameters) trained from scratch on CPython's pydoc topics "
        f"({len(text):,} bytes, last 10% held out): {args.steps} steps of {args.batch}x{args.context} bytes, "
        f"lr {lr} (warmup {args.warmup}, cosine to 10%), {OPTIMIZERS[o][3]}, weight decay {args.weight_decay} "
        f"on matrices, grad clip 1.0, seed {args.seed}. Same initial weights and batches for both.",
        "",
        "| optimizer | final eval loss | state bytes/param | wall s |",
        "| --- | --- | --- | --- |",
    ]
    for name, label in ((n32, label32), (n8, label8)):
        curve, info = runs[name]
        lines.append(f"| {label} | {curve['eval_loss'][-1]:.4f} | {info['state_bytes_per_param']:.3f} | {info['seconds']:.0f} |")
    lines += ["", f"Relative difference of the final eval loss (8-bit - 32-bit) / 32-bit: {rel * 100:+.2f}% (bar: within 1%).", "",
              "Eval loss every {} steps:".format(args.eval_every), "", f"| step | {label32} | {label8} |", "| --- | --- | --- |"]
    for i, s in enumerate(runs[n32][0]["eval_step"]):
        lines.append(f"| {s} | {runs[n32][0]['eval_loss'][i]:.4f} | {runs[n8][0]['eval_loss'][i]:.4f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
