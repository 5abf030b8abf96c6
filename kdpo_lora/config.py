"""The settings of an edit: one typed dataclass whose defaults are the recommended set-up.

Resolution: `EditConfig()`'s defaults, then a YAML file (`--config`: a path, or the name of a file
shipped in `kdpo_lora/configs/`, e.g. `paper`), then explicit overrides (CLI flags). Unknown keys and
values that cannot work (a NaN learning rate, zero cycles, ...) raise `ConfigError` before any
model work. The defaults were measured on Llama-family models (SmolLM2-135M, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, KdpoWarning

SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("kdpo", "dpo", "sft", "kdpo_free")
ROUTINGS = ("none", "subject")  # how a profile's batches serve a prompt (routing.py); stored with the profile
DEFAULT_ROUTING = "subject"
STOPS = ("step", "cycle")
MEASURED_FAMILIES = ("llama",)  # model types whose module names and defaults were measured


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EditConfig:
    """Everything that decides how an edit batch is trained and served."""

    method: str = _opt("kdpo", "kdpo (the paper's objective); dpo, sft and kdpo_free (no teacher forcing) are baselines")
    beta: float = _opt(0.1, "DPO temperature: how sharply the new answer is preferred over the current one")
    learning_rate: float = _opt(5e-4, "Adam learning rate of the LoRA weights")
    sequential_lr_scale: float = _opt(1.0, "learning-rate factor for a batch trained on top of earlier ones (paper: 0.2)")
    cycles: int = _opt(20, "at most this many cycles; each one takes the current model's answer as the negative")
    steps_per_cycle: int = _opt(8, "Adam steps per cycle")
    stop: str = _opt("step", "check that every target token wins after each step (step) or once per cycle (cycle, paper)")
    loss_threshold: float = _opt(0.01, "a cycle ends once the loss falls below this (paper: 1e-3)")
    margin: float = _opt(1.0, "a target token counts as written once it leads its runner-up by this many nats")
    preserve_weight: float = _opt(5.0, "weight of the KL holding the prompt about other subjects, and the text after the target")
    preserve_prompts: int = _opt(4, "subject swaps per request held by that KL")
    context_prefixes: int = _opt(4, "each request also trains in this many contexts: generic sentences, the last a chat turn")
    independent: bool = _opt(True, "each batch also holds with the batches below it off, so rolling any back is exact")
    routing: str = _opt(DEFAULT_ROUTING, "subject: a prompt is served by the batches whose subjects it names; none: by all")
    lora_rank: int = _opt(8, "LoRA rank of each batch")
    lora_alpha: float = _opt(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    target_modules: tuple[str, ...] = _opt(("gate_proj", "up_proj", "down_proj"), "the modules that get LoRA")
    layers: tuple[int, ...] | None = _opt(None, "layer indices that get LoRA (null: all but skip_lower_layers)")
    skip_lower_layers: float = _opt(0.333, "share of the lowest layers without LoRA (no backward pass there)")
    seed: int = _opt(0, "seed of the sampled subject swaps and context sentences")

    def __post_init__(self) -> None:
        _choice(self, "method", METHODS)
        _choice(self, "routing", ROUTINGS)
        _choice(self, "stop", STOPS)
        for name in ("beta", "learning_rate", "sequential_lr_scale"):
            _number(self, name, positive=True)
        if self.learning_rate > 1.0:
            raise ConfigError(f"learning_rate: {self.learning_rate} is far too large (it would diverge); use <= 1")
        for name in ("loss_threshold", "margin", "preserve_weight", "lora_alpha"):
            _number(self, name)
        for name in ("cycles", "steps_per_cycle", "lora_rank", "preserve_prompts"):
            _integer(self, name, minimum=1)
        for name in ("context_prefixes", "seed"):
            _integer(self, name, minimum=0)
        if not isinstance(self.independent, bool):
            raise ConfigError(f"independent: must be true or false, got {self.independent!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError("target_modules: must be a non-empty list of module names")
        if self.layers is not None and not (self.layers and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
            raise ConfigError("layers: must be null or a non-empty list of layer indices >= 0")
        value = self.skip_lower_layers
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"skip_lower_layers: must be a fraction in [0, 1), got {value!r}")

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The layers that get LoRA (None: all): `layers`, else all but the lowest `skip_lower_layers`."""
        if self.layers is not None:
            return list(self.layers)
        first = round(num_layers * self.skip_lower_layers)
        return list(range(first, num_layers)) if first > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data


def help_lines() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every setting: the README's defaults table and `--help` come from here."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(EditConfig)]


def _choice(config: EditConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, name) not in allowed:
        raise ConfigError(f"{name}: {getattr(config, name)!r} is not one of {', '.join(allowed)}")


def _number(config: EditConfig, name: str, positive: bool = False) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
            positive and value == 0):
        raise ConfigError(f"{name}: must be a finite {'positive number' if positive else 'number >= 0'}, got {value!r}")


def _integer(config: EditConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: must be {'a positive' if minimum else 'a non-negative'} integer, got {value!r}")


def _coerce(values: dict[str, Any], source: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(EditConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = dict(values)
    for key in ("target_modules", "layers"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    for key, spec in known.items():
        if spec.type == "float" and isinstance(out.get(key), str):  # YAML reads "1e-4" as a string
            try:
                out[key] = float(out[key])
            except ValueError:
                raise ConfigError(f"{source}: {key}: {out[key]!r} is not a number") from None
    return out


def shipped_configs() -> list[str]:
    """The names `--config` takes besides a path."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A shipped config's file (`paper`, `unrouted`), or the path as given."""
    text = str(name_or_path)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        if (SHIPPED_DIR / f"{text}.yaml").is_file():
            return SHIPPED_DIR / f"{text}.yaml"
        raise ConfigError(f"no shipped config {text!r} (shipped: {', '.join(shipped_configs())}); "
                          f"or give a YAML file's path")
    return Path(name_or_path)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings; errors name the file."""
    import yaml

    path = config_path(path)
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
    """Defaults < `path` (a YAML file or shipped name) < `overrides` (None values are ignored).

    A model type the defaults were not measured on gets them all the same, with a one-line notice."""
    if model_type is not None and model_type not in MEASURED_FAMILIES:
        warnings.warn(f"model type {model_type!r}: the default settings were measured on Llama-family models; "
                      f"check an edit before relying on them (--config FILE to change them)", KdpoWarning, stacklevel=2)
    values: dict[str, Any] = {}
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
