"""`kdpo-lora serve` over a real socket on 127.0.0.1, driven by the official `openai` client, on the
embedded SmolLM2 (an instruct model: chat goes through its own template)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from kdpo_lora.loading import load_model
from kdpo_lora.requests import EditRequest
from kdpo_lora.server import Admin, Engine, create_app
from kdpo_lora.session import KnowledgeEditor

pytestmark = pytest.mark.slow
TOKEN = "test-admin-token-0123456789"
SCREENSHOT = __import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks" / "operator_page.png"
EDIT = EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower")
QUESTION = "The Eiffel Tower is located in the city of"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A store with the edit in profile `default` and an empty profile `plain`, served on a free port."""
    import uvicorn

    store = tmp_path_factory.mktemp("serve") / "store"
    ke = KnowledgeEditor(load_model("smollm2-135m", "nf4", "cpu"), store)
    ke.edit([EDIT], name="eiffel-rome", progress=False)
    ke.store().create_profile("plain", [])
    port = _free_port()
    engine = Engine(ke)
    admin = Admin(engine, TOKEN, lambda: KnowledgeEditor(load_model("smollm2-135m", "nf4", "cpu"), store))
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, admin), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert uv.started
    yield f"http://127.0.0.1:{port}", ke
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_every_profile_is_a_model(client):
    assert sorted(m.id for m in client.models.list()) == ["default", "plain"]


def test_completions_serve_the_edit_only_in_its_profile_and_say_which_batches(client, server):
    edited = client.completions.create(model="default", prompt=QUESTION, max_tokens=4)
    plain = client.completions.create(model="plain", prompt=QUESTION, max_tokens=4)
    assert edited.choices[0].text.strip().startswith("Rome") and not plain.choices[0].text.strip().startswith("Rome")
    assert edited.model_extra["kdpo_batches"] == ["eiffel-rome"] and plain.model_extra["kdpo_batches"] == []
    assert edited.usage.completion_tokens == 4 and edited.choices[0].finish_reason == "length"
    # a prompt naming no edited subject gets the unedited model's answer, exactly
    other = "The capital of France is"
    same = [client.completions.create(model=m, prompt=other, max_tokens=6).choices[0].text for m in ("default", "plain")]
    assert same[0] == same[1]
    # the server's answers are the Python API's
    assert edited.choices[0].text == server[1].generate([QUESTION], "default", max_new_tokens=4)[0]


def test_chat_goes_through_the_chat_template(client, server):
    messages = [{"role": "user", "content": "Complete the sentence: The Eiffel Tower is located in the city of"}]
    answer = client.chat.completions.create(model="default", messages=messages, max_tokens=24)
    text = answer.choices[0].message.content
    assert answer.choices[0].message.role == "assistant" and text and answer.usage.prompt_tokens > 10
    assert answer.model_extra["kdpo_batches"] == ["eiffel-rome"]  # routed: the chat names the subject
    tokenizer = server[1].loaded.tokenizer
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(tokenizer(templated).input_ids)


def test_streaming_gives_the_same_text_as_one_answer(client):
    whole = client.completions.create(model="default", prompt=QUESTION, max_tokens=8).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="default", prompt=QUESTION, max_tokens=8,
                                                                   stream=True)]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) >= 2
    messages = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=8, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    once = client.chat.completions.create(model="default", messages=messages, max_tokens=8).choices[0].message.content
    assert streamed == once and chunks[-1].choices[0].finish_reason == "stop"


def test_stop_sequences_cut_the_answer(client):
    full = client.completions.create(model="plain", prompt="One, two, three, four,", max_tokens=12).choices[0].text
    word = full.strip().split()[0]
    cut = client.completions.create(model="plain", prompt="One, two, three, four,", max_tokens=12, stop=[word])
    assert cut.choices[0].text == full[:full.index(word)] and cut.choices[0].finish_reason == "stop"


