#!/usr/bin/env python3
"""Static performance report of optim8's CUDA kernels (sm_90 SASS; no GPU needed).

For every kernel instantiation the wrappers launch (``optim8.kernels._launch.SOURCES``),
compiled by the production compile step (``optim8.kernels._nvrtc.compile``, the options of
``_launch.NVRTC_OPTIONS``) for sm_90, this reports registers per thread, spills, static
shared memory, theoretical occupancy at the block size the wrapper launches with, and SASS
instructions per element on the hot path, checks the budgets of issue 12, and predicts the
blockwise (de)quantizers' fraction of copy bandwidth on an H200 (``copy_fraction``).

    python benchmarks/kernel_report.py            # writes benchmarks/results/kernel_report.md
    python benchmarks/kernel_report.py --check    # exit 1 when a budgeted kernel is over budget

Needs NVRTC (``nvidia-cuda-nvrtc``), ``cuobjdump`` and ``nvdisasm`` (the CUDA toolkit, or the
``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels of the ``dev`` extra); exits 2 with
a message naming what is missing otherwise. See ``METHOD`` below (also written into the
report) for how instructions per element are counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kernel_report.md"
ARCH = "sm_90"

# sm_90 (H100/H200) occupancy limits.
SM90 = dict(
    regs_per_sm=65536,
    reg_alloc_unit=256,  # registers, per warp
    sub_partitions=4,  # the register file is split across the 4 schedulers
    max_warps=64,
    max_ctas=32,
    smem_per_sm=228 * 1024,
    smem_per_cta=227 * 1024,
    smem_reserved_per_cta=1024,
    smem_alloc_unit=128,
)

# Budgets of issue 12: SASS instructions per parameter on the hot path.
BUDGETS = {("adam_multi", "state8", "float"): 100, ("adam_multi", "state8", "bf16"): 80}
# Tensors per step that the adam_multi hot path assumes for its per-chunk tensor lookup
# (TinyLlama-1.1B: 201 parameter tensors, the step benchmarked in DESIGN.md).
DEFAULT_TENSORS = 201

METHOD = """\
How instructions per element are counted:

* **static**: the instructions of the hot loop's body in the disassembly (`nvdisasm -c`): a loop
  is found by its backward branch (a `BRA` to an earlier address; jumps back from out-of-line
  cold blocks, which cross an enclosing loop's boundary, are not loops), its body is every
  instruction from the branch target to the branch. Kernels without a hot loop count their
  whole body (every instruction of the function, out-of-line slow-path subroutines excluded).
  The count is divided by the elements one thread handles per iteration (per launch for a
  loop-free kernel), where the compiler's unrolling is read from the loop body (how many
  element loads or stores it holds). Both sides of every branch inside the loop are counted,
  so a loop that keeps a scalar fallback next to its vectorized path counts both.
* **common path** (the number the budgets use): the instructions one warp issues per
  iteration along the common path, found by walking the control flow from the loop head to
  its back edge: the vectorized path (every lane in bounds, aligned tensors), all values
  finite (a branch on an `FSETP` against ±3.4028e38 / `NAN` goes the finite way), no
  slow-path subroutine (`CALL` to the division / square-root / reciprocal fallbacks). Any
  other two-way branch: both sides are walked to where they reconverge and the side that
  moves more bytes per instruction wins (the vectorized access over the bounds-checked
  scalar one, a store over skipping it: `if (base < n)` holds, and a store that one lane in 8
  makes, a block's absmax, is issued by the warp); with no memory access on either side the
  side that does the work (`a > 0`: the reciprocal is computed). Inner loops run their
  expected trip count: the per-chunk tensor lookup (a loop with a global load: update_multi)
  `ceil(log2(tensors))` iterations (TENSORS tensors per step; `--tensors 1` removes it), the
  LUT encoder's walk (a loop over shared memory only) just its one test (no boundary inside
  the cell); a branch that skips an inner loop enters it (for int8_epilogue, with no outlier
  columns, skips it). A `BRA.DIV` (to the out-of-line fallback of a warp shuffle, taken only
  by a diverged warp) is not taken. `--explain EXPR` prints every decision. Divided by the
  elements per lane per iteration (8 for adam_multi: a 256-element chunk per warp).
* adam_multi's hot loop is the loop over a warp's chunks of one tensor (the innermost loop
  with the vectorized element loads): each warp carries its tensor, and the loop around it
  (once per tensor a warp reaches: a binary search from the current tensor and the read of
  its table row) is not counted.
* Element, per kernel: adam_multi one parameter; quantize/dequantize_blockwise one element of
  x (their hot loop: the grid-stride loop, 8 elements per lane per step; quantize has one per
  map, signed and unsigned, and its row counts the larger); outlier_columns and quantize_rows one element of the activation x; select_outliers one
  column flag; gather_outlier_weights and dequantize_rows one weight element; int8_epilogue
  one output element (no outlier columns); gemv_int8 one weight element (per token tile of MT
  tokens: each weight is multiplied by MT tokens).
* A kernel this report has no model of yet (added after it was written) still gets its row:
  resources, occupancy at an assumed 256 threads (marked `?`), and the static size of its
  largest loop (or whole body), with no per-element figure until `ELEMENT`, `block_size` and
  `analyze` in `benchmarks/kernel_report.py` learn it.
