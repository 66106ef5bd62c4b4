"""bitsandbytes-format checkpoints, read and written without bitsandbytes.

The bitsandbytes checkpoints here are written by this file from tiny random models, with
bitsandbytes' own algorithms spelled out (its default/CPU backend: ``quantize_4bit`` by argmin
over the code, ``quantize_blockwise`` with its fp32-built dynamic map, ``QuantState.as_dict``),
since bitsandbytes is not a dependency. Where it is importable, its outputs are compared too.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import optim8  # noqa: E402
from optim8.integrations import bnb as fmt  # noqa: E402
from optim8.kernels import nf4  # noqa: E402
from optim8.layers import Linear4bit, Linear8bitLt  # noqa: E402

from tiny_models import VOCAB, llama_model  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:
    HAVE_BNB = False


def bnb_dynamic_map() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: fp32 linspace (optim8 builds its map in fp64)."""
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def bnb_quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = a.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(a.reshape(-1), (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1 / absmax.view(-1, 1)), -1, 1).reshape(-1)[:n]
    return (scaled[:, None] - code).abs().argmin(dim=-1).to(torch.uint8), absmax


def bnb_quantize_4bit(w: torch.Tensor, quant_type: str, double_quant: bool) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' ``Linear4bit`` saves for ``w`` (blocksize 64), names relative to the layer."""
    code = nf4.code_map(quant_type)
    q, absmax = bnb_quantize_blockwise(w, code, 64)
    q = q.reshape(-1)
    packed = (q[::2] << 4 | q[1::2]).unsqueeze(1)
    meta = {"quant_type": quant_type, "blocksize": 64, "dtype": "float32", "shape": list(w.shape)}
    out = {"weight": packed, "weight.quant_map": code}
    if double_quant:
        offset = absmax.mean()
        nmap = bnb_dynamic_map()
        qabs, nabs = bnb_quantize_blockwise(absmax - offset, nmap, 256)
        out.update({"weight.absmax": qabs, "weight.nested_absmax": nabs, "weight.nested_quant_map": nmap})
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=offset.item())
    else:
        out["weight.absmax"] = absmax
    out[f"weight.quant_state.bitsandbytes__{quant_type}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def bnb_dequantize_4bit(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` of those tensors."""
    meta = json.loads(bytes(next(v for k, v in t.items() if "quant_state" in k).tolist()))
    absmax = t["weight.absmax"]
    if "weight.nested_absmax" in t:
        scale = t["weight.nested_absmax"].repeat_interleave(256)[: absmax.numel()]
        absmax = t["weight.nested_quant_map"][absmax.long()] * scale
        absmax += torch.tensor(float(meta["nested_offset"]))
    p = t["weight"].reshape(-1).long()
    codes = torch.stack([p >> 4, p & 15], 1).reshape(-1)
    n = meta["shape"][0] * meta["shape"][1]
    return (t["weight.quant_map"][codes[:n]] * absmax.repeat_interleave(64)[:n]).view(meta["shape"])


def linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}


