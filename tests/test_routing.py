"""Subject routing: which batches serve a prompt, and that unrouted prompts get the base model exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kdpo_lora import adapters
from kdpo_lora.adapters import only_adapters
from kdpo_lora.config import resolve_config
from kdpo_lora.errors import ConfigError, IntegrityError, RequestError
from kdpo_lora.evaluate import score_targets
from kdpo_lora.loading import load_model
from kdpo_lora.requests import EditRequest, Probe
from kdpo_lora.routing import SubjectRouter, by_route
from kdpo_lora.session import KnowledgeEditor

SETTINGS = {"learning_rate": 5e-3, "beta": 1.0, "cycles": 10, "lora_rank": 8, "lora_alpha": 16}


def _request(prompt: str, target: str, subject: str | None) -> EditRequest:
    return EditRequest(prompt=prompt, target_new=target, subject=subject)


def test_the_router_matches_whole_subjects_ignoring_case_spacing_and_a_leading_the():
    router = SubjectRouter([
        ("a", [_request("The Eiffel Tower is in", "Rome", "The Eiffel Tower")]),
        ("b", [_request("Ben is in", "Oslo", "Ben")]),
        ("c", [_request("Big Ben is in", "Oslo", "Big Ben"), _request("Paris is in", "Spain", "Paris")]),
    ])
    assert router.route("eiffel   TOWER, a landmark, is in") == ["a"]
    assert router.route("Where is Big Ben?") == ["c"]  # "Ben" is a word there, but of a longer name
    assert router.route("Ben, Big Ben and Paris") == ["b", "c"]
    assert router.route("Bentley and Benjamin went to") == []  # but not inside other words
    assert router.route("Paris and the Eiffel Tower") == ["a", "c"]  # stack order, not match order
    assert router.route_all(["Ben is", "Eiffel Tower"]) == ["a", "b"]


def test_a_subject_inside_a_longer_name_does_not_route_and_every_route_says_why():
    router = SubjectRouter([("paris", [_request("Paris is the capital of", "Spain", "Paris")]),
                            ("ben", [_request("Ben lives in", "Oslo", "Ben")])])
    for prompt in ("Paris Hilton was born in", "Where is Big Ben?", "I met Ben Affleck in"):
        assert router.route(prompt) == [], prompt
    assert router.route("Yesterday Paris was rainy") == ["paris"]  # a capital that starts the sentence
    assert router.route("<|im_start|>user\nBen lives where?") == ["ben"]  # or a chat turn
    assert router.route("In the paris of the past, Ben") == ["paris", "ben"]
    assert router.explain("Is PARIS  near Ben's home?") == [("paris", "subject 'PARIS'"), ("ben", "subject 'Ben'")]
    always = SubjectRouter([("x", [_request("x is", "y", None)])])
    assert always.explain("anything") == [("x", "no subject (always on)")]


def test_an_alias_routes_like_its_subject_and_the_route_says_which_name_fired():
    nyc = EditRequest("New York City is located in", "Texas", subject="New York City", aliases=("NYC", "the Big Apple"))
    router = SubjectRouter([("nyc", [nyc]), ("paris", [_request("Paris is in", "Spain", "Paris")])])
    assert router.explain("Tell me about nyc.") == [("nyc", "alias 'nyc'")]
    assert router.explain("Where is the Big  Apple?") == [("nyc", "alias 'Big  Apple'")]
    assert router.explain("New York City or NYC?") == [("nyc", "subject 'New York City'")]
    assert router.route("The NYCB Theatre") == [] and router.route("I met NYC Smith") == []  # whole names only
    assert router.route("Big Apple and Paris") == ["nyc", "paris"]


def test_a_subject_is_named_with_other_accents_punctuation_middle_names_or_a_title_and_the_route_says_so():
    """The forms KnowEdit's alias probes use most, measured not to route CounterFact's neighbours (RESULTS 7)."""
    router = SubjectRouter([
        ("mj", [_request("Michael Jordan was born in", "Oslo", "Michael Jordan")]),
        ("felix", [_request("Félix Auger-Aliassime plays", "golf", "Félix Auger-Aliassime")]),
        ("twd", [_request("The Walking Dead, season 10 stars", "Ben", "The Walking Dead, season 10")]),
        ("biden", [_request("Joe Biden was born in", "Oslo", "Joe Biden")]),
    ])
    assert router.explain("Michael Jeffrey Jordan was born in") == [
        ("mj", "subject 'Michael Jordan' named 'Michael Jeffrey Jordan'")]
    assert router.route("Felix Auger Aliassime plays") == ["felix"]  # accents and the hyphen aside
    assert router.route("The Walking Dead (season 10) stars") == ["twd"]
    assert router.route("President Biden was born in") == ["biden"]
    assert router.route("Michael Phelps Jordan") == ["mj"]  # middle names are any capitalised words
    assert router.route("Johnny Biden was born in") == []  # another given name: not this subject's
    for other in ("Where is Jordan?", "Michael Phelps and Jill Biden", "Air Jordan shoes", "Felix was here"):
        assert router.route(other) == [], other


def test_a_batch_with_a_request_without_a_subject_is_always_on():
    router = SubjectRouter([("a", [_request("x is", "y", "Rome"), _request("z is", "w", None)]),
                            ("b", [_request("Oslo is", "y", "Oslo")])])
    assert router.route("nothing edited here") == ["a"]
    assert router.route("Oslo is in") == ["a", "b"]


def test_by_route_runs_each_group_once_with_its_adapters_and_keeps_the_order():
    calls = []

    def run(indices, names):
        calls.append((tuple(indices), names))
        return [f"{i}:{','.join(names)}" for i in indices]

    route = {"p0": ["a"], "p1": [], "p2": ["a"]}.get
    assert by_route(["p0", "p1", "p2"], route, run) == ["0:a", "1:", "2:a"]
    assert sorted(calls) == [((0, 2), ("a",)), ((1,), ())]
    assert by_route(["p0"], None, lambda idx, names: [names]) == [None]


def test_routing_must_be_a_known_value():
    with pytest.raises(ConfigError, match="routing"):
        resolve_config(None, overrides={"routing": "everything"})


@pytest.fixture()
def routed(tiny_model_dir, tmp_path):
    """An editor with the family's settings (configs/llama.yaml), which route by subject."""
    return KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), tmp_path / "store", overrides=SETTINGS)