* Occupancy (theoretical, sm_90): registers allocated per warp in units of 256, the register
  file split across 4 sub-partitions (65536 per SM), at most 64 warps and 32 CTAs per SM,
  228 KiB shared memory per SM with 1 KiB reserved per CTA (allocated in units of 128 B), at
  the block size the wrapper launches with. `SHARED` as cuobjdump prints it includes that
  reserved KiB where a kernel declares shared memory; the table shows the kernel's own
  `__shared__` bytes.
* Spills: local memory per thread (`LOCAL` / `STACK` of `cuobjdump --dump-resource-usage`)
  and the `STL`/`LDL` instructions in the SASS.
"""


# --------------------------------------------------------------------------- tools


class Missing(RuntimeError):
    """A tool the report needs is not installed."""


def tool_candidates(name: str) -> list[str]:
    """Paths of ``name``: PATH, the nvidia wheels' bin folders on sys.path, $CUDA_HOME/bin."""
    found = []
    on_path = shutil.which(name)
    if on_path:
        found.append(on_path)
    for entry in sys.path:
        for sub in ("nvidia/cu13/bin", "nvidia/cu12/bin", "nvidia/cuda_cuobjdump/bin", "nvidia/cuda_nvdisasm/bin"):
            p = os.path.join(entry or ".", sub, name)
            if os.access(p, os.X_OK):
                found.append(p)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            found.append(os.path.join(os.environ[env], "bin", name))
    found += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    out = []
    for p in found:
        if os.access(p, os.X_OK) and os.path.realpath(p) not in [os.path.realpath(q) for q in out]:
            out.append(p)
    return out


def run_tool(name: str, args: list[str]) -> str:
    """stdout of the first ``name`` that runs ``args`` successfully (an older toolkit first on
    PATH may not read a newer NVRTC's cubin; the next candidate is tried)."""
    errors = []
    for exe in tool_candidates(name):
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout
        errors.append(f"{exe}: {proc.stderr.strip()[:300]}")
    if not errors:
        raise Missing(
            f"{name} not found (PATH, the nvidia wheels on sys.path, $CUDA_HOME/bin); install the CUDA "
            f"toolkit or pip install 'nvidia-cuda-{name}>=13' (the dev extra)"
        )
    raise RuntimeError(f"{name} {' '.join(args)} failed: " + "; ".join(errors))


def check_tools() -> None:
    """``Missing`` naming every absent tool."""
    from optim8.kernels import _nvrtc

    missing = []
    if not _nvrtc.available():
        missing.append("NVRTC (pip install 'nvidia-cuda-nvrtc>=13')")
    for t in ("cuobjdump", "nvdisasm"):
        if not tool_candidates(t):
            missing.append(f"{t} (the CUDA toolkit, or pip install 'nvidia-cuda-{t}>=13')")
    if missing:
        raise Missing("kernel report skipped, missing: " + ", ".join(missing))


# --------------------------------------------------------------------------- compile


def compile_all(cache_dir: Path | None) -> dict[str, tuple[Path, dict]]:
    """Every registered source compiled for sm_90: file name -> (cubin path, lowered names)."""
    import optim8  # noqa: F401 - imports the kernel modules, which fill SOURCES
    from optim8.kernels import _launch, _nvrtc

    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="optim8-kernel-report-"))
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, exprs in sorted(_launch.SOURCES.items()):
        text = _launch.source(name)
        key = hashlib.sha256(
            json.dumps([text, list(exprs), list(_nvrtc.options_for(ARCH)), list(_nvrtc.version())]).encode()
        ).hexdigest()[:20]
        cubin, names = cache / f"{name}.{key}.cubin", cache / f"{name}.{key}.json"
        if not (cubin.exists() and names.exists()):
            compiled = _nvrtc.compile(text, name, exprs, ARCH)
            assert compiled.kind == "cubin"
            tmp = cubin.with_suffix(".tmp")
            tmp.write_bytes(compiled.binary)
            names.write_text(json.dumps(compiled.lowered))
            tmp.replace(cubin)
        out[name] = (cubin, json.loads(names.read_text()))
    return out


# --------------------------------------------------------------------------- parsing


def resource_usage(cubin: Path) -> dict[str, dict[str, int]]:
    """mangled name -> {REG, STACK, SHARED, LOCAL, ...} from cuobjdump --dump-resource-usage."""
    text = run_tool("cuobjdump", ["--dump-resource-usage", str(cubin)])
    usage, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return usage


@dataclasses.dataclass
class Ins:
    addr: int
    text: str  # without the guard
    guard: str | None  # "P0", "!P3", ... or None
    op: str  # opcode with modifiers, e.g. "LDG.E.128"
    target: int | None = None  # branch target address


@dataclasses.dataclass
class Function:
    name: str
    ins: list[Ins]
    labels: dict[str, int]
    end: int  # index one past the kernel's own code (subroutines follow it)

    def index(self, addr: int) -> int:
        return self._index[addr]

    def __post_init__(self):
        self._index = {x.addr: i for i, x in enumerate(self.ins)}


