"""kdpo-lora: edit facts of an LLM with KDPO into LoRA adapters on a 4-bit base, reversibly."""

import logging as _logging

# bitsandbytes warns at import that an optional CPU kernel package ("kernels") is missing; it is
# optional and unused here (its packed path has no backward, see loading.py), so that one line is dropped.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

from .config import EditConfig, resolve_config
from .editor import BatchResult, Editor, RequestResult
from .errors import ConfigError, IntegrityError, KdpoError, ModelLoadError, NumericalError, RequestError, StoreError
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .requests import EditRequest, Probe, read_requests
from .session import KnowledgeEditor
from .store import AdapterStore

__all__ = [
    "AdapterStore", "BatchResult", "ConfigError", "DEFAULT_MODEL", "EditConfig", "EditRequest", "Editor",
    "IntegrityError", "KdpoError", "KnowledgeEditor", "LoadedModel", "ModelLoadError", "NumericalError", "Probe",
    "RequestError", "RequestResult", "StoreError", "load_model", "read_requests", "resolve_config",
]
__version__ = "0.1.0"
