"""Shared fixtures: a tiny randomly initialised Llama with a word-level tokenizer, fp32 and NF4.

The tiny model is built from a config (no download); the word-level tokenizer makes token
boundaries obvious, so alignment tests can reason about exact positions.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

WORDS = (
    "the a of is in city capital country language river tower bridge located official spoken by people "
    "paris rome london berlin tokyo madrid france italy england germany japan spain english french german "
    "italian japanese spanish eiffel colosseum big ben brandenburg gate fuji prado museum mount river seine "
    "thames tiber was born known for and to on at as with from it its this that new york lisbon oslo"
).split()


# the store's and the editor's mechanics on one shared stack (the defaults route by subject)
UNROUTED = "unrouted"


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def make_model(seed: int = 0, vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # a random init is nearly uniform; scale the head so argmaxes are decisive and tests meaningful
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture()
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_model():
    from kdpo_lora.loading import prepare_model

    return prepare_model(make_model())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model saved as a Hugging Face folder (so it loads through `load_model`, NF4 too)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A second tiny model with different weights: a foreign base for adapter-refusal tests."""
    folder = tmp_path_factory.mktemp("tiny-llama-other")
    make_model(seed=1).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def plain_config(**settings):
    """The loop's mechanics without the recommended set-up's extras (routing, prefixes, margin, subject
    swaps, lower layers left out): what the unit tests of the loop reason about."""
    from kdpo_lora.config import EditConfig

    plain = dict(routing="none", context_prefixes=0, margin=0.0, preserve_weight=0.0, skip_lower_layers=0.0,
                 learning_rate=1e-4)
    return EditConfig(**{**plain, **settings})