def disassemble(cubin: Path) -> dict[str, Function]:
    text = run_tool("nvdisasm", ["-c", str(cubin)])
    parts = re.split(r"//-+ \.text\.(\S+) -+\n", text)
    funcs = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        ins, labels, pending, raw_targets, sub_start = [], {}, [], [], None
        for line in body.splitlines():
            m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$", line)
            if m:
                addr, t = int(m.group(1), 16), m.group(2)
                for lb in pending:
                    labels[lb] = addr
                    if lb.startswith("$") and sub_start is None:
                        sub_start = len(ins)
                pending = []
                g = re.match(r"@(!?U?P[T0-9]+)\s+(.*)", t)
                guard, t = (g.group(1), g.group(2)) if g else (None, t)
                tm = re.search(r"`\(([^)]+)\)", t)
                raw_targets.append(tm.group(1) if tm and t.startswith(("BRA", "CALL")) else None)
                ins.append(Ins(addr, t, guard, t.split()[0]))
                continue
            lm = re.match(r"^\s*(\.L_x_\d+|\$[^:\s]+):", line)
            if lm:
                pending.append(lm.group(1))
        for x, lb in zip(ins, raw_targets):
            if lb is not None:
                x.target = labels.get(lb)
        end = sub_start if sub_start is not None else len(ins)
        # trailing padding: the self-branch trap and NOPs after the last EXIT
        while end > 0 and (ins[end - 1].op == "NOP" or (ins[end - 1].op == "BRA" and ins[end - 1].target == ins[end - 1].addr)):
            end -= 1
        funcs[name] = Function(name, ins, labels, end)
    return funcs


def loops(fn: Function) -> list[tuple[int, int]]:
    """(head index, back-edge index) of every loop, properly nested, outermost first."""
    cands = []
    for i, x in enumerate(fn.ins[: fn.end]):
        if x.op.startswith("BRA") and x.target is not None and x.target < x.addr:
            cands.append((fn.index(x.target), i))
    cands.sort(key=lambda s: s[1] - s[0], reverse=True)
    accepted = []
    for h, b in cands:
        if all(b < h2 or h > b2 or (h2 <= h and b <= b2) or (h <= h2 and b2 <= b) for h2, b2 in accepted):
            accepted.append((h, b))
    return accepted


# --------------------------------------------------------------------------- common path

_FINITE_TEST = re.compile(r"^FSETP\.(NAN|GTU|GT|GEU|NEU)\b.*(3\.40282346638528859812e\+38|\+INF|INF)|^FSETP\.NAN\b")


def _pred_def(fn: Function, i: int, pred: str) -> Ins | None:
    """The latest instruction before index i (straight-line) that writes predicate ``pred``."""
    for j in range(i - 1, max(-1, i - 200), -1):
        x = fn.ins[j]
        dests = x.text.split(None, 1)[1].split(",")[0].strip() if " " in x.text else ""
        if x.op.startswith(("FSETP", "ISETP", "PLOP3", "LOP3", "DSETP", "HSETP", "R2P", "FCHK", "VOTE")) and dests == pred:
            return x
    return None


def _finite_guard(fn: Function, i: int) -> bool | None:
    """For a branch at i guarded by a non-finite test (FSETP against FLT_MAX / NaN): the value
    of its guard predicate on finite data (False), else None."""
    x = fn.ins[i]
    if x.guard is None or "BRA" not in x.op or re.search(r"BRA\s+!?P\d", x.text):
        return None
    pred = x.guard.lstrip("!")
    d = _pred_def(fn, i, pred)
    if d is not None and _FINITE_TEST.search(d.text):
        return False
    return None


def access_bytes(x: Ins) -> int:
    """Bytes one lane moves with a global/shared/local load or store (0 for anything else)."""
    if not re.match(r"(LDG|STG|LDS|STS|LD|ST|LDL|STL)(\.|$)", x.op):
        return 0
    for suffix, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in x.op:
            return n
    return 4


@dataclasses.dataclass
class Walk:
    count: int = 0
    bytes: int = 0  # bytes moved by the global and shared memory accesses on the path
    stores: int = 0  # global stores on the path
    decisions: list = dataclasses.field(default_factory=list)


