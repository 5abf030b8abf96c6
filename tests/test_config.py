"""Settings: the defaults are the recommended set-up whatever the install, shipped configs resolve, the
paper's recipe is what it says, and bad settings are named."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest

from kdpo_lora.config import EditConfig, help_lines, read_yaml, resolve_config, shipped_configs
from kdpo_lora.errors import ConfigError, KdpoWarning, StoreError


def test_at_most_twenty_settings_each_with_a_one_line_help():
    assert len(fields(EditConfig)) <= 20
    for key, _, text in help_lines():
        assert text and "\n" not in text and len(text) <= 120, key


def test_the_defaults_are_the_recommended_routed_set_up_without_any_file():
    cfg = EditConfig()
    assert (cfg.routing, cfg.context_prefixes, cfg.margin, cfg.learning_rate, cfg.preserve_weight) == \
        ("subject", 4, 1.0, 5e-4, 5.0)
    assert resolve_config("llama") == cfg == resolve_config(None)


def test_an_installed_copy_outside_the_checkout_has_the_same_defaults_and_shipped_configs(tmp_path):
    """A wheel has no repository around it: everything the settings need is package data."""
    code = ("import kdpo_lora.config as c, dataclasses, json;"
            "print(json.dumps([dataclasses.asdict(c.EditConfig()), c.shipped_configs()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(tmp_path) not in out.stdout and '"routing": "subject"' in out.stdout and '"paper"' in out.stdout


def test_an_unmeasured_model_family_gets_the_defaults_with_a_one_line_notice():
    with pytest.warns(KdpoWarning, match="model type 'gpt2': the default settings were measured on Llama"):
        assert resolve_config("gpt2") == EditConfig()


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_resolves_by_name(name):
    assert resolve_config(None, name) == replace(EditConfig(), **read_yaml(name))


def test_the_paper_recipe():
    paper = resolve_config(None, "paper")
    assert (paper.margin, paper.stop, paper.loss_threshold, paper.learning_rate, paper.sequential_lr_scale) == \
        (0.0, "cycle", 1e-3, 1e-4, 0.2)
    assert (paper.preserve_weight, paper.context_prefixes, paper.routing, paper.independent) == (0.0, 0, "none", False)


def test_unrouted_turns_routing_and_its_training_off():
    assert resolve_config(None, "unrouted") == replace(EditConfig(), routing="none", context_prefixes=0, margin=0.0)


@pytest.mark.parametrize("setting, message", [
    ({"stop": "never"}, "stop: 'never' is not one of step, cycle"),
    ({"context_prefixes": -1}, "context_prefixes: must be a non-negative integer"),
    ({"sequential_lr_scale": 0}, "sequential_lr_scale: must be a finite positive number"),
    ({"layers": ()}, "layers: must be null or a non-empty list"),
])
def test_a_bad_setting_is_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        EditConfig(**setting)


def test_an_unknown_shipped_name_is_refused_with_the_list():
    with pytest.raises(ConfigError, match="no shipped config 'papr'.*paper"):
        resolve_config(None, "papr")


# ------------------------------------------------------------------ routing is stored with the profile


@pytest.fixture()
def routed_store(tiny_model_dir, tmp_path):
    from kdpo_lora.loading import load_model
    from kdpo_lora.requests import EditRequest
    from kdpo_lora.session import KnowledgeEditor

    loaded = load_model(str(tiny_model_dir), "none", "cpu")
    ke = KnowledgeEditor(loaded, tmp_path / "store", overrides={"learning_rate": 5e-3, "beta": 1.0})
    ke.edit([EditRequest("the capital of japan is", "rome", subject="japan")], name="b0", progress=False)
    return loaded, tmp_path / "store"


def test_a_profile_is_served_as_stored_whoever_opens_it(routed_store):
    from kdpo_lora.requests import EditRequest
    from kdpo_lora.session import KnowledgeEditor
    from kdpo_lora.store import AdapterStore

    loaded, root = routed_store
    assert AdapterStore(root).routing("default") == "subject"
    plain = KnowledgeEditor(loaded, root)  # no flags: the stored routing
    plain.use("default")
    assert plain.routed and plain.route("the capital of france is") == []
    with pytest.raises(StoreError, match="served with routing 'subject'.*not 'none'"):
        KnowledgeEditor(loaded, root, config="unrouted").use("default")
    unrouted = KnowledgeEditor(loaded, root, config="unrouted", overrides={"learning_rate": 5e-3})
    with pytest.raises(StoreError, match="served with routing 'subject'"):
        unrouted.edit([EditRequest("the capital of spain is", "oslo")], progress=False)
    unrouted.edit([EditRequest("the capital of spain is", "oslo")], profile="shared", progress=False)
    assert AdapterStore(root).routing("shared") == "none"
    again = KnowledgeEditor(loaded, root)
    again.use("shared")
    assert not again.routed and again.route("the capital of france is") != []


def test_the_command_line_refuses_a_conflicting_routing(routed_store, capsys, tiny_model_dir):
    from kdpo_lora.cli import main

    _, root = routed_store
    code = main(["generate", "--model", str(tiny_model_dir), "--quantization", "none", "--store", str(root),
                 "--prompt", "the capital of japan is", "--routing", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "served with routing 'subject'" in err


def test_a_version_1_store_is_read_with_each_profiles_routing_from_its_batches(routed_store):
    import json

    from kdpo_lora.store import AdapterStore

    _, root = routed_store
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 1
    del manifest["serving"]
    manifest["profiles"]["empty"] = []
    (root / "manifest.json").write_text(json.dumps(manifest))
    store = AdapterStore(root)
    assert store.routing("default") == "subject" and store.routing("empty") == "subject"
    store.create_profile("copy", copy_from="default")  # the next write upgrades it
    written = json.loads((root / "manifest.json").read_text())
    assert written["version"] == 2 and written["serving"]["copy"] == {"routing": "subject"}
