"""kdpo-lora: edit facts of an LLM with KDPO into LoRA adapters on a 4-bit base, reversibly.

The names below are imported on first use, so `kdpo-lora --help` and the store commands never load torch.
"""

import importlib
import logging as _logging

# bitsandbytes warns at import that an optional CPU kernel package ("kernels") is missing; it is
# optional and unused here (its packed path has no backward, see loading.py), so that one line is dropped.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

_WHERE = {
    "EditConfig": "config", "resolve_config": "config",
    "BatchResult": "editor", "Editor": "editor", "RequestResult": "editor",
    "ConfigError": "errors", "IntegrityError": "errors", "KdpoError": "errors", "ModelLoadError": "errors",
    "NumericalError": "errors", "RequestError": "errors", "StoreError": "errors",
    "DEFAULT_MODEL": "embedded", "LoadedModel": "loading", "load_model": "loading",
    "EditRequest": "requests", "Probe": "requests", "read_requests": "requests",
    "KnowledgeEditor": "session", "AdapterStore": "store",
}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kdpo_lora' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