def common_path(fn: Function, head: int, back: int, tensors: int, explain: bool = False, enter_loops: bool = True) -> Walk:
    """Instructions one warp issues per iteration of the loop (head..back) on the common path.

    ``enter_loops=False``: a branch that skips an inner loop skips it (int8_epilogue without
    outlier columns).
    """
    inner = [(h, b) for h, b in loops(fn) if head <= h and b <= back and (h, b) != (head, back)]

    def trips(h: int, b: int) -> int:
        body = fn.ins[h : b + 1]
        if any(x.op.startswith("LDG") for x in body):
            return max(1, math.ceil(math.log2(max(tensors, 2))))  # the tensor lookup's binary search
        return 1  # the encoder's walk: its test, once

    def innermost(i: int):
        best = None
        for h, b in inner:
            if h <= i <= b and (best is None or b - h < best[1] - best[0]):
                best = (h, b)
        return best

    def has_call(i0: int) -> bool:
        for x in fn.ins[i0 : min(len(fn.ins), i0 + 64)]:
            if x.op.startswith("CALL"):
                return True
            if x.op.startswith(("BRA", "EXIT", "RET")) and x.guard is None:
                return False
            if x.op.startswith("BRA"):
                return False
        return False

    def skips_loop(i: int, t: int) -> bool:
        return any(i < h and b < t for h, b in inner)

    def walk(i: int, stop: set[int], depth: int, w: Walk, iters: dict) -> int | None:
        """Walk from index i until an index in ``stop``; returns it (None: function exit)."""
        steps = 0
        while i not in stop:
            steps += 1
            if steps > 200000:
                raise RuntimeError(f"{fn.name}: the common-path walk does not terminate")
            x = fn.ins[i]
            w.count += 1
            w.bytes += access_bytes(x)
            w.stores += x.op.startswith("STG")
            if x.op.startswith("EXIT") and x.guard is None:
                return None
            if x.op.startswith("RET"):
                return None
            if not x.op.startswith("BRA") or x.target is None:
                i += 1
                continue
            if x.op.startswith("BRA.DIV"):
                # taken only by a diverged warp (to the out-of-line fallback of a warp
                # collective); the common path's warp is converged
                if explain:
                    w.decisions.append(f"{x.addr:#06x} {x.text}: not taken (converged warp)")
                i += 1
                continue
            t = fn.index(x.target)
            conditional = x.guard is not None or re.match(r"BRA(\.\S+)?\s+!?P\d", x.text)
            if not conditional:
                i = t
                continue
            loop = next(((h, b) for h, b in inner if b == i), None)
            if loop is not None:  # an inner loop's back edge
                iters[loop] = iters.get(loop, 0) + 1
                if iters[loop] < trips(*loop):
                    i = t
                else:
                    iters[loop] = 0
                    i += 1
                continue
            cur = innermost(i)
            if cur is not None and not (cur[0] <= t <= cur[1]):  # an exit from an inner loop
                taken = iters.get(cur, 0) + 1 >= trips(*cur)
                if taken:
                    iters[cur] = 0
                why = "inner-loop exit"
            elif has_call(i + 1) and not has_call(t):
                taken, why = True, "avoid slow path"
            elif has_call(t) and not has_call(i + 1):
                taken, why = False, "avoid slow path"
            elif (v := _finite_guard(fn, i)) is not None:
                taken = (not v) if x.guard.startswith("!") else v
                why = "finite"
            elif t > i and skips_loop(i, t):
                taken, why = (False, "enter loop") if enter_loops else (True, "skip loop")
            else:
                # walk both sides to where they reconverge (the first index both reach: the
                # BSYNC of the enclosing BSSY, or the join after an else) and take the side
                # that moves more bytes per instruction (the vectorized access over the
                # bounds-checked scalar one, the store over skipping it); with no memory
                # access on either side, the side that does the work (the longer one)
                join = _join(_trial(i + 1), _trial(t))
                ca, cb = _cost(i + 1, join, depth, iters), _cost(t, join, depth, iters)
                sa, sb = ca.bytes / max(ca.count, 1), cb.bytes / max(cb.count, 1)
                taken = sb > sa or (sb == sa and cb.count > ca.count)
                why = f"{ca.count} ins / {ca.bytes} B not taken vs {cb.count} ins / {cb.bytes} B taken"
            if explain:
                w.decisions.append(f"{x.addr:#06x} {x.guard or ''} {x.text}: {'taken' if taken else 'not taken'} ({why})")
            i = t if taken else i + 1
        return i

    def _trial(i: int) -> list[int]:
        # indexes reached by straight-line + unconditional flow from i, up to the back edge
        seen, order = set(), []
        j = i
        for _ in range(4000):
            if j in seen or j > back or j < head or j >= fn.end:
                break
            seen.add(j)
            order.append(j)
            x = fn.ins[j]
            if x.op.startswith("BRA") and x.target is not None and x.guard is None and not re.match(r"BRA\s+!?P\d", x.text):
                j = fn.index(x.target)
            elif x.op.startswith(("EXIT", "RET")) and x.guard is None:
                break
            else:
                j += 1
        return order

    def _join(a: list[int], b: list[int]) -> int:
        sb = set(b)
        for j in a:
            if j in sb:
                return j
        return back

    def _cost(i: int, join: int, depth: int, iters: dict) -> Walk:
        w2 = Walk()
        if depth > 8:
            w2.count = abs(join - i)
            return w2
        walk(i, {join, back}, depth + 1, w2, dict(iters))
        return w2

    w = Walk()
    walk(head, {back}, 0, w, {})
    w.count += 1  # the back edge itself
    return w


# --------------------------------------------------------------------------- kernels

# What one thread handles per loop iteration (or per launch), per kernel.
ELEMENT = {
    "adam_multi": "parameter",
    "update_multi": "parameter",
    "quantize_blockwise": "element of x",
    "dequantize_blockwise": "element",
    "outlier_columns": "element of x",
    "select_outliers": "column flag",
    "quantize_rows": "element of x",
    "gather_outlier_weights": "weight element",
    "int8_epilogue": "output element",
    "dequantize_rows": "weight element",
    "gemv_int8": "weight element",
}


def parse_expr(expr: str) -> tuple[str, list[str]]:
    m = re.match(r"(\w+)(?:<(.*)>)?$", expr)
    return m.group(1), [a.strip() for a in m.group(2).split(",")] if m.group(2) else []


def block_size(kernel: str, args: list[str]) -> int:
    """Threads per CTA the wrapper launches ``kernel<args>`` with (kernels/*.py)."""
    if kernel == "quantize_blockwise":
        return 1024  # blockwise.py: _quantize_cuda (_QUANTIZE_THREADS)
    if kernel == "select_outliers":
        return 1024  # int8.py: _quantize_activations_cuda
    return 256  # adam.py _step_cuda, blockwise.py _dequantize_cuda, every other int8.py kernel
    # (a kernel without a model here: 256 assumed, marked in the table)