def _logits(ke: KnowledgeEditor, prompts: list[str], target: str, route=None) -> torch.Tensor:
    rows = score_targets(ke.model, ke.loaded.tokenizer, prompts, [target] * len(prompts), route)
    return torch.tensor([r["logprob"] for r in rows])


def test_routed_edits_serve_only_prompts_naming_their_subject(routed):
    eiffel = _request("the eiffel tower is located in the city of", "rome", "eiffel tower")
    big_ben = _request("big ben is located in the city of", "tokyo", "big ben")
    first = routed.edit([eiffel], progress=False).adapter
    second = routed.edit([big_ben], progress=False).adapter
    assert routed.route(eiffel.prompt) == [first] and routed.route(big_ben.prompt) == [second]
    assert routed.generate([eiffel.prompt, big_ben.prompt], max_new_tokens=1) == ["rome", "tokyo"]

    unrelated = ["the colosseum is located in the city of", "the seine is a river in"]
    base = routed.generate(unrelated, profile=None, max_new_tokens=3)
    assert routed.generate(unrelated, max_new_tokens=3) == base
    with only_adapters(routed.model, ()):
        expected = _logits(routed, unrelated, "paris")
    assert torch.equal(_logits(routed, unrelated, "paris", routed.route), expected)  # exactly the base model
    with routed.serving([first, second]):  # every batch active, unrouted: the edits do reach them
        stacked = _logits(routed, unrelated, "paris")
    assert not torch.equal(stacked, expected)


def test_an_alias_given_to_an_edit_is_trained_served_and_kept_in_the_store(routed, tiny_model_dir, tmp_path):
    request = EditRequest("the eiffel tower is located in the city of", "rome", subject="eiffel tower",
                          aliases=("la dame de fer",))
    alias_prompt = "la dame de fer is located in the city of"
    assert routed.generate([alias_prompt], profile=None, max_new_tokens=1) != ["rome"]
    name = routed.edit([request], progress=False).adapter
    assert routed.router.explain(alias_prompt) == [(name, "alias 'la dame de fer'")]
    assert routed.generate([request.prompt, alias_prompt], max_new_tokens=1) == ["rome", "rome"]
    reopened = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), tmp_path / "store", overrides=SETTINGS)
    assert reopened.generate([alias_prompt], max_new_tokens=1) == ["rome"]
    assert reopened.route(alias_prompt) == [name]