def _post(url: str, body: bytes | None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", json.dumps({"model": "ghost", "prompt": "x"}).encode(), 404, "does not exist"),
    ("/v1/completions", json.dumps({"model": "default", "prompt": "x", "max_tokens": 10 ** 9}).encode(), 400,
     "max_tokens"),
    ("/v1/completions", json.dumps({"model": "default", "prompt": "x", "n": 2}).encode(), 400, "n = 1"),
    ("/v1/completions", json.dumps({"model": "default", "prompt": ""}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "default", "prompt": "x " * 500_000}).encode(), 400, "context"),
    ("/v1/chat/completions", json.dumps({"model": "default", "messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "default", "messages": [{"role": "robot", "content": "x"}]}).encode(),
     400, "role"),
    ("/v1/chat/completions", json.dumps({"model": "default", "messages": [{"role": "user", "content": "x"}],
                                         "temperature": -1}).encode(), 400, "temperature"),
])
def test_bad_requests_get_a_4xx_with_a_json_error(server, path, body, status, words):
    code, answer = _post(server[0] + path, body)
    assert code == status and words in answer["error"]["message"], answer


# --------------------------------------------------------------------------- the admin API


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (".lock", "audit.jsonl")}


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", TOKEN + "x"])
def test_the_admin_api_refuses_without_the_token_and_changes_nothing(server, token):
    url, ke = server
    before = snapshot(ke.store_path)
    for path, body in (("/admin/profiles", None), ("/admin/rollback", b'{"profile": "default", "batch": "eiffel-rome"}'),
                       ("/admin/edits", json.dumps({"profile": "default", "requests": [EDIT.to_dict()]}).encode())):
        code, answer = _post(url + path, body, token)
        assert code == 401 and "admin token" in answer["error"]["message"], (path, answer)
    assert snapshot(ke.store_path) == before


def test_without_a_token_configured_there_is_no_admin_api(server):
    with_admin = {r.path for r in create_app(Engine(server[1]), Admin(Engine(server[1]), TOKEN, None)).routes}
    without = {r.path for r in create_app(Engine(server[1])).routes}  # what `serve` runs without a token file
    assert "/admin/edits" in with_admin and not [p for p in without if p.startswith("/admin")]


def _wait(url: str, job: str) -> dict:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        code, state = _post(f"{url}/admin/jobs/{job}", None, TOKEN)
        assert code == 200
        if state["status"] in ("stored", "failed"):
            return state
        time.sleep(1)
    raise AssertionError("the edit job did not finish")


def test_an_edit_through_the_admin_api_is_served_from_the_next_request_and_rolls_back_exactly(server, client):
    url, ke = server
    prompt, other = "The Colosseum is located in the city of", "The capital of Japan is"
    code, created = _post(url + "/admin/profiles", json.dumps({"profile": "ops", "copy_from": "plain"}).encode(), TOKEN)
    assert code == 200 and "ops" in [m.id for m in client.models.list()]
    before = {p: client.completions.create(model="ops", prompt=p, max_tokens=4).choices[0].text for p in (prompt, other)}
    record = {"prompt": prompt, "target_new": "Madrid", "subject": "The Colosseum", "aliases": ["Flavian Amphitheatre"]}
    code, job = _post(url + "/admin/edits", json.dumps({"profile": "ops", "requests": [record],
                                                        "name": "colosseum-madrid"}).encode(), TOKEN)
    assert code == 202 and job["status"] in ("queued", "running")
    state = _wait(url, job["job"])
    assert state["status"] == "stored" and state["batch"] == "colosseum-madrid", state
    edited = client.completions.create(model="ops", prompt=prompt, max_tokens=4)
    assert edited.choices[0].text.strip().startswith("Madrid") and edited.model_extra["kdpo_batches"] == ["colosseum-madrid"]
    assert client.completions.create(model="ops", prompt=other, max_tokens=4).choices[0].text == before[other]
    alias = client.completions.create(model="ops", prompt="The Flavian Amphitheatre is in", max_tokens=1)
    assert alias.model_extra["kdpo_batches"] == ["colosseum-madrid"]  # routed by the alias the edit was given
    code, listed = _post(url + "/admin/profiles", None, TOKEN)
    [ops] = [p for p in listed["profiles"] if p["profile"] == "ops"]
    assert ops["batches"] == [{"batch": "colosseum-madrid", "facts": [{**record}]}]
    code, _ = _post(url + "/admin/rollback", json.dumps({"profile": "ops", "batch": "colosseum-madrid"}).encode(), TOKEN)
    assert code == 200
    assert client.completions.create(model="ops", prompt=prompt, max_tokens=4).choices[0].text == before[prompt]
    code, _ = _post(url + "/admin/apply", json.dumps({"profile": "ops", "batch": "colosseum-madrid"}).encode(), TOKEN)
    assert code == 200 and client.completions.create(model="ops", prompt=prompt, max_tokens=4).choices[0].text == \
        edited.choices[0].text
    log = [json.loads(line) for line in (ke.store_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["outcome"]) for e in log][-4:] == [("profile", "done"), ("edit", "stored"),
                                                                ("rollback", "done"), ("apply", "done")]
    assert TOKEN not in (ke.store_path / "audit.jsonl").read_text()
    assert ke.store().verify(ke.fingerprint) == []