def occupancy(regs: int, smem_own: int, threads: int) -> dict:
    a = SM90
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // a["reg_alloc_unit"]) * a["reg_alloc_unit"]
    warps_by_regs = (a["regs_per_sm"] // a["sub_partitions"] // regs_per_warp) * a["sub_partitions"]
    by_regs = warps_by_regs // warps
    smem = -(-(smem_own + a["smem_reserved_per_cta"]) // a["smem_alloc_unit"]) * a["smem_alloc_unit"]
    by_smem = a["smem_per_sm"] // smem if smem_own <= a["smem_per_cta"] else 0
    by_warps = a["max_warps"] // warps
    ctas = min(by_regs, by_smem, by_warps, a["max_ctas"])
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "CTAs": a["max_ctas"]}
    limiter = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    return {"ctas": ctas, "warps": ctas * warps, "occupancy": ctas * warps / a["max_warps"], "limiter": limiter}


def _stream_count(body: list[Ins], pattern: str) -> int:
    return sum(1 for x in body if re.match(pattern, x.op))


def analyze(kernel: str, args: list[str], fn: Function, tensors: int, explain: bool) -> dict:
    """Hot-path instruction counts: static body, common path, elements per iteration."""
    ls = loops(fn)
    body_all = fn.ins[: fn.end]
    note, common, decisions = "", None, []

    def span(lp):
        return fn.ins[lp[0] : lp[1] + 1]

    def innermost_with(pattern: str):
        # the largest (main, unrolled) of the loops holding `pattern` ops and no nested such loop
        cands = [lp for lp in ls if _stream_count(span(lp), pattern)]
        leaves = [lp for lp in cands if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in cands)]
        return max(leaves, key=lambda lp: _stream_count(span(lp), pattern)) if leaves else None

    if kernel in ("adam_multi", "update_multi"):  # the same grid-stride machinery (update.cuh mirrors adam.cu)
        hot = max(ls, key=lambda lp: lp[1] - lp[0])
        if kernel == "adam_multi":
            # each warp carries its tensor: an outer loop per tensor (finding it, reading its
            # row) around the loop over the warp's chunks of it, the hot loop (the innermost
            # one with the vectorized element loads)
            hot = innermost_with(r"LDG\.E\.128") or hot
        per_iter = 8  # a 256-element chunk per warp: 8 parameters per lane
        static = len(span(hot))
        w = common_path(fn, hot[0], hot[1], tensors, explain)
        common, decisions = w.count, w.decisions
        where = "grid-stride loop (one chunk)"
    elif kernel in ("quantize_blockwise", "dequantize_blockwise"):
        # the grid-stride loops: the outermost loops holding the vectorized access (16-byte
        # loads of x; 8-byte loads of 8 codes). quantize_blockwise has one per map (the map is
        # a launch argument; the signed loop is the one with extreme_key's rotate, SHF.L.W):
        # the row's common path is the larger of the two, both are named in `where`
        per_iter = 8  # elements per lane per step
        vec = (r"LDG\.E\.128", r"STG\.E\.64") if kernel == "quantize_blockwise" else (r"LDG\.E\.64", r"STG")
        outer = [lp for lp in ls if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in ls)]
        hot_loops = [lp for lp in outer if all(_stream_count(span(lp), p) for p in vec)]
        if not hot_loops:
            raise RuntimeError(f"{kernel}: no grid-stride loop with a vectorized access")
        walks = {lp: common_path(fn, lp[0], lp[1], tensors, explain) for lp in hot_loops}
        worst = max(hot_loops, key=lambda lp: walks[lp].count)
        static = max(len(span(lp)) for lp in hot_loops)
        common, decisions = walks[worst].count, walks[worst].decisions
        if kernel == "quantize_blockwise":
            per_map = {("signed" if _stream_count(span(lp), r"SHF\.L\.W") else "unsigned"): walks[lp].count / per_iter for lp in hot_loops}
            where = "grid-stride loop, 8 elem/lane (common path: " + ", ".join(f"{k} map {v:.1f}" for k, v in sorted(per_map.items())) + ")"
        else:
            where = "grid-stride loop, 8 elem/lane"
    elif kernel == "gemv_int8":
        mt, r = int(args[1]), int(args[2])
        hot = max(ls, key=lambda lp: lp[1] - lp[0])  # the loop over K tiles of 512
        per_iter = 16 * r  # 16 weights of each of the warp's R rows per lane
        static = len(span(hot))
        where = f"K-tile loop (x staging included; {mt} token(s), {r} rows per warp)"
    elif kernel == "quantize_rows":
        # the vectorized passes: amax (16-byte loads, no 8-byte code store) and quantize
        # (16-byte loads and one 8-byte store of 8 codes)
        vec = [lp for lp in ls if _stream_count(span(lp), r"LDG\.E\.128")]
        p1 = [lp for lp in vec if not _stream_count(span(lp), r"STG\.E\.64")]
        p2 = [lp for lp in vec if _stream_count(span(lp), r"STG\.E\.64")]
        if not p1 or not p2:
            raise RuntimeError("quantize_rows: the vectorized loops were not found")
        loads_per8 = 2 if args[0] == "float" else 1
        a1 = max(p1, key=lambda lp: lp[1] - lp[0])  # the version with outlier slots
        a2 = max(p2, key=lambda lp: lp[1] - lp[0])
        e1 = 8 * _stream_count(span(a1), r"LDG\.E\.128") // loads_per8
        e2 = 8 * _stream_count(span(a2), r"STG\.E\.64")
        static = len(span(a1)) * 8 / e1 + len(span(a2)) * 8 / e2  # per 8 elements
        per_iter = 8
        where = f"vectorized amax pass ({e1} elem/iter) + quantize pass ({e2} elem/iter), with outlier slots"
    elif kernel not in ELEMENT:
        # a kernel this report has no model of yet: its largest loop (or its whole body),
        # one element per global store
        if ls:
            hot = max(ls, key=lambda lp: lp[1] - lp[0])
            static, where = len(span(hot)), "largest loop (generic: no model of this kernel)"
        else:
            static, where = len(body_all), "whole body (generic: no model of this kernel)"
        per_iter = None  # what an element is: unknown until the kernel gets a model here
    else:
        pattern = {
            "outlier_columns": r"LDG",
            "select_outliers": r"LDG",
            "gather_outlier_weights": r"STG",
            "int8_epilogue": r"STG",
            "dequantize_rows": r"STG",
        }[kernel]
        hot = innermost_with(pattern)
        if kernel == "int8_epilogue":
            # the loop over columns n; its nested outlier loop (j) holds no store
            hot = min((lp for lp in ls if _stream_count(span(lp), r"STG") and any(
                o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in ls)), key=lambda lp: lp[1] - lp[0], default=hot)
        per_iter = _stream_count(span(hot), pattern)
        static = len(span(hot))
        where = {
            "outlier_columns": "row loop (unrolled)",
            "select_outliers": "loop over 1024-column slices",
            "gather_outlier_weights": "loop over outlier columns (unrolled)",
            "int8_epilogue": "column loop (no outlier columns)",
            "dequantize_rows": "column loop (unrolled)",
        }[kernel]
        if kernel == "int8_epilogue":
            # without outlier columns (count 0): the loop over columns n, its outlier loop
            # skipped; where the compiler made a version of it without the outlier loop, that one
            cands = [lp for lp in ls if _stream_count(span(lp), r"STG")]
            flat = [lp for lp in cands if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in ls)]
            hot = max(flat, key=lambda lp: _stream_count(span(lp), r"STG")) if flat else min(cands, key=lambda lp: lp[1] - lp[0])
            static = len(span(hot))
            w = common_path(fn, hot[0], hot[1], tensors, explain, enter_loops=False)
            common, decisions = w.count, w.decisions
            per_iter = max(w.stores, 1)
        if per_iter == 0:
            raise RuntimeError(f"{kernel}: no element access in the hot loop")
    return dict(
        static=static,
        per_iter=per_iter,
        static_per=None if per_iter is None else static / per_iter,
        common_per=None if common is None else common / per_iter,
        where=where,
        decisions=decisions,
    )