def test_a_routed_batch_trains_on_the_batches_its_prompts_route_to(routed):
    first = routed.edit([_request("the eiffel tower is located in the city of", "rome", "eiffel tower")],
                        progress=False).adapter
    routed.edit([_request("big ben is located in the city of", "tokyo", "big ben")], progress=False)
    same_subject = [_request("the eiffel tower was born in", "tokyo", "eiffel tower")]
    # the earlier fact about the same subject is served with it, so it is held while the new one trains
    assert routed.stands_on(same_subject, routed.store().profile("default"), routed.config) == ([first], ["the eiffel tower is located in the city of"])
    third = routed.edit(same_subject, progress=False).adapter
    assert routed.route("the eiffel tower was born in") == [first, third]
    assert routed.generate(["the eiffel tower was born in", "the eiffel tower is located in the city of"],
                           max_new_tokens=1) == ["tokyo", "rome"]


def test_a_routed_batch_holds_the_earlier_facts_whose_prompts_name_its_subject(routed):
    eiffel = _request("the eiffel tower is located in the city of", "rome", "eiffel tower")
    first = routed.edit([eiffel], progress=False).adapter
    tower = [_request("the tower was born in", "tokyo", "tower")]
    assert routed.stands_on(tower, routed.store().profile("default"), routed.config) == ([first], [eiffel.prompt])
    second = routed.edit(tower, progress=False).adapter
    assert routed.route(eiffel.prompt) == [first, second]
    assert routed.generate([eiffel.prompt, tower[0].prompt], max_new_tokens=1) == ["rome", "tokyo"]


def test_a_routed_request_must_name_its_subject_and_nothing_is_stored_when_it_does_not(routed):
    routed.edit([_request("the eiffel tower is located in the city of", "rome", "eiffel tower")], progress=False)
    before = routed.store().profile("default")
    with pytest.raises(RequestError, match="does not name its subject"):
        routed.edit([_request("it is located in the city of", "oslo", "big ben")], progress=False)
    with pytest.raises(RequestError, match="needs each request's subject.*--routing none"):
        routed.edit([_request("big ben is located in the city of", "oslo", None)], progress=False)
    assert routed.store().profile("default") == before
    assert routed.generate(["the eiffel tower is located in the city of"], max_new_tokens=1) == ["rome"]


def test_a_routed_evaluation_switches_each_route_on_once(routed, monkeypatch):
    eiffel = _request("the eiffel tower is located in the city of", "rome", "eiffel tower")
    big_ben = _request("big ben is located in the city of", "tokyo", "big ben")
    first = routed.edit([eiffel], progress=False).adapter
    second = routed.edit([big_ben], progress=False).adapter
    switched = []
    only = adapters.only_adapters
    monkeypatch.setattr(adapters, "only_adapters", lambda model, names: switched.append(tuple(names)) or only(model, names))
    requests = [EditRequest(r.prompt, r.target_new, subject=r.subject, rephrase_prompts=(r.prompt.upper(),),
                            locality=(Probe("the seine is a river in", "france"),)) for r in (eiffel, big_ben)]
    rows = routed.evaluate(requests, generation=True)["rows"]
    assert [row["edit_success"] for row in rows] == [1.0, 1.0] and [row["locality"] for row in rows] == [1.0, 1.0]
    scored = [names for names in switched if names]  # () is the unedited model, for the locality probes
    assert Counter(scored) == {(first,): 2, (second,): 2}  # once to score every probe, once to generate


FACTS = [("the eiffel tower is located in the city of", "rome", "eiffel tower"),
         ("big ben is located in the city of", "tokyo", "big ben"),
         ("the colosseum is located in the city of", "oslo", "colosseum"),
         ("mount fuji is located in the country of", "spain", "mount fuji")]


@pytest.fixture()
def routed_store(routed):
    """A routed store of one batch per fact, and the probes that route to each batch (and to none)."""
    names = [routed.edit([_request(*fact)], progress=False).adapter for fact in FACTS]
    prompts = [p for p, _, _ in FACTS] + [p.upper() for p, _, _ in FACTS] + ["the seine is a river in"]
    return routed, names, prompts