@pytest.mark.parametrize("path, body, words", [
    ("/admin/edits", {"profile": "ops", "requests": [{"prompt": "x"}]}, "target_new"),
    ("/admin/edits", {"profile": "../../etc", "requests": [EDIT.to_dict()]}, "invalid profile name"),
    ("/admin/edits", {"profile": "ops", "requests": [EDIT.to_dict()], "name": "../escape"}, "invalid batch name"),
    ("/admin/rollback", {"profile": "default", "batch": "../../etc"}, "invalid batch name"),
    ("/admin/rollback", {"profile": "default"}, "'batch' is required"),
    ("/admin/apply", {"profile": "ghost", "batch": "eiffel-rome"}, "no profile"),
])
def test_bad_admin_requests_are_refused_and_change_nothing(server, path, body, words):
    url, ke = server
    before = snapshot(ke.store_path)
    code, answer = _post(url + path, json.dumps(body).encode(), TOKEN)
    assert 400 <= code < 500 and words in answer["error"]["message"], answer
    assert snapshot(ke.store_path) == before


def test_200_requests_in_flight_while_an_edit_trains_and_a_rollback_happens(server):
    """Every answer is the one its batches give (so it saw one consistent profile), nothing is lost,
    and the store verifies."""
    from concurrent.futures import ThreadPoolExecutor

    url, ke = server
    eiffel, louvre = QUESTION, "The Louvre is located in the city of"
    _post(url + "/admin/profiles", json.dumps({"profile": "storm", "copy_from": "default"}).encode(), TOKEN)

    def ask(prompt: str, model: str = "storm") -> tuple[str, tuple[str, ...]]:
        code, answer = _post(url + "/v1/completions", json.dumps({"model": model, "prompt": prompt,
                                                                  "max_tokens": 4}).encode())
        assert code == 200, answer
        return answer["choices"][0]["text"], tuple(answer["kdpo_batches"])

    expected = {(eiffel, ("eiffel-rome",)): ask(eiffel, "default")[0], (eiffel, ()): ask(eiffel, "plain")[0],
                (louvre, ()): ask(louvre, "plain")[0]}
    code, job = _post(url + "/admin/edits", json.dumps({"profile": "storm", "name": "louvre-berlin", "requests": [
        {"prompt": louvre, "target_new": "Berlin", "subject": "The Louvre"}]}).encode(), TOKEN)
    assert code == 202
    prompts = [(eiffel, louvre, "The capital of Japan is")[i % 3] for i in range(200)]
    with ThreadPoolExecutor(200) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        while sum(f.done() for f in futures) < 60:
            time.sleep(0.05)
        training = _post(f"{url}/admin/jobs/{job['job']}", None, TOKEN)[1]["status"]
        code, _ = _post(url + "/admin/rollback", json.dumps({"profile": "storm", "batch": "eiffel-rome"}).encode(), TOKEN)
        assert code == 200
        answers = [f.result() for f in futures]
    assert _wait(url, job["job"])["status"] == "stored" and training in ("queued", "running", "stored")
    expected[(louvre, ("louvre-berlin",))] = ask(louvre)[0]
    expected[("The capital of Japan is", ())] = ask("The capital of Japan is", "plain")[0]
    seen = {(p, batches) for p, (_, batches) in zip(prompts, answers)}
    assert (eiffel, ("eiffel-rome",)) in seen and (eiffel, ()) in seen  # the rollback happened mid-flight
    for prompt, (text, batches) in zip(prompts, answers):
        assert text == expected[(prompt, batches)], (prompt, batches, text)
    assert ke.store().profile("storm") == ["louvre-berlin"] and ke.store().verify(ke.fingerprint) == []
    assert ke.store().profile("default") == ["eiffel-rome"]


