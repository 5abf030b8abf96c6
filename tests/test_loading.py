"""Model loading: sources, the embedded GGUF and its conversion cache, devices, fingerprints."""

from __future__ import annotations

import pytest
import torch

from kdpo_lora.errors import ModelLoadError
from kdpo_lora.loading import (
    base_fingerprint, cache_dir, convert_gguf, disable_cpu_fast_path, embedded_gguf, load_model, pick_device,
    resolve_source,
)


def test_embedded_gguf_is_found_through_package_metadata():
    path = embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_conversion_is_cached_and_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    first = convert_gguf(embedded_gguf())
    assert first.parent == tmp_path / "converted"
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert "quantization_config" not in (first / "config.json").read_text()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(embedded_gguf()) == first  # reused, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".staging-")]
    (first / "model.safetensors").unlink()  # a half-written entry must never be used
    again = convert_gguf(embedded_gguf())
    assert (again / "model.safetensors").is_file()


def test_sources_and_errors(tmp_path, tiny_model_dir):
    assert resolve_source(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_source("no-such-model")
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        resolve_source(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="quantization"):
        load_model(str(tiny_model_dir), quantization="int3")


def test_device_choice():
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            pick_device("cuda")


def test_nf4_load_is_frozen_safe_and_fingerprinted_like_fp32(tiny_model_dir, other_model_dir):
    from bitsandbytes.nn import Linear4bit

    nf4 = load_model(str(tiny_model_dir), "nf4", "cpu")
    fp32 = load_model(str(tiny_model_dir), "none", "cpu")
    layers = [m for m in nf4.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert disable_cpu_fast_path(nf4.model) == len(layers)
    assert not any(p.requires_grad for p in nf4.model.parameters()) and not nf4.model.training
    assert nf4.tokenizer.padding_side == "left" and nf4.tokenizer.pad_token is not None
    assert nf4.fingerprint == fp32.fingerprint == base_fingerprint(fp32.model)
    assert load_model(str(other_model_dir), "none", "cpu").fingerprint != fp32.fingerprint
