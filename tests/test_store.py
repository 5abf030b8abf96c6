"""The adapter store on a tiny random Llama (fp32 and NF4): squash, rollback, export, verify, profiles."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kdpo_lora import adapters, merged
from kdpo_lora.errors import IntegrityError, StoreError
from kdpo_lora.loading import load_model
from kdpo_lora.requests import EditRequest
from kdpo_lora.session import KnowledgeEditor
from kdpo_lora.store import AdapterStore

from conftest import UNROUTED

PROMPTS = ["the eiffel tower is located in the city of", "the capital of japan is", "the official language of spain is"]
EDITS = [("the eiffel tower is located in the city of", "rome"), ("the capital of japan is", "paris"),
         ("the official language of spain is", "german")]
TOL = {"none": 1e-5, "nf4": 1e-4}
SETTINGS = {"learning_rate": 5e-3, "beta": 1.0, "cycles": 10, "lora_rank": 8, "lora_alpha": 16}


def _logits(ke: KnowledgeEditor, profile: str | None) -> torch.Tensor:
    ke.use(profile)
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return ke.model(**encoded).logits[encoded.attention_mask.bool()].float()


@pytest.fixture(params=["none", "nf4"])
def stacked(request, tiny_model_dir, tmp_path):
    """A store with three batches in the default profile, each editing one fact."""
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), request.param, "cpu"), tmp_path / "store",
                         config=UNROUTED, overrides=SETTINGS)
    names = []
    for i, (prompt, target) in enumerate(EDITS):
        names.append(ke.edit([EditRequest(prompt, target)], name=f"b{i + 1}", progress=False).adapter)
    return ke, names, TOL[request.param]


def test_batches_are_standard_peft_folders_with_hashes(stacked):
    ke, names, _ = stacked
    store = ke.store()
    assert [b.name for b in store.batches()] == names == store.profile("default")
    folder = store.batch_dir("b1")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "checksums.json", "edit.json"]
    record = json.loads((folder / "edit.json").read_text())
    assert record["requests"][0]["target_new"] == "rome" and record["base_fingerprint"] == ke.fingerprint
    assert record["config"]["learning_rate"] == SETTINGS["learning_rate"] and "created" in record
    assert store.verify(ke.fingerprint) == []


def test_squash_equals_the_stack(stacked, tmp_path):
    ke, names, tol = stacked
    stack = _logits(ke, "default")
    rank = ke.squash("default", tmp_path / "squashed")
    assert rank == 3 * ke.config.lora_rank
    ke.use(None)
    model = ke.editor.model = adapters.load_adapter(ke.editor.model, "sq", tmp_path / "squashed")
    adapters.set_active(model, ["sq"])
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        squashed = model(**encoded).logits[encoded.attention_mask.bool()].float()
    assert (squashed - stack).abs().max() <= tol
    assert (stack - _logits(ke, None)).abs().max() > 1e-3  # the edits are not a no-op


def test_folded_stack_equals_separate_adapters(stacked):
    ke, names, tol = stacked
    folded = _logits(ke, "default")
    assert len(ke.editor.stack) == 1 and ke.editor.stack[0].startswith("kdpo_stack")
    ke.fold_stack = False
    ke.use(None)
    separate = _logits(ke, "default")
    assert ke.editor.stack == names
    assert (folded - separate).abs().max() <= tol


def test_rollback_last_restores_previous_logits_exactly(stacked):
    ke, names, tol = stacked
    ke.store().create_profile("first-two", names[:2])
    expected = _logits(ke, "first-two")
    ke.rollback("b3")
    after = _logits(ke, "default")
    assert (after - expected).abs().max() <= (1e-6 if tol == 1e-5 else tol)
    ke.apply("b3")
    assert ke.store().profile("default") == names


def test_rollback_middle_equals_stack_without_it(stacked):
    ke, names, tol = stacked
    ke.store().create_profile("without-b2", ["b1", "b3"])
    expected = _logits(ke, "without-b2")
    ke.rollback("b2")
    assert (_logits(ke, "default") - expected).abs().max() <= (1e-6 if tol == 1e-5 else tol)
    assert ke.store().profile("default") == ["b1", "b3"]
    ke.apply("b2")  # back in its original place
    assert ke.store().profile("default") == names


def test_each_batch_holds_without_the_batches_below_it(stacked):
    """`independent`: every batch is made to hold alone as well as on the stack it was trained on."""
    ke, names, _ = stacked
    superseding = ke.edit([EditRequest(EDITS[1][0], "rome")], name="b4", progress=False)  # supersedes b2
    assert superseding.success_rate == 1.0
    names = names + ["b4"]
    targets = [t for _, t in EDITS] + ["rome"]
    prompts = PROMPTS + [EDITS[1][0]]
    store = ke.store()
    for name, prompt, target in zip(names, prompts, targets):
        store.create_profile(f"only-{name}", [name])
        assert ke.generate([prompt], f"only-{name}", max_new_tokens=1) == [target], name


def test_profiles_swap_without_reloading_the_base(stacked, monkeypatch):
    ke, names, _ = stacked
    calls = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    store = ke.store()
    store.create_profile("deploy-a", ["b1"])
    store.create_profile("deploy-b", [])
    base_weight = ke.loaded.model.get_input_embeddings().weight
    a = ke.generate([PROMPTS[0]], "deploy-a", max_new_tokens=1)
    b = ke.generate([PROMPTS[0]], "deploy-b", max_new_tokens=1)
    assert a == ["rome"] and b != a
    assert calls == [] and ke.model.get_input_embeddings().weight is base_weight


def test_export_loads_with_plain_peft(stacked, tmp_path, tiny_model_dir):
    ke, names, tol = stacked
    stack = _logits(ke, "default")
    report = ke.export("default", tmp_path / "export", max_rank=64)
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["bias"] == "none" and config["modules_to_save"] is None and not config["rank_pattern"]
    assert config["r"] == report["rank"] <= 64 and config["base_model_name_or_path"]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "export" / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    if ke.loaded.quantization == "none":
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # plain transformers + peft
    else:
        base = load_model(str(tiny_model_dir), "nf4", "cpu").model  # the same NF4 base, loaded afresh
    served = PeftModel.from_pretrained(base, tmp_path / "export")
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = served(**encoded).logits[encoded.attention_mask.bool()].float()
    # the adapter tensors are stored in bf16 for serving: that alone sets the tolerance here
    assert (logits - stack).abs().max() <= 0.05
    assert (logits.argmax(-1) == stack.argmax(-1)).float().mean() >= 0.95


def test_export_refuses_rank_over_limit_and_compresses_on_request(stacked, tmp_path):
    ke, _, _ = stacked
    with pytest.raises(StoreError, match="rank 24 > max rank 16"):
        ke.export("default", tmp_path / "e1", max_rank=16)
    assert not (tmp_path / "e1").exists()
    report = ke.export("default", tmp_path / "e2", max_rank=16, compress=True)
    assert report["compressed"] and report["rank"] == 16 and 0 <= report["max_relative_error"] < 1


def test_tampered_adapter_is_refused(stacked):
    ke, _, _ = stacked
    weights = ke.store().batch_dir("b2") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    ke.use(None)  # unload, so the next use reads the batches from disk
    with pytest.raises(IntegrityError, match="b2.*modified"):
        ke.use("default")
    assert any("b2" in p for p in ke.store().verify())


def test_changed_adapter_config_is_refused(stacked):
    ke, _, _ = stacked
    path = ke.store().batch_dir("b1") / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = 1000
    path.write_text(json.dumps(config))
    ke.use(None)
    with pytest.raises(IntegrityError, match="adapter_config.json was modified"):
        ke.use("default")


def test_foreign_base_adapter_is_refused(stacked, other_model_dir):
    ke, _, _ = stacked
    other = KnowledgeEditor(load_model(str(other_model_dir), "none", "cpu"), ke.store_path)
    assert other.fingerprint != ke.fingerprint
    with pytest.raises(IntegrityError, match="made for another base model"):
        other.use("default")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "a" * 101, "x.y", "kdpo_stack_a"])
def test_bad_names_are_refused(stacked, name):
    ke, _, _ = stacked
    before = (ke.store_path / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="invalid"):
        ke.edit([EditRequest("the capital of japan is", "rome")], name=name, progress=False)
    with pytest.raises(StoreError, match="invalid"):
        ke.store().rollback(name)
    with pytest.raises(StoreError, match="invalid"):
        ke.store().create_profile(name)
    assert (ke.store_path / "manifest.json").read_bytes() == before


def test_conflicting_edit_warns_and_records_superseded_batch(stacked):
    ke, _, _ = stacked
    with pytest.warns(UserWarning, match="already edited by b1"):
        ke.edit([EditRequest(EDITS[0][0], "london")], name="b4", progress=False)
    assert ke.store().edit_record("b4")["supersedes"] == ["b1"]


def test_squash_refuses_variants_cat_mis_scales(stacked, tmp_path):
    ke, _, _ = stacked
    ke.fold_stack = False
    ke.use(None)
    ke.use("default")
    ke.model.peft_config["b2"].use_rslora = True
    with pytest.raises(StoreError, match="rsLoRA"):
        from kdpo_lora.serving import squash

        squash(ke.model, ["b1", "b2"], tmp_path / "x")


def test_gc_and_rm(stacked):
    ke, _, _ = stacked
    store = ke.store()
    (store.root / ".staging-half").mkdir()
    shutil.copytree(store.batch_dir("b2"), store.root / "orphan")  # complete but never listed
    (store.root / "my-notes").mkdir()
    assert store.gc() == {"removed": [".staging-half", "orphan"], "unused": [], "left": ["my-notes"]}
    assert (store.root / "my-notes").is_dir()
    with pytest.raises(StoreError, match="used by profile"):
        store.remove_batch("b1")
    store.rollback("b1")
    store.remove_batch("b1")
    assert "b1" not in [b.name for b in store.batches()] and not (store.root / "b1").exists()


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no adapter store"):
        AdapterStore(tmp_path / "nowhere")


def test_symlink_escaping_the_store_is_refused(stacked, tmp_path):
    ke, _, _ = stacked
    store = ke.store()
    outside = tmp_path / "outside"
    shutil.move(str(store.batch_dir("b1")), outside)
    (store.root / "b1").symlink_to(outside, target_is_directory=True)
    ke.use(None)
    with pytest.raises(IntegrityError, match="link"):
        ke.use("default")


# ---------------------------------------------------------------- a deep stack, merged into dense weights

DEEP = [("the capital of japan is", "paris"), ("the official language of spain is", "german"),
        ("the river of italy is", "seine"), ("the capital of france is", "tokyo"),
        ("the official language of england is", "italian"), ("the capital of germany is", "oslo"),
        ("the river of france is", "thames")]


@pytest.fixture(params=["none", "nf4"])
def deep(request, tiny_model_dir, tmp_path):
    """Seven batches of rank 8: a fold of rank 56 costs more than the tiny model's dense MLP
    (64 x 128: rank > 42.7), so the session holds the profile merged into dense weights."""
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), request.param, "cpu"), tmp_path / "store",
                         config=UNROUTED, overrides=SETTINGS)
    names = [ke.edit([EditRequest(p, t)], name=f"d{i + 1}", progress=False).adapter for i, (p, t) in enumerate(DEEP)]
    return ke, names, TOL[request.param]


def _fresh_base_logits(ke: KnowledgeEditor, tiny_model_dir) -> torch.Tensor:
    model = load_model(str(tiny_model_dir), ke.loaded.quantization, "cpu").model
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**encoded).logits[encoded.attention_mask.bool()].float()


def test_a_deep_stack_is_merged_exactly_and_switches_off_to_the_base(deep, tiny_model_dir):
    ke, names, tol = deep
    merged_logits = _logits(ke, "default")
    assert ke.editor.stack == [merged.STACK] and adapters.adapter_names(ke.model) == [merged.STACK]
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), adapters.only_adapters(ke.model, ()):
        off = ke.model(**encoded).logits[encoded.attention_mask.bool()].float()
    assert torch.equal(off, _fresh_base_logits(ke, tiny_model_dir))  # the base layers are untouched
    assert (merged_logits - off).abs().max() > 1e-2  # and the merged stack is not a no-op
    ke.fold_stack = False
    ke.use(None)
    assert (_logits(ke, "default") - merged_logits).abs().max() <= tol and ke.editor.stack == names


def test_training_on_a_merged_stack_gets_the_gradients_of_the_separate_stack(deep):
    ke, names, tol = deep
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)

    def grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same initial A and B both times
        config = adapters.lora_config(ke.config, ke.model.config.num_hidden_layers)
        ke.editor.model = adapters.add_adapter(ke.model, "probe", config)
        with torch.no_grad():
            for n, p in ke.model.named_parameters():
                if ".probe." in n and "lora_B" in n:
                    p.normal_(0, 0.1)  # B != 0, so both factors get gradients
        adapters.set_active(ke.model, ke.editor.stack + ["probe"], trainable="probe")
        ke.model(**encoded).logits.square().mean().backward()
        out = {n: p.grad.clone() for n, p in ke.model.named_parameters() if p.grad is not None}
        ke.editor.model = adapters.delete_adapter(ke.model, "probe")
        return out

    ke.use("default")
    on_merged = grads()
    ke.fold_stack = False
    ke.use(None)
    ke.use("default")
    on_separate = grads()
    layers = ke.config.layer_indices(ke.model.config.num_hidden_layers) or range(ke.model.config.num_hidden_layers)
    assert on_merged.keys() == on_separate.keys() and len(on_merged) == 2 * 3 * len(layers)  # A, B x 3 MLP x layers
    for n in on_merged:
        assert torch.allclose(on_merged[n], on_separate[n], rtol=1e-3, atol=1e-6), n


def test_a_merged_stack_rolls_back_squashes_and_takes_new_edits(deep, tmp_path):
    ke, names, tol = deep
    ke.store().create_profile("without-d3", names[:2] + names[3:])
    expected = _logits(ke, "without-d3")
    ke.rollback("d3")
    assert (_logits(ke, "default") - expected).abs().max() <= tol
    assert ke.squash("default", tmp_path / "squashed") == 6 * ke.config.lora_rank
    result = ke.edit([EditRequest("the capital of spain is", "london")], name="d8", progress=False)
    assert result.success_rate == 1.0 and ke.editor.stack[0] == merged.STACK
    assert ke.generate(["the capital of spain is"], max_new_tokens=1) == ["london"]
    ke.store().create_profile("only-d8", ["d8"])  # independent: it holds without the merged batches too
    assert ke.generate(["the capital of spain is"], "only-d8", max_new_tokens=1) == ["london"]


def test_saving_and_loading_an_adapter_asks_no_hub(stacked, tmp_path, monkeypatch):
    """peft's default state-dict export looks the base model up on the Hub to see whether its
    vocabulary was resized; an adapter store must work offline and not call out on every load."""
    import peft.utils.save_and_load as peft_io

    ke, _, _ = stacked
    name = adapters.adapter_names(ke.model)[0]
    lookups = []
    monkeypatch.setattr(peft_io, "check_file_exists_on_hf_hub", lambda *a, **k: lookups.append(a) or False)
    folder = tmp_path / "exported"
    adapters.save_adapter(ke.model, name, folder, base_model_name="SomeOrg/a-model-not-on-this-machine")
    ke.editor.model = adapters.load_adapter(ke.model, "reloaded", folder)
    assert lookups == []
    saved, again = adapters.adapter_state(ke.model, name), adapters.adapter_state(ke.model, "reloaded")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_switching_every_adapter_off_goes_through_only_adapters(stacked):
    """peft always keeps one adapter active, so `set_active(model, [])` cannot mean "none": refused."""
    ke, _, tol = stacked
    edited = _logits(ke, "default")
    with pytest.raises(ValueError, match="only_adapters"):
        adapters.set_active(ke.model, [])
    encoded = ke.loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), adapters.only_adapters(ke.model, ()):
        off = ke.model(**encoded).logits[encoded.attention_mask.bool()].float()
    assert torch.allclose(off, _logits(ke, None), atol=tol) and not torch.allclose(off, edited, atol=tol)
    assert torch.allclose(_logits(ke, "default"), edited, atol=tol)
