"""The OpenAI-compatible server, through a real uvicorn on 127.0.0.1 and the official client."""

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import uvicorn  # noqa: E402

from lorakit.inference.generation import Sampling  # noqa: E402
from lorakit.inference.engine import load_engine  # noqa: E402
from lorakit.inference.server import ServeSettings, create_app  # noqa: E402

KEY = "test-key"
QUESTIONS = ["normalize the date March 5", "who are you", "hello world", "convert the format of May 7",
             "the date is June", "I am a user"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, two_adapters, tmp_path_factory):
    adapters_dir = tmp_path_factory.mktemp("served")
    shutil.copytree(two_adapters["beta"], adapters_dir / "gamma")
    engine = load_engine(str(tiny_model_dir), [f"alpha={two_adapters['alpha']}", f"beta={two_adapters['beta']}"], device="cpu")
    reference = load_engine(str(tiny_model_dir), [f"alpha={two_adapters['alpha']}", f"beta={two_adapters['beta']}"], device="cpu")
    app = create_app(engine, ServeSettings(api_key=KEY, adapters_dir=str(adapters_dir), max_tokens_limit=64,
                                           max_body_bytes=20_000))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    yield {"url": base_url, "engine": engine, "reference": reference, "base": engine.base_name,
           "client": openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)}
    srv.should_exit = True
    thread.join(timeout=10)


def _expected(server, question, model, max_tokens=12):
    adapter = None if model == server["base"] else model
    return server["reference"].chat([{"role": "user", "content": question}], adapter, Sampling(max_new_tokens=max_tokens)).text


def _ask(client, model, question, max_tokens=12):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=max_tokens, temperature=0)
    return r


def test_models_and_chat_per_adapter_match_generate(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == [server["base"], "alpha", "beta"]
    answers = {}
    for model in ids:
        r = _ask(server["client"], model, QUESTIONS[0])
        assert r.choices[0].message.content == _expected(server, QUESTIONS[0], model)
        assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        answers[model] = r.choices[0].message.content
    assert len(set(answers.values())) == 3


def test_streaming_yields_the_same_text(server):
    stream = server["client"].chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                                      max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(server, QUESTIONS[1], "alpha")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    comp = server["client"].completions.create(model="beta", prompt="hello world", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in server["client"].completions.create(
        model="beta", prompt="hello world", max_tokens=8, temperature=0, stream=True))
    assert comp.choices[0].text == streamed


def test_24_concurrent_requests_match_sequential_outputs(server):
    jobs = [(QUESTIONS[i % len(QUESTIONS)], [server["base"], "alpha", "beta"][i % 3]) for i in range(24)]
    want = [_expected(server, q, m) for q, m in jobs]
    before = _get(server, "/health").json()["batches"]
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda job: _ask(server["client"], job[1], job[0]).choices[0].message.content, jobs))
    assert got == want
    after = _get(server, "/health").json()["batches"]
    assert after - before < 24  # requests were batched together


class _Resp:
    def __init__(self, status, text):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _http(server, method, path, raw=None, key=KEY):
    headers = {"content-type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server["url"] + path, data=raw, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return _Resp(r.status, r.read().decode())
    except urllib.error.HTTPError as err:
        return _Resp(err.code, err.read().decode())


def _post(server, path, body=None, raw=None, key=KEY):
    return _http(server, "POST", path, raw if raw is not None else json.dumps(body).encode(), key)


def _get(server, path):
    return _http(server, "GET", path)


def test_bad_requests_get_openai_errors_and_the_server_keeps_working(server):
    good = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (dict(body={**good, "model": "nope"}), 404),
        (dict(raw=b'{"model": "alpha", "messages": ['), 400),
        (dict(body={**good, "max_tokens": "many"}), 400),
        (dict(body={**good, "messages": "hi"}), 400),
        (dict(body={"messages": good["messages"]}), 400),
        (dict(body={**good, "max_tokens": 10_000}), 400),
        (dict(body={**good, "messages": [{"role": "user", "content": "date " * 600}]}), 400),
        (dict(body={**good, "n": 3}), 400),
        (dict(body=good, key=None), 401),
        (dict(body=good, key="wrong"), 401),
        (dict(raw=json.dumps({**good, "pad": "x" * 30_000}).encode()), 413),
    ]
    for kwargs, status in cases:
        r = _post(server, "/v1/chat/completions", **kwargs)
        assert r.status_code == status, (kwargs.get("body") or str(kwargs.get("raw"))[:80], r.text)
        assert "message" in r.json()["error"]
    assert _ask(server["client"], "beta", QUESTIONS[2]).choices[0].message.content == _expected(server, QUESTIONS[2], "beta")


def test_adapter_management(server):
    r = _post(server, "/v1/adapters", {"name": "gamma"})
    assert r.status_code == 200, r.text
    assert "gamma" in [m.id for m in server["client"].models.list().data]
    assert _ask(server["client"], "gamma", QUESTIONS[0]).choices[0].message.content == _expected(server, QUESTIONS[0], "beta")
    assert _post(server, "/v1/adapters", {"name": "../alpha"}).status_code == 400  # never an arbitrary path
    assert _post(server, "/v1/adapters", {"name": "missing"}).status_code == 400
    assert _http(server, "DELETE", "/v1/adapters/gamma").status_code == 200
    assert _post(server, "/v1/chat/completions", {"model": "gamma", "messages": [{"role": "user", "content": "hi"}]}).status_code == 404
    assert _get(server, "/health").json()["adapters"] == ["alpha", "beta"]


@pytest.fixture
def slow_engine(server):
    """The served engine at ~30 ms per decoding step, and every batch's outputs recorded."""
    engine, outputs = server["engine"], []
    hook = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.03))
    run = engine.run
    engine.run = lambda requests: outputs.extend(run(requests)) or outputs[-len(requests):]
    yield outputs
    hook.remove()
    del engine.run  # the method again


def _long_question(server) -> str:
    """A question some adapter answers with all 64 tokens when nobody stops it."""
    for q in QUESTIONS:
        out = server["reference"].chat([{"role": "user", "content": q}], "alpha", Sampling(max_new_tokens=64))
        if out.finish_reason == "length":
            return q
    pytest.fail("no question runs to 64 tokens")


def _wait_for(outputs, n=1, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(outputs) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(outputs) >= n, "the generation did not end"
    return outputs[n - 1]


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, slow_engine):
    q = _long_question(server)
    stream = server["client"].chat.completions.create(model="alpha", messages=[{"role": "user", "content": q}],
                                                      max_tokens=64, temperature=0, stream=True)
    read = 0
    for _ in stream:
        read += 1
        if read == 4:
            break
    stream.close()  # the client goes away with ~60 tokens still to come
    out = _wait_for(slow_engine)
    assert out.finish_reason == "cancelled" and out.completion_tokens <= read + 5, (out.finish_reason, out.completion_tokens)
    assert _ask(server["client"], "alpha", QUESTIONS[0]).choices[0].message.content == _expected(server, QUESTIONS[0], "alpha")


def test_a_client_that_disconnects_before_a_whole_answer_stops_its_generation(server, slow_engine):
    q = _long_question(server)
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": q}], "max_tokens": 64}).encode()
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.4)  # ~10 of the 64 steps
    out = _wait_for(slow_engine)
    assert out.finish_reason == "cancelled" and out.completion_tokens < 32, (out.finish_reason, out.completion_tokens)
