"""Hyper-parameters of an edit, and their per-model-family YAML files in `configs/`.

Resolution order: the dataclass defaults, then `configs/<model_type>.yaml` (if present), then a
user YAML file (`--config`), then explicit overrides (CLI flags). Unknown keys and values that
cannot work (a NaN learning rate, zero cycles, ...) raise `ConfigError` before any model work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .routing import ROUTINGS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("kdpo", "dpo", "sft", "kdpo_free")  # kdpo_free: KDPO without teacher forcing (ablation)


@dataclass(frozen=True)
class EditConfig:
    """Everything that decides how an edit batch is trained."""

    method: str = "kdpo"
    beta: float = 0.1
    learning_rate: float = 1e-4
    cycles: int = 20
    steps_per_cycle: int = 8
    loss_threshold: float = 0.01
    margin: float = 0.0
    trim_margin: float = 0.0  # > 0: the trained batch is scaled down to where its targets still lead by this (nats)
    nll_weight: float = 0.0
    preserve_weight: float = 0.0
    preserve_prompts: int = 4
    preserve_reference: str = "below"  # the subject swaps keep the answers of: "below" (the stack) or "base"
    replay: int = 0
    anchors: int = 0
    guards: int = 0  # per request: generic-text prompts where the tokens it moves are at stake, held (guards.py)
    context_prefixes: int = 0  # each request is also trained after this many short generic sentences
    independent: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    layers: tuple[int, ...] | None = None
    skip_lower_layers: float = 0.0  # with `layers` unset: the fraction of lowest layers left without LoRA
    null_space: float = 0.0  # > 0: LoRA inputs confined to the lowest-variance directions holding this share
    null_space_samples: int = 256  # passages the base model writes, added to the generic text the null space is from
    null_space_max_gb: float = 2.0  # the null space is skipped (with a notice) where its d x d covariances exceed this (GiB)
    null_space_coordinates: bool = True  # Adam on A's coordinates in the null space (False: project A after each step)
    null_space_lr_scale: float = 1.0  # the null-space coordinates learn at this times learning_rate
    null_space_lr_matched: bool = False  # and at sqrt(d/k) times it per layer: Adam's step on A as long as unconfined
    null_space_protect_edits: float = 0.0  # > 0: also avoid the profile's earlier edits' inputs, keeping this share
    null_space_protect_swaps: float = 0.0  # > 0: also avoid the inputs of the edit's own subject swaps, keeping this share
    null_space_first_token: str = "with_rest"  # "apart": each text's first token (attention sink) weighs as much as the rest
    routing: str = "none"  # "subject": each prompt runs with only the batches whose subjects it names (routing.py)
    seed: int = 0
    max_target_tokens: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("beta", "learning_rate", "null_space_lr_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}: must be a finite positive number, got {value!r}")
        if self.learning_rate > 1.0:
            raise ConfigError(f"learning_rate: {self.learning_rate} is far too large (it would diverge); use <= 1")
        for name in ("cycles", "steps_per_cycle", "lora_rank", "max_target_tokens", "preserve_prompts", "replay",
                     "anchors", "guards", "context_prefixes", "null_space_samples"):
            value, may_be_zero = getattr(self, name), name in ("replay", "anchors", "guards", "context_prefixes",
                                                              "null_space_samples")
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if may_be_zero else 1):
                raise ConfigError(f"{name}: must be a {'non-negative' if may_be_zero else 'positive'} integer, "
                                  f"got {value!r}")
        for name in ("loss_threshold", "margin", "trim_margin", "nll_weight", "preserve_weight", "lora_alpha", "null_space_max_gb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.preserve_reference not in ("below", "base"):
            raise ConfigError(f"preserve_reference: must be below or base, got {self.preserve_reference!r}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing: must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.null_space_first_token not in ("with_rest", "apart"):
            raise ConfigError(f"null_space_first_token: must be with_rest or apart, got {self.null_space_first_token!r}")
        for name in ("independent", "null_space_coordinates", "null_space_lr_matched"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError("target_modules: must be a non-empty list of module names")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError("layers: must be null or a list of layer indices >= 0")
        for name in ("skip_lower_layers", "null_space", "null_space_protect_edits", "null_space_protect_swaps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{name}: must be a fraction in [0, 1), got {value!r}")

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The layers that get LoRA (None: all): `layers`, else all but the lowest `skip_lower_layers`.

        No LoRA below a layer means no backward pass below it either: the fraction buys speed.
        """
        if self.layers is not None:
            return list(self.layers)
        first = round(num_layers * self.skip_lower_layers)
        return list(range(first, num_layers)) if first > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data


def _coerce(values: dict[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(EditConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = dict(values)
    for key in ("target_modules", "layers"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    for key in ("learning_rate", "beta", "loss_threshold", "margin", "trim_margin", "nll_weight", "preserve_weight", "lora_alpha",
                "skip_lower_layers", "null_space", "null_space_max_gb", "null_space_lr_scale", "null_space_protect_edits",
                "null_space_protect_swaps"):
        if isinstance(out.get(key), str):  # YAML reads "1e-4" as a string
            try:
                out[key] = float(out[key])
            except ValueError:
                raise ConfigError(f"{source}: {key}: {out[key]!r} is not a number") from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return _coerce(data, str(path))


def resolve_config(model_type: str | None = None, path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> EditConfig:
    """Defaults < `configs/<model_type>.yaml` < `path` < `overrides` (None values are ignored)."""
    values: dict[str, Any] = {}
    family = CONFIG_DIR / f"{model_type}.yaml" if model_type else None
    if family is not None and family.is_file():
        values.update(read_yaml(family))
    if path is not None:
        values.update(read_yaml(path))
        _build(values, str(path))  # a bad file is an error even where flags override its values
    if overrides:
        values.update(_coerce({k: v for k, v in overrides.items() if v is not None}, "overrides"))
    return _build(values, "settings")


def _build(values: dict[str, Any], source: str) -> EditConfig:
    try:
        return EditConfig(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None

