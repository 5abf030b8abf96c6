"""The authors' recipe: the dense reproduction in benchmarks/published_kdpo.py and `--config paper`."""

from __future__ import annotations

import copy

import torch

from benchmarks.published_kdpo import default_layer, published_edit
from kdpo_lora.config import resolve_config
from kdpo_lora.editor import Editor
from kdpo_lora.requests import EditRequest

from conftest import make_model, make_tokenizer

PROMPT, TARGET = "the capital of japan is", "rome"


def test_the_paper_layer_is_21_of_32_and_the_same_depth_elsewhere():
    from transformers import LlamaConfig

    class Shaped:
        def __init__(self, layers):
            self.config = LlamaConfig(num_hidden_layers=layers)

    assert default_layer(Shaped(32)) == 21 and default_layer(Shaped(30)) == 20 and default_layer(Shaped(3)) == 2


def test_a_dense_edit_writes_the_fact_and_restores_exactly():
    model, tokenizer = make_model(), make_tokenizer()
    before = model.model.layers[default_layer(model)].mlp.down_proj.weight.detach().clone()
    result = published_edit(model, tokenizer, PROMPT, TARGET, lr=1e-2, beta=1.0)
    assert result["success"] and result["layer"] == 2 and result["steps"] > 0
    result["restore"]()
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, before)


def test_sequential_edits_learn_at_a_fifth_and_the_loss_stop_ends_cycles_early():
    model, tokenizer = make_model(), make_tokenizer()
    assert published_edit(copy.deepcopy(model), tokenizer, PROMPT, TARGET, sequential=True, lr=1e-2)["lr"] == 2e-3
    full = published_edit(copy.deepcopy(model), tokenizer, PROMPT, TARGET, lr=1e-3, beta=1.0, cycles=2,
                          loss_threshold=0.0)
    stopped = published_edit(copy.deepcopy(model), tokenizer, PROMPT, TARGET, lr=1e-3, beta=1.0, cycles=2,
                             loss_threshold=10.0)  # every loss is below 10: no step is taken
    assert full["steps"] == 16 and stopped["steps"] == 0


def test_w_plus_two_delta_applies_the_trained_change_twice():
    model, tokenizer = make_model(), make_tokenizer()
    once, twice = copy.deepcopy(model), copy.deepcopy(model)
    layer = default_layer(model)
    original = model.model.layers[layer].mlp.down_proj.weight
    published_edit(once, tokenizer, PROMPT, TARGET, lr=1e-3, cycles=1)
    published_edit(twice, tokenizer, PROMPT, TARGET, lr=1e-3, cycles=1, delta_scale=2.0)
    delta = once.model.layers[layer].mlp.down_proj.weight - original
    assert delta.abs().max() > 0
    torch.testing.assert_close(twice.model.layers[layer].mlp.down_proj.weight, original + 2 * delta)


def test_the_paper_config_stops_per_cycle_and_scales_the_learning_rate_in_sequence(tiny_model, tokenizer, monkeypatch):
    rates = []
    real_adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda groups, **kw: rates.append(groups[0]["lr"]) or real_adam(groups, **kw))
    paper = resolve_config(None, "paper")
    editor = Editor(tiny_model, tokenizer, paper)
    first = editor.edit([EditRequest(PROMPT, TARGET)], progress=False)
    editor.edit([EditRequest("the capital of spain is", "oslo")], progress=False)
    assert rates == [1e-4, 2e-5]  # on top of the first batch: lr / 5
    # checked once per cycle: every cycle runs all its steps unless the loss stop ends it
    assert first.steps == first.cycles * paper.steps_per_cycle or min(first.losses) < paper.loss_threshold