def write_bnb_checkpoint(path, model, bits, quant_type="nf4", double_quant=True):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, layer in linears(model).items():
        w = layer.weight.detach()
        if bits == 8:
            absmax = w.abs().amax(dim=1)
            state[f"{name}.weight"] = torch.round(w * (127 / absmax[:, None])).to(torch.int8)
            state[f"{name}.SCB"] = absmax
            state[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
        else:
            for key, value in bnb_quantize_4bit(w, quant_type, double_quant).items():
                state[f"{name}.{key}"] = value.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.quantization_config = transformers.BitsAndBytesConfig(
        load_in_8bit=bits == 8, load_in_4bit=bits == 4, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
    ).to_dict()  # fmt: skip
    config.save_pretrained(path)
    return state


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = llama_model().eval()
    path = tmp_path_factory.mktemp("fp32")
    model.save_pretrained(path)
    return model, path


def test_scale_to_absmax_is_an_exact_inverse():
    rows = torch.cat([torch.randn(20000).abs() * 10.0 ** torch.randint(-30, 30, (20000,)), torch.tensor([0.0, 1e-40])])
    scale = rows / torch.full_like(rows, 127.0)
    absmax = fmt.absmax_from_scale(scale)
    assert torch.equal(fmt.scale_from_absmax(absmax), scale)
    normal = scale >= torch.finfo(torch.float32).tiny  # a subnormal scale has fewer digits to give back
    assert ((absmax - rows).abs() <= rows.abs() * 2.5e-7)[normal].all()


def test_bitsandbytes_8bit_checkpoint_loads_with_its_dequantized_weights(fp32, tmp_path):
    model, _ = fp32
    state = write_bnb_checkpoint(tmp_path, model, 8)
    if not HAVE_BNB:
        with pytest.raises(ImportError, match="bitsandbytes"):  # plain transformers needs bitsandbytes
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = optim8.from_bitsandbytes(tmp_path)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, Linear8bitLt)}
    assert set(layers) == set(linears(model))
    for name, layer in layers.items():
        assert torch.equal(layer.weight, state[f"{name}.weight"])
        bnb = state[f"{name}.weight"].float() * state[f"{name}.SCB"][:, None] * 7.874015718698502e-3
        # bitsandbytes multiplies by fp32(1/127), optim8 by fp32(absmax/127): within 2 ulps
        assert ((layer.dequantize(torch.float32) - bnb).abs() <= bnb.abs() * 2.5e-7).all(), name
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        rel = (loaded(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
    assert rel < 0.02


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_bitsandbytes_4bit_checkpoint_loads_with_identical_dequantized_weights(fp32, tmp_path, quant_type, double_quant):
    model, _ = fp32
    write_bnb_checkpoint(tmp_path, model, 4, quant_type, double_quant)
    loaded = optim8.from_bitsandbytes(tmp_path)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert set(layers) == set(linears(model))
    for name, layer in layers.items():
        expected = bnb_dequantize_4bit(bnb_quantize_4bit(linears(model)[name].weight.detach(), quant_type, double_quant))
        assert torch.equal(layer.dequantize(torch.float32), expected), name
        assert layer.quant_type == quant_type and layer.double_quant == double_quant
    # optim8's own quantizer gives the same codes and absmaxes (its nested map differs by fp rounding)
    name, layer = next(iter(layers.items()))
    packed, state = nf4.quantize_4bit(linears(model)[name].weight, quant_type=quant_type, double_quant=False)
    assert torch.equal(packed, layer.weight)
    # ... and re-saving writes the same tensors (the reverse direction: bitsandbytes' layout)
    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    again = optim8.from_bitsandbytes(resaved)
    a, b = loaded.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optim8_checkpoints_without_optim8_fail_loudly_or_load_through_bitsandbytes(fp32, tmp_path):
    """Issue 10 item 12: a process that never imports optim8 must not read int8 codes as float weights."""
    _, path = fp32
    for bits, config in ((8, optim8.Int8Config()), (4, optim8.Int4Config())):
        saved = tmp_path / f"int{bits}"
        transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config).save_pretrained(saved)
        code = (
            "import sys, transformers\n"
            f"try:\n    transformers.AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
            "except ImportError as error:\n    assert 'bitsandbytes' in str(error), error\n    print('REFUSED')\n"
            "else:\n    print('LOADED')\n"
            "assert 'optim8' not in sys.modules\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == ("LOADED" if HAVE_BNB else "REFUSED")
        # with optim8 imported the same directory loads into optim8 layers
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
        kind = Linear8bitLt if bits == 8 else Linear4bit
        assert sum(isinstance(m, kind) for m in reloaded.modules()) == 14


def test_older_optim8_int8_checkpoints_still_load(fp32, tmp_path):
    """Before the bitsandbytes layout: quant_method "optim8" and SCB = absmax / 127."""
    _, path = fp32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=optim8.Int8Config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    model.config.quantization_config = {"quant_method": "optim8", "threshold": 6.0, "skip_modules": ["lm_head"]}
    model.config.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_bitsandbytes_refuses_a_float_checkpoint(fp32):
    with pytest.raises(ValueError, match="no bitsandbytes quantization_config"):
        optim8.from_bitsandbytes(fp32[1])
