"""The shipped YAML files: each resolves to a valid config, and the overlay changes only what it says."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kdpo_lora.config import CONFIG_DIR, read_yaml, resolve_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves_on_top_of_llama(path):
    resolve_config("llama", path)


def test_sequential_overlay_keeps_the_family_settings_and_adds_the_many_edit_set_up():
    family = resolve_config("llama")
    overlay = read_yaml(CONFIG_DIR / "sequential.yaml")
    resolved = resolve_config("llama", CONFIG_DIR / "sequential.yaml")
    assert resolved == replace(family, **overlay)
    assert resolved.null_space > 0 and resolved.null_space_protect_edits > 0 and resolved.margin > 0
    assert resolved.learning_rate == family.learning_rate and resolved.preserve_weight == family.preserve_weight


def test_the_family_default_is_the_routed_set_up_and_unrouted_yaml_turns_routing_and_its_training_off():
    family = resolve_config("llama")
    assert family == resolve_config("llama", CONFIG_DIR / "routed.yaml") and family.routing == "subject"
    unrouted = resolve_config("llama", CONFIG_DIR / "unrouted.yaml")
    assert (unrouted.routing, unrouted.context_prefixes, unrouted.margin) == ("none", 0, 0.0)
    assert unrouted == replace(family, routing="none", context_prefixes=0, margin=0.0)


@pytest.mark.parametrize("setting, message", [
    ({"preserve_reference": "stack"}, "preserve_reference: must be below or base"),
    ({"context_prefixes": -1}, "context_prefixes: must be a non-negative integer"),
])
def test_a_bad_setting_is_named(setting, message):
    from kdpo_lora.config import ConfigError, EditConfig

    with pytest.raises(ConfigError, match=message):
        EditConfig(**setting)