def test_export_for_vllm_and_the_router_in_front_of_an_upstream_server(server, client, tmp_path):
    """`store export --for vllm` writes one LoRA module per routed batch and a routing table; `serve
    --upstream` routes for a server that takes the modules by name: here kdpo-lora's own (a stored
    batch's name serves that batch alone, and an empty profile "base" the unedited model)."""
    import uvicorn
    from openai import OpenAI
    from safetensors.torch import load_file

    from kdpo_lora.proxy import Routes, create_proxy

    url, ke = server
    table = ke.export_vllm("default", tmp_path / "vllm")
    module = tmp_path / "vllm" / "eiffel-rome"
    config = json.loads((module / "adapter_config.json").read_text())
    assert table["order"] == ["eiffel-rome"] and table["modules"]["eiffel-rome"][0]["target_new"] == "Rome"
    assert config["peft_type"] == "LORA" and config["r"] <= 64 and not config["use_dora"]
    assert {str(t.dtype) for t in load_file(str(module / "adapter_model.safetensors")).values()} == {"torch.bfloat16"}
    assert f"--lora-modules eiffel-rome={module.resolve()}" in table["vllm"] and "--served-model-name base" in table["vllm"]
    if "base" not in ke.store().profiles():
        ke.store().create_profile("base", [])
    port = _free_port()
    proxy = uvicorn.Server(uvicorn.Config(create_proxy(Routes(tmp_path / "vllm"), url), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=proxy.run, daemon=True)
    thread.start()
    while not proxy.started:
        time.sleep(0.05)
    try:
        routed = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in routed.models.list()] == ["default"]
        for prompt in (QUESTION, "The capital of Japan is"):
            direct = client.completions.create(model="default", prompt=prompt, max_tokens=6)
            via = routed.completions.create(model="default", prompt=prompt, max_tokens=6)
            assert via.choices[0].text == direct.choices[0].text and via.model == "default"
            assert via.model_extra["kdpo_batches"] == direct.model_extra["kdpo_batches"]
        pieces = routed.completions.create(model="default", prompt=QUESTION, max_tokens=6, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == direct_text(client, QUESTION)
        messages = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
        assert routed.chat.completions.create(model="default", messages=messages, max_tokens=8).choices[0].message.content \
            == client.chat.completions.create(model="default", messages=messages, max_tokens=8).choices[0].message.content
        code, answer = _post(f"http://127.0.0.1:{port}/v1/completions", json.dumps({"model": "ghost", "prompt": "x"}).encode())
        assert code == 404 and "does not exist" in answer["error"]["message"]
    finally:
        proxy.should_exit = True
        thread.join(timeout=30)


def direct_text(client, prompt: str) -> str:
    return client.completions.create(model="default", prompt=prompt, max_tokens=6).choices[0].text


def _start_cli_server(store, token_file, port: int):
    import os
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "kdpo_lora.cli", "serve", "--store", str(store), "--port", str(port),
                                "--admin-token-file", str(token_file)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("the server did not start")


def test_a_server_killed_while_an_edit_trains_loses_nothing_and_the_job_can_be_resubmitted(tmp_path):
    import signal

    from kdpo_lora.store import AdapterStore

    store, token_file, port = tmp_path / "store", tmp_path / "token", _free_port()
    token_file.write_text(TOKEN)
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"profile": "default", "name": "louvre-berlin", "requests": [
        {"prompt": "The Louvre is located in the city of", "target_new": "Berlin", "subject": "The Louvre"}]}).encode()
    process = _start_cli_server(store, token_file, port)
    try:
        code, job = _post(url + "/admin/edits", body, TOKEN)
        assert code == 202
        while _post(f"{url}/admin/jobs/{job['job']}", None, TOKEN)[1]["status"] == "queued":
            time.sleep(0.2)
        time.sleep(3)  # training (or loading its own copy of the base to train on)
        assert _post(f"{url}/admin/jobs/{job['job']}", None, TOKEN)[1]["status"] == "running"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    process = _start_cli_server(store, token_file, port)
    try:
        code, answer = _post(f"{url}/admin/jobs/{job['job']}", None, TOKEN)
        assert code == 404 and "submit it again" in answer["error"]["message"]
        if (store / "manifest.json").exists():  # the store verifies and holds no half-written batch
            assert AdapterStore(store).verify() == [] and AdapterStore(store).profiles().get("default", []) == []
        code, job = _post(url + "/admin/edits", body, TOKEN)
        assert code == 202 and _wait(url, job["job"])["status"] == "stored"
        assert AdapterStore(store).profile("default") == ["louvre-berlin"] and AdapterStore(store).verify() == []
    finally:
        process.kill()