def test_a_routed_profile_larger_than_max_loaded_serves_every_prompt_exactly_as_when_all_are_loaded(
        routed_store, tiny_model_dir):
    routed, names, prompts = routed_store
    assert sorted(adapters.adapter_names(routed.model)) == sorted(names)  # 4 <= max_loaded: all still in memory
    expected = _logits(routed, prompts, "paris", routed.route)
    generated = routed.generate(prompts, max_new_tokens=2)

    small = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), routed.store_path, overrides=SETTINGS,
                            max_loaded=1)
    small.use("default")
    assert adapters.adapter_names(small.model) == []  # nothing is loaded until a prompt routes to it
    assert torch.equal(_logits(small, prompts, "paris", small.route), expected)
    assert small.generate(prompts, max_new_tokens=2) == generated
    assert len(adapters.adapter_names(small.model)) == 1  # each batch was loaded for its prompts, then let go
    rows = small.evaluate([EditRequest(p, t, subject=s) for p, t, s in FACTS], generation=False)["rows"]
    assert [row["edit_success"] for row in rows] == [1.0] * len(FACTS)


def test_a_routed_edit_loads_the_batches_it_trains_on_and_unloads_the_least_recently_used(routed_store,
                                                                                          tiny_model_dir):
    routed, names, _ = routed_store
    small = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), routed.store_path, overrides=SETTINGS,
                            max_loaded=2)
    small.generate([FACTS[1][0], FACTS[2][0]], max_new_tokens=1)  # big ben, then the colosseum
    assert adapters.adapter_names(small.model) == [names[1], names[2]]
    third = small.edit([_request("the eiffel tower was born in", "tokyo", "eiffel tower")], progress=False).adapter
    # trained on top of the eiffel tower's batch, which was loaded for it; big ben's was the oldest
    assert set(adapters.adapter_names(small.model)) == {names[0], names[2], third}
    assert small.generate(["the eiffel tower was born in", FACTS[0][0], FACTS[1][0]], max_new_tokens=1) == \
        ["tokyo", "rome", "tokyo"]
    assert len(adapters.adapter_names(small.model)) <= 3  # at most max_loaded beyond the batches one prompt needs


def test_a_tampered_routed_batch_is_refused_when_it_is_loaded_and_the_others_still_serve(routed_store,
                                                                                       tiny_model_dir):
    routed, names, _ = routed_store
    weights = routed.store().batch_dir(names[1]) / adapters.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    fresh = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), routed.store_path, overrides=SETTINGS)
    assert fresh.generate([FACTS[0][0]], max_new_tokens=1) == ["rome"]
    with pytest.raises(IntegrityError, match=f"{names[1]}.*modified"):
        fresh.generate([FACTS[1][0]], max_new_tokens=1)
    assert fresh.store().profile("default") == names and adapters.adapter_names(fresh.model) == [names[0]]


def test_a_subject_is_named_by_a_short_or_full_given_name_an_initial_a_nickname_or_without_its_suffix():
    """The rest of KnowEdit's alias forms (RESULTS 7), each with a prompt about someone else that must not route."""
    router = SubjectRouter([
        ("jim", [_request("Jim Carrey was born in", "Oslo", "Jim Carrey")]),
        ("simpson", [_request("James Young Simpson worked in", "Oslo", "James Young Simpson")]),
        ("clint", [_request("Clint Eastwood was born in", "Oslo", "Clint Eastwood")]),
        ("chelsea", [_request("Chelsea F.C. plays in", "Oslo", "Chelsea F.C.")]),
        ("harry", [_request("Prince Harry, Duke of Sussex lives in", "Oslo", "Prince Harry, Duke of Sussex")]),
        ("lanka", [_request("Sri Lanka is in", "Europe", "Sri Lanka")]),
        ("king", [_request("Martin Luther King Jr. was born in", "Oslo", "Martin Luther King Jr.")]),
        ("republic", [_request("Second Spanish Republic had its capital in", "Oslo", "Second Spanish Republic")]),
        ("ba", [_request("Ba F.C. plays in", "Oslo", "Ba F.C.")]),
    ])
    assert router.explain("James Carrey was born in") == [("jim", "subject 'Jim Carrey' named 'James Carrey'")]
    assert router.route("J. Young Simpson worked in") == ["simpson"]
    assert router.route("Jimmy Simpson worked in") == ["simpson"]
    assert router.route('Clinton "Clint" Eastwood was born in') == ["clint"]
    assert router.route("Chelsea Football Club plays in") == ["chelsea"]
    assert router.route("Chelsea plays in") == ["chelsea"]
    assert router.route("Prince Harry lives in") == ["harry"]
    assert router.route("Srilanka is in") == ["lanka"]
    assert router.route("Martin Luther King was born in") == ["king"]
    for other in ("O. J. Simpson was born in", "Second Polish Republic had its capital in", "Chelsea Clinton lives in",
                  "Adama Ba plays in", "Harry Potter lives in"):
        assert router.route(other) == [], other
