"""Request readers: every supported format, the shipped samples, and clear errors on malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdpo_lora.errors import RequestError
from kdpo_lora.requests import EditRequest, check_batch, parse_record, read_requests, request_from_dict, write_requests

SAMPLES = Path(__file__).resolve().parent.parent / "kdpo_lora" / "data" / "samples"


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.jsonl")))
def test_every_shipped_sample_reads(name):
    requests = read_requests(SAMPLES / name)
    assert len(requests) >= 20
    assert all(r.prompt and r.target_new for r in requests)


def test_normalised_schema_fields(tmp_path):
    requests = read_requests(SAMPLES / "counterfact_portability.jsonl")
    first = requests[0]
    assert len(first.rephrase_prompts) == 2 and len(first.locality) == 10 and first.portability
    assert first.locality[0].answer == first.target_true
    # round trip through the normalised schema
    write_requests(requests[:5], tmp_path / "out.jsonl")
    assert read_requests(tmp_path / "out.jsonl") == requests[:5]
    assert request_from_dict(first.to_dict()) == first


def test_aliases_are_read_kept_and_name_the_subject_in_the_prompt(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "The Big Apple's mayor is", "target_new": "Ann", "subject": "the big apple",
                                "aliases": ["New York City", " NYC ", "NYC"]}) + "\n")
    [request] = read_requests(path)
    assert request.aliases == ("New York City", "NYC")  # spacing normalised, repeats dropped
    assert [request.with_alias(a) for a in request.aliases] == ["New York City's mayor is", "NYC's mayor is"]
    write_requests([request], tmp_path / "out.jsonl")
    assert read_requests(tmp_path / "out.jsonl") == [request]


def test_rome_counterfact_json(tmp_path):
    record = {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                              "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks the language"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, a native"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    (req,) = read_requests(path)
    assert req.prompt == "The mother tongue of Danielle Darrieux is"
    assert (req.target_new, req.target_true, req.subject) == ("English", "French", "Danielle Darrieux")
    assert [p.answer for p in req.locality] == ["French", "French"]
    assert req.rephrase_prompts == ("Shayna does this. Danielle Darrieux speaks the language",)


def test_mend_zsre_json(tmp_path):
    record = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
              "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
              "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
              "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
              "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"}
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([record]))
    (req,) = read_requests(path)
    assert (req.prompt, req.target_new, req.target_true) == (record["src"], "University of Michigan",
                                                              "Illinois Institute of Technology")
    assert req.locality[0].answer == "Hugo Weaving" and req.locality[0].type == "nq"


def test_easyedit_knowedit_json(tmp_path):
    records = [
        {"subject": "Epaspidoceras", "prompt": "Which family does Epaspidoceras belong to?", "target_new": "Noctuidae",
         "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
         "portability": {"Reasoning": [{"prompt": "What is the common name?", "ground_truth": [["Owlet moths"]]}]},
         "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]}},
        {"case_id": 3, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
         "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
         "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"},
    ]
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps(records))
    first, second = read_requests(path)
    assert first.target_true == "Aspidoceratidae" and first.portability[0].answer == "Owlet moths"
    assert first.locality[0].type == "Relation_Specificity" and first.locality[0].answer == "genus"
    assert second.locality[0].prompt == "John Lennon performs on the" and second.case_id == "3"


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "target_new": "b"}\n{"prompt": "x"', "line 2: invalid JSON"),
    ('{"prompt": "a"}\n', "line 1: missing field 'target_new'"),
    ('{"prompt": "a", "target_new": 5}\n', "line 1: field 'target_new': expected str, got int"),
    ('{"prompt": "a", "target_new": "   "}\n', "line 1: field 'target_new': must not be empty"),
    ('{"prompt": "", "target_new": "b"}\n', "field 'prompt': must not be empty"),
    ('[1, 2]\n', "line 1: expected a JSON object, got list"),
    ('{"prompt": "a", "target_new": "b", "rephrase_prompts": "x", "locality": [{"prompt": "p"}]}\n',
     "line 1: field 'locality[0].answer'"),
    ('{"prompt": "a", "target_new": "b", "locality": 7}\n', "field 'locality': expected a list"),
    ("\n\n", "contains no edit requests"),
    ('{"prompt": "a", "target_new": "b", "subject": "a", "aliases": [1]}\n', "field 'aliases': expected a list of strings"),
    ('{"prompt": "a", "target_new": "b", "aliases": ["x"]}\n', "field 'aliases': other names of the subject need"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RequestError) as err:
        read_requests(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "target_new": "x"}\n')
    with pytest.raises(RequestError, match="not valid UTF-8"):
        read_requests(path)
    with pytest.raises(RequestError, match="no such request file"):
        read_requests(tmp_path / "missing.jsonl")


def test_duplicated_requests_in_one_batch_are_refused():
    with pytest.raises(RequestError, match="edit the same prompt"):
        check_batch([EditRequest("The capital of X is", "A"), EditRequest("the  capital of x is", "B")])


texts = st.text(min_size=0, max_size=40)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["prompt", "target_new", "subject", "target_true", "rephrase_prompts",
                                        "locality", "portability", "requested_rewrite", "src", "alt", "loc",
                                        "loc_ans", "ground_truth", "case_id"]), json_values, max_size=8))
def test_parse_record_either_parses_or_raises_request_error(record):
    """Any JSON object: a valid request or a RequestError - never another exception."""
    try:
        request = parse_record(record)
    except RequestError as err:
        assert str(err)
        return
    assert request.prompt.strip() and request.target_new.strip()
    assert request == request_from_dict(request.to_dict())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_read_requests_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.jsonl"
    path.write_bytes(data)
    try:
        requests = read_requests(path)
    except RequestError:
        return
    assert requests and all(isinstance(r, EditRequest) for r in requests)