def spill_instructions(fn: Function) -> int:
    return sum(1 for x in fn.ins[: len(fn.ins)] if x.op.startswith(("STL", "LDL")))


def build(cache_dir: Path | None = None, tensors: int = DEFAULT_TENSORS, explain: str | None = None) -> list[dict]:
    rows = []
    for name, (cubin, lowered) in compile_all(cache_dir).items():
        usage = resource_usage(cubin)
        funcs = disassemble(cubin)
        for expr, mangled in lowered.items():
            kernel, args = parse_expr(expr)
            u, fn = usage[mangled], funcs[mangled]
            smem_own = max(0, u.get("SHARED", 0) - SM90["smem_reserved_per_cta"]) if u.get("SHARED", 0) else 0
            threads = block_size(kernel, args)
            occ = occupancy(u["REG"], smem_own, threads)
            hot = analyze(kernel, args, fn, tensors, explain is not None and explain in expr)
            budget = None
            if kernel == "adam_multi" and args[1] == "true":
                budget = BUDGETS.get(("adam_multi", "state8", args[0]))
            measured = hot["common_per"] if hot["common_per"] is not None else hot["static_per"]
            rows.append(
                dict(
                    file=name,
                    expr=expr,
                    kernel=kernel,
                    args=args,
                    mangled=mangled,
                    regs=u["REG"],
                    local=u.get("LOCAL", 0),
                    stack=u.get("STACK", 0),
                    spill_ins=spill_instructions(fn),
                    smem=smem_own,
                    threads=threads,
                    **occ,
                    **hot,
                    element=ELEMENT.get(kernel, "— (no model)"),
                    modeled=kernel in ELEMENT,
                    budget=budget,
                    ok=None if budget is None else measured <= budget,
                )
            )
    return rows


# --------------------------------------------------------------------------- copy-bandwidth model