# --------------------------------------------------------------------------- the operator page, in a real browser


def test_the_operator_page_in_a_real_browser(server, tmp_path):
    """Headless Chromium (Debian's chromium and chromium-driver, installed by .ci/run): enter the token,
    see the batches and their facts, compare a prompt, roll back with confirmation, see the answer change."""
    import os
    import shutil

    if not shutil.which("chromedriver") and not os.environ.get("CI"):
        pytest.skip("chromium-driver is not installed here (.ci/run installs it)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, ke = server
    ke.store().apply("eiffel-rome", "plain")  # a profile of its own for the page to roll back
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    from selenium.common.exceptions import StaleElementReferenceException

    wait = WebDriverWait(browser, 600, ignored_exceptions=[StaleElementReferenceException])  # the page re-renders
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "connect").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "connected"))
        plain = browser.find_element(By.CSS_SELECTOR, '.profile[data-profile="plain"]')
        assert "eiffel-rome" in plain.text and "The Eiffel Tower is located in the city of -> Rome" in plain.text

        def compare() -> tuple[str, str, str]:
            for answer in ("base", "edited"):
                browser.execute_script(f"document.getElementById('{answer}').textContent = ''")
            browser.find_element(By.ID, "compare").click()
            wait.until(lambda b: b.find_element(By.ID, "edited").text not in ("", "..."))
            return tuple(browser.find_element(By.ID, i).text.strip() for i in ("base", "edited", "batches"))

        browser.find_element(By.CSS_SELECTOR, '#compare-profile option[value="plain"]').click()
        base, edited, batches = compare()
        assert edited.startswith("Rome") and not base.startswith("Rome") and batches == "eiffel-rome"
        browser.save_screenshot(str(SCREENSHOT if os.environ.get("KDPO_SCREENSHOT") else tmp_path / "operator_page.png"))
        browser.find_element(By.CSS_SELECTOR, '.profile[data-profile="plain"] [data-batch="eiffel-rome"] .rollback').click()
        wait.until(ready.alert_is_present()).accept()
        wait.until(lambda b: "eiffel-rome" not in b.find_element(By.CSS_SELECTOR, '.profile[data-profile="plain"]').text)
        after_base, after, batches = compare()
        assert after == after_base == base and batches == "none"  # the unedited answer, exactly
        assert ke.store().profile("plain") == [] and ke.store().profile("default") == ["eiffel-rome"]
    finally:
        browser.quit()
