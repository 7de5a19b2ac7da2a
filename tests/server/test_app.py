"""The reference model service over loopback: OpenAI completions semantics checked against forward
passes of the same models in this process, auth, limits, adapter confinement, runtime LoRA and
Evo-Merging's merge sessions (merged server-side by ``lora_compose``)."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from evomerge.models.zoo.tiny_lm import build_tokenizer


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The base with every adapter, in this process, to check the service's numbers against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    model = PeftModel.from_pretrained(base, tiny_models["adapters"] / "addition", adapter_name="addition")
    model.load_adapter(tiny_models["adapters"] / "reversal", adapter_name="reversal")
    return model.eval()


def logprobs_of(model, adapter: str | None, ids: list[int]) -> list[float]:
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    lp = logits.log_softmax(-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def post(url, path, body, headers, **kw):
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def test_auth_is_required_except_for_health(service, auth):
    assert httpx.get(service + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(service + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        r = post(service, "/v1/completions", {"model": "tiny-base", "prompt": "1"}, headers)
        assert r.status_code == 401
    models = httpx.get(service + "/v1/models", headers=auth).json()["data"]
    assert [(m["id"], m["parent"]) for m in models][:4] == [
        ("tiny-base", None), ("addition", "tiny-base"), ("reversal", "tiny-base"), ("subtraction", "tiny-base")
    ]


@pytest.mark.parametrize("model_name, adapter", [("tiny-base", None), ("addition", "addition"), ("reversal", "reversal")])
def test_echo_logprobs_cover_the_prompt_then_the_generation(service, auth, reference, model_name, adapter):
    tokenizer = build_tokenizer()
    prompt = "23+19="
    r = post(service, "/v1/completions", {
        "model": model_name, "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0,
    }, auth)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt)
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ended = choice["finish_reason"] == "stop"  # at the end token: scored and counted, without text
    ids = tokenizer(choice["text"])["input_ids"] + ([tokenizer.eos_token_id] if ended else [])
    torch.testing.assert_close(lp["token_logprobs"][1:], logprobs_of(reference, adapter, ids), atol=1e-4, rtol=0)
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == pytest.approx(value)
        assert len(top) <= 3
    n_generated = len(choice["text"]) - len(prompt) + ended
    assert len(lp["tokens"]) == len(prompt) + n_generated
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n_generated,
                             "total_tokens": len(prompt) + n_generated}
    greedy = [max(top.values()) == pytest.approx(v) for top, v in zip(lp["top_logprobs"][len(prompt):], lp["token_logprobs"][len(prompt):])]
    assert all(greedy)  # temperature 0 picks the most likely token


def test_prompt_forms_and_max_tokens_zero(service, auth):
    tokenizer = build_tokenizer()
    texts = ["12+34=", "abcd>"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    answers = []
    for prompt in (texts, ids, ids[0], texts[0]):
        r = post(service, "/v1/completions", {"model": "addition", "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0}, auth)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert [c["text"] for c in answers[0]["choices"]] == texts == [c["text"] for c in answers[1]["choices"]]
    assert [c["logprobs"] for c in answers[0]["choices"]] == [c["logprobs"] for c in answers[1]["choices"]]
    assert answers[2]["choices"][0]["logprobs"] == answers[3]["choices"][0]["logprobs"] == answers[0]["choices"][0]["logprobs"]
    assert all(c["finish_reason"] == "length" for a in answers for c in a["choices"])
    assert answers[0]["usage"]["completion_tokens"] == 0


def test_stop_is_applied_by_the_server_and_seed_makes_sampling_reproducible(service, auth):
    cuttable = []  # greedy generations whose last character first appears after their first
    for model in ("reversal", "addition", "subtraction", "tiny-base"):
        for prompt in ("abcdef>", "12+34=", "55-21=", "27+38="):
            body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            text = post(service, "/v1/completions", body, auth).json()["choices"][0]["text"]
            if len(text) >= 2 and text.index(text[-1]) >= 1:
                cuttable.append((text, body))
    assert cuttable
    full, body = cuttable[0]
    stop = full[-1]
    cut = post(service, "/v1/completions", {**body, "stop": [stop], "logprobs": 0}, auth).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"
    assert "".join(cut["logprobs"]["tokens"]) == cut["text"]
    sampled = {**body, "temperature": 1.0, "seed": 7, "max_tokens": 8}
    texts = {post(service, "/v1/completions", sampled, auth).json()["choices"][0]["text"] for _ in range(2)}
    assert len(texts) == 1


@pytest.mark.parametrize("body, status, code", [
    ({"model": "nope", "prompt": "1"}, 404, "model_not_found"),
    ({"model": "tiny-base", "prompt": "1", "n": 2, "best_of": 3}, 400, "unsupported_parameter"),
    ({"model": "tiny-base", "prompt": "1", "suffix": "2"}, 400, "unsupported_parameter"),
    ({"model": "tiny-base", "prompt": "1", "n": 0}, 400, "invalid_request"),
    ({"model": "tiny-base", "prompt": "1", "frequency_penalty": -2.1}, 400, "invalid_request"),
    ({"model": "tiny-base", "prompt": "1", "logit_bias": {"-1": 5}}, 400, "invalid_logit_bias"),
    ({"model": "tiny-base", "prompt": ["1"] * 65}, 400, "too_many_prompts"),
    ({"model": "tiny-base", "prompt": "1" * 60, "max_tokens": 10}, 400, "context_length_exceeded"),
    ({"model": "tiny-base", "prompt": "1", "logprobs": 21}, 400, "invalid_request"),
    ({"model": "tiny-base", "prompt": "x" * (2 << 20)}, 413, "request_too_large"),
])
def test_refusals_use_the_openai_error_shape(service, auth, body, status, code):
    r = post(service, "/v1/completions", body, auth)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


def test_runtime_lora_is_confined_to_the_adapter_root(service, auth, tiny_models):
    root = tiny_models["adapters"]
    for name, path in [("escape", str(tiny_models["base"])), ("escape", "../base"), ("../x", "addition")]:
        r = post(service, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, auth)
        assert r.status_code == 400, r.text
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(root / "addition" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    r = post(service, "/v1/load_lora_adapter", {"lora_name": "pickled", "lora_path": "pickled"}, auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_safetensors"
    shutil.rmtree(pickled)

    shutil.copytree(root / "reversal", root / "copy-of-reversal")
    r = post(service, "/v1/load_lora_adapter", {"lora_name": "runtime", "lora_path": str(root / "copy-of-reversal")}, auth)
    assert r.status_code == 200 and "added successfully" in r.text
    probe = {"prompt": "abcd>", "echo": True, "logprobs": 0, "max_tokens": 0}
    loaded = post(service, "/v1/completions", {"model": "runtime", **probe}, auth).json()["choices"][0]["logprobs"]
    original = post(service, "/v1/completions", {"model": "reversal", **probe}, auth).json()["choices"][0]["logprobs"]
    assert loaded == original
    assert post(service, "/v1/unload_lora_adapter", {"lora_name": "runtime"}, auth).status_code == 200
    assert post(service, "/v1/completions", {"model": "runtime", **probe}, auth).status_code == 404
    shutil.rmtree(root / "copy-of-reversal")


def test_merge_session_materializes_and_evaluates_with_lora_compose(service, auth):
    examples = [{"prompt": "12+13=", "target": "25"}, {"prompt": "31+18=", "target": "49"}]
    session = post(service, "/v1/sessions", {"adapters": ["addition", "reversal"], "examples": examples}, auth).json()
    sid = session["session_id"]
    assert session["adapters"] == ["addition", "reversal"]
    merged = post(service, f"/v1/sessions/{sid}/materialize", {"alpha": [1.0, 1.0], "beta": [1.0, 0.0], "tag": "one-hot"}, auth).json()
    probe = {"prompt": "12+13=25", "echo": True, "logprobs": 0, "max_tokens": 0}
    as_merge = post(service, "/v1/completions", {"model": merged["model"], **probe}, auth).json()["choices"][0]["logprobs"]
    as_adapter = post(service, "/v1/completions", {"model": "addition", **probe}, auth).json()["choices"][0]["logprobs"]
    torch.testing.assert_close(as_merge["token_logprobs"][1:], as_adapter["token_logprobs"][1:], atol=1e-5, rtol=0)

    result = post(service, f"/v1/sessions/{sid}/evaluate", {"alpha": [1.0, 1.0], "beta": [1.0, 0.0]}, auth).json()
    assert len(result["per_example_loss"]) == 2
    assert result["loss"] == pytest.approx(sum(result["per_example_loss"]) / 2)
    target_logprobs = as_adapter["token_logprobs"][-2:]  # "25" after "12+13="
    assert result["per_example_loss"][0] == pytest.approx(-sum(target_logprobs) / 2, abs=1e-4)
    halved = post(service, f"/v1/sessions/{sid}/evaluate", {"alpha": [0.5, 1.0], "beta": [0.5, 0.5]}, auth).json()
    assert halved["loss"] != pytest.approx(result["loss"])
    assert post(service, "/v1/sessions/sess-missing/materialize", {"alpha": [1, 1], "beta": [1, 1]}, auth).status_code == 404
    assert post(service, f"/v1/sessions/{sid}/materialize", {"alpha": [1], "beta": [1]}, auth).status_code == 400


def test_a_busy_server_answers_429_with_retry_after(tiny_models, serve_app):
    from evomerge.server.model_host import ModelHost
    from evomerge.server.app import create_app

    host = ModelHost(str(tiny_models["base"]), "tiny-base", tiny_models["adapters"])
    with serve_app(create_app(host, "t", max_pending=0)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-base", "prompt": "1"}, headers={"Authorization": "Bearer t"})
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