# The blockwise kernels are streaming: their speed bar (issue 12) is a fraction of a device-to-device
# copy's bandwidth (benchmarks/bench_blockwise.py measures it). Predicted here from the SASS above,
# per SM and per element, as the largest of three times (a roofline: the three overlap at best):
#   memory: bytes per element at the copy's bandwidth, shared by all SMs
#   issue:  common-path SASS per element / 128 (4 schedulers x 32 lanes issue per clock)
#   shared: LDS wavefronts per element (one 128-byte wavefront per clock per SM), simulated on the
#           kernel's own shared-memory addresses for N(0,1) input (the benchmark's), bank conflicts
#           counted as the most distinct 4-byte words any bank serves per warp-wide LDS
# predicted fraction = memory / max(memory, issue, shared). The H200's figures: 132 SMs at 1.98 GHz,
# copy_ at 4.3 TB/s (~90% of 4.8 TB/s HBM3e; the assumption to replace by bench_blockwise.py's
# measured copy). The model ignores latency: it needs enough bytes in flight (8 CTAs x 8 warps x 32
# lanes x 16-32 B per SM: 64 KB fp32, 32 KB bf16, against ~26 KB per SM for 4.3 TB/s at ~800 ns).
H200 = dict(sms=132, clock_hz=1.98e9, copy_bytes_per_s=4.3e12, issue_per_clock=128, wavefronts_per_clock=1.0)
_ELEM_BYTES = {"float": 4, "f16": 2, "bf16": 2}


def _wavefronts(words) -> float:
    """Mean wavefronts of warp-wide shared loads: ``words [loads, 32]``, the 4-byte word each lane reads."""
    import torch

    rows = words.shape[0]
    bank = words % 32
    key = (torch.arange(rows).repeat_interleave(32) * 32 + bank.reshape(-1)) * (1 << 24) + words.reshape(-1)
    per_bank = torch.bincount(torch.unique(key) >> 24, minlength=rows * 32).view(rows, 32)
    return float(per_bank.max(dim=1).values.float().mean())


def blockwise_lds_wavefronts(kernel: str, blocksize: int, n: int = 1 << 17) -> float:
    """Shared-memory wavefronts per element of quantize/dequantize_blockwise (signed map, N(0,1)
    input): lane l of a warp holds elements 8l..8l+7 of its 256, load i of the warp reads element
    i of every lane; quantize reads its encoder word (kernels/blockwise.py _encoder_table_cpu,
    indexed as cuda/blockwise.cu encode_word does), dequantize the map entry of the code."""
    import torch

    from optim8.kernels.adam import GPU_LUT_EXP0, GPU_LUT_NEXP
    from optim8.kernels.blockwise import block_scale_reference, quantize_blockwise_reference

    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    if kernel == "quantize_blockwise":
        blocks = x.view(-1, blocksize)
        a, _ = block_scale_reference(blocks, True)
        s = (blocks * (1.0 / a)[:, None]).reshape(-1)
        t = (s.abs().clamp(min=2.0**-25).view(torch.int32).long() & 0xFFFFFFFF) >> 16
        words = t - (GPU_LUT_EXP0 << 7) + torch.where(s.view(torch.int32) < 0, GPU_LUT_NEXP * 128, 0)
    else:
        words = quantize_blockwise_reference(x, blocksize, True)[0].long()
    per_load = words.view(-1, 32, 8).transpose(1, 2).reshape(-1, 32)
    return _wavefronts(per_load) / 32


def copy_fraction(row: dict, wavefronts: float) -> dict:
    """The model above for one quantize/dequantize_blockwise row (times in SM clocks per element)."""
    h = H200
    bs = int(row["args"][1])
    nbytes = _ELEM_BYTES[row["args"][0]] + 1 + 4 / bs  # x (or out), the code, the block's absmax
    mem = nbytes * h["sms"] * h["clock_hz"] / h["copy_bytes_per_s"]
    issue = row["common_per"] / h["issue_per_clock"]
    lds = wavefronts / h["wavefronts_per_clock"]
    worst = max(mem, issue, lds)
    limiter = "memory" if worst == mem else ("issue" if worst == issue else "shared memory")
    return dict(bytes=nbytes, mem=mem, issue=issue, lds=lds, fraction=mem / worst, limiter=limiter)


def copy_fraction_rows(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(row, model) for every modeled quantize/dequantize_blockwise instantiation."""
    out, cache = [], {}
    for r in rows:
        if r["kernel"] in ("quantize_blockwise", "dequantize_blockwise") and r["common_per"] is not None:
            key = (r["kernel"], int(r["args"][1]))
            if key not in cache:
                cache[key] = blockwise_lds_wavefronts(*key)
            out.append((r, copy_fraction(r, cache[key])))
    return out


# --------------------------------------------------------------------------- output


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def markdown(rows: list[dict], tensors: int) -> str:
    from optim8.kernels import _nvrtc

    major, minor = _nvrtc.version()
    nvd = run_tool("nvdisasm", ["--version"]).strip().splitlines()[-1]
    out = [
        "# Static kernel report (sm_90 SASS)",
        "",
        f"Generated by `python benchmarks/kernel_report.py` (no GPU needed): every instantiation that "
        f"the wrappers launch (`optim8.kernels._launch.SOURCES`, {len(rows)} kernels), compiled by the "
        f"production compile step (`_nvrtc.compile`, options `{' '.join(_nvrtc.options_for(ARCH))}`, "
        f"NVRTC {major}.{minor}), read with `cuobjdump --dump-resource-usage` and `nvdisasm -c` ({nvd}).",
        "",
        f"Sources: the working tree at `{_git_state()}`.",
        "",
        METHOD.replace("TENSORS", str(tensors)),
        "## Budgets (issue 12)",
        "",
        "| kernel | SASS/param, common path | budget | pass |",
        "| --- | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["budget"] is not None:
            out.append(f"| `{r['expr']}` | {_fmt(r['common_per'])} | {r['budget']} | {'pass' if r['ok'] else '**FAIL**'} |")
    fr = copy_fraction_rows(rows)
    if fr:
        h = H200
        out += [
            "",
            "## Predicted fraction of copy bandwidth (blockwise kernels, H200)",
            "",
            f"Per element and per SM, in clocks: memory = bytes / ({h['copy_bytes_per_s'] / 1e12:g} TB/s copy bandwidth "
            f"over {h['sms']} SMs at {h['clock_hz'] / 1e9:g} GHz); issue = SASS/element (common path; quantize: the "
            f"larger of its two maps) / {h['issue_per_clock']}; shared = LDS wavefronts per element (simulated bank "
            "conflicts, signed map, N(0,1) input); predicted = memory / max(memory, issue, shared), a roofline: "
            "the three times overlap at best, so it is an upper bound. See `copy_fraction` in "
            "`benchmarks/kernel_report.py`; `benchmarks/bench_blockwise.py` measures it (bar: >= 80%).",
            "",
            "| kernel | B/elem | memory | issue | shared | predicted | limiter | issue use at 80% of copy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r, m in fr:
            out.append(
                f"| `{r['expr']}` | {m['bytes']:.2f} | {m['mem']:.3f} | {m['issue']:.3f} | {m['lds']:.3f} "
                f"| {m['fraction']:.0%} | {m['limiter']} | {0.8 * m['issue'] / m['mem']:.0%} |"
            )
    out += [
        "",
        "## Every instantiation",
        "",
        "regs: registers per thread; spill: local bytes per thread / STL+LDL instructions; smem: static "
        "`__shared__` bytes per CTA; occupancy at the launch's threads per CTA (the limiting resource in "
        "brackets); SASS/elem: instructions per element on the hot path, static (both sides of every "
        "branch) and on the common path where it is modeled.",
        "",
        "| kernel | element | threads | regs | spill B / ins | smem B | CTAs/SM | warps/SM | occupancy | hot path | ins/iter | elem/iter | SASS/elem static | SASS/elem common | budget |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        budget = "—" if r["budget"] is None else f"≤ {r['budget']} {'pass' if r['ok'] else '**FAIL**'}"
        ins_iter = r["static"] if isinstance(r["static"], int) else f"{r['static']:.0f}"
        out.append(
            f"| `{r['expr']}` | {r['element']} | {r['threads']}{'' if r['modeled'] else '?'} | {r['regs']} | {r['local'] + r['stack']} / {r['spill_ins']} "
            f"| {r['smem']} | {r['ctas']} | {r['warps']} | {r['occupancy']:.0%} ({r['limiter']}) | {r['where']} "
            f"| {ins_iter} | {r['per_iter'] if r['per_iter'] is not None else '—'} | {_fmt(r['static_per'])} | {_fmt(r['common_per'])} | {budget} |"
        )
    return "\n".join(out) + "\n"


def _git_state() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def summary(rows: list[dict]) -> str:
    lines = [f"{len(rows)} kernel instantiations (sm_90)"]
    over = [r for r in rows if r["budget"] is not None and not r["ok"]]
    for r in rows:
        if r["budget"] is not None:
            lines.append(
                f"  {r['expr']:<40} {r['common_per']:6.1f} SASS/param (budget {r['budget']}) "
                f"{r['regs']} regs, {r['ctas']} CTAs/SM {'ok' if r['ok'] else 'OVER'}"
            )
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for k, rs in by_kernel.items():
        regs = [r["regs"] for r in rs]
        per = [r["common_per"] if r["common_per"] is not None else r["static_per"] for r in rs]
        per = [p for p in per if p is not None]
        lines.append(
            f"  {k:<24} {len(rs):2d} inst.  regs {min(regs)}-{max(regs)}  CTAs/SM {min(r['ctas'] for r in rs)}-"
            f"{max(r['ctas'] for r in rs)}  "
            + (f"SASS/{rs[0]['element']} {min(per):.1f}-{max(per):.1f}" if per else "SASS/element: no model (see the table)")
        )
    for r, m in copy_fraction_rows(rows):
        if r["args"][1] == "256":
            lines.append(f"  {r['expr']:<40} predicted {m['fraction']:.0%} of copy bandwidth on an H200 ({m['limiter']}-bound)")
    spills = [r["expr"] for r in rows if r["local"] or r["stack"] or r["spill_ins"]]
    lines.append("  spills: " + (", ".join(spills) if spills else "none"))
    lines.append(f"  budgets: {len(over)} over" + (": " + ", ".join(r["expr"] for r in over) if over else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown report (default: %(default)s)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="keep compiled cubins here between runs")
    ap.add_argument("--tensors", type=int, default=DEFAULT_TENSORS, help="tensors per Adam step (tensor lookup)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a budgeted kernel is over its budget")
    ap.add_argument("--explain", metavar="EXPR", help="print the common-path branch decisions of matching kernels")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    try:
        check_tools()
    except Missing as exc:
        print(exc, file=sys.stderr)
        return 2
    rows = build(a.cache_dir, a.tensors, a.explain)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(markdown(rows, a.tensors))
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "decisions"} for r in rows], indent=1))
    if a.explain:
        for r in rows:
            if a.explain in r["expr"] and r["decisions"]:
                print(f"{r['expr']}:")
                print("\n".join("  " + d for d in r["decisions"]))
    print(summary(rows))
    print(f"wrote {a.out}")
    if a.check and any(r["ok"] is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
