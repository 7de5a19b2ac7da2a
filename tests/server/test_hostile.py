"""The reference service under hostile clients and adapter roots: links out of the root, values
the models cannot compute with, bugs, silent and slow connections, unbounded runtime adapters,
broken adapters at start, and the order of authentication, size and admission checks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import time

import httpx
import pytest
import torch

from fixtures_service import TOKEN

BAD = {"Authorization": "Bearer wrong"}


def post_raw(url, path, body, headers):
    """POST ``body`` encoded by ``json.dumps`` (ASCII escapes, so lone surrogates and NaN pass)."""
    return httpx.post(url + path, content=json.dumps(body).encode(), headers={**headers, "Content-Type": "application/json"}, timeout=60)


def assert_openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "\n" not in error["message"]
    if code is not None:
        assert error["code"] == code, error


@pytest.fixture(scope="module")
def host(tiny_models):
    """A model host over the tiny adapters in this process, keeping at most two runtime adapters."""
    from evomerge.server.model_host import ModelHost

    return ModelHost(str(tiny_models["base"]), "tiny-base", tiny_models["adapters"], max_loras=2)


@pytest.fixture
def outside(tmp_path, tiny_models):
    """A valid adapter directory outside the adapter root."""
    target = tmp_path / "outside"
    shutil.copytree(tiny_models["adapters"] / "addition", target)
    return target


@pytest.fixture
def in_root(tiny_models):
    """Make directories in the shared adapter root that are removed after the test."""
    made = []

    def make(name):
        path = tiny_models["adapters"] / name
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path)


def test_a_symlinked_adapter_file_is_not_read(service, auth, tiny_models, outside, in_root):
    root = tiny_models["adapters"]
    weights = in_root("linked-weights")
    shutil.copy(root / "addition" / "adapter_config.json", weights)
    (weights / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    config = in_root("linked-config")
    shutil.copy(root / "addition" / "adapter_model.safetensors", config)
    (config / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    for name in ("linked-weights", "linked-config"):
        r = httpx.post(service + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}, headers=auth)
        assert_openai_error(r, 400, "path_outside_root")
        assert "symbolic link" in r.json()["error"]["message"]


def test_unreadable_adapters_of_the_root_are_skipped_at_start_with_a_warning(tiny_models, host, outside, tmp_path, caplog):
    from evomerge.server.model_host import ModelHost

    root = tmp_path / "root"
    shutil.copytree(tiny_models["adapters"] / "addition", root / "addition")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"")
    shutil.copytree(tiny_models["adapters"] / "reversal", root / "linked")
    (root / "linked" / "adapter_model.safetensors").unlink()
    (root / "linked" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "escaped").symlink_to(outside, target_is_directory=True)
    layout = root / "aaa-other-layout"  # read first: the slot it makes must not stay
    shutil.copytree(tiny_models["adapters"] / "subtraction", layout)
    config = json.loads((layout / "adapter_config.json").read_text())
    (layout / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))

    with caplog.at_level(logging.WARNING, logger="evomerge.server"):
        started = ModelHost(str(tiny_models["base"]), "tiny-base", root)
    assert list(started.adapters) == ["addition"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), started.running("addition") as model, host.running("addition") as reference:
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    skipped = " ".join(r.getMessage() for r in caplog.records)
    for name, why in [("broken", "cannot be read"), ("linked", "symbolic link"), ("escaped", "outside"),
                      ("aaa-other-layout", "layout")]:
        assert str(root / name) in skipped and why in skipped


@pytest.fixture(scope="module")
def hostile_files(service, tiny_models):
    """Adapter directories a client may point a load at, and a merge session over two adapters."""
    root = tiny_models["adapters"]
    made = [root / "zero-bytes", root / "huge-header"]
    for path in made:
        path.mkdir()
        shutil.copy(root / "addition" / "adapter_config.json", path)
    (root / "zero-bytes" / "adapter_model.safetensors").write_bytes(b"")
    (root / "huge-header" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    examples = [{"prompt": "12+13=", "target": "25"}]
    session = httpx.post(service + "/v1/sessions", json={"adapters": ["addition", "reversal"], "examples": examples},
                         headers=headers, timeout=60).json()["session_id"]
    yield {"sid": session}
    for path in made:
        shutil.rmtree(path)


COMPLETION = {"model": "tiny-base", "prompt": "1", "max_tokens": 2}
UNHONOURABLE = [
    ("temperature-1e-40", "/v1/completions", {**COMPLETION, "temperature": 1e-40}),
    ("temperature-nan", "/v1/completions", {**COMPLETION, "temperature": float("nan")}),
    ("top_p-1e-300", "/v1/completions", {**COMPLETION, "top_p": 1e-300}),
    ("seed-2**64", "/v1/completions", {**COMPLETION, "seed": 2**64}),
    ("seed-below-int64", "/v1/completions", {**COMPLETION, "seed": -(2**63) - 1}),
    ("prompt-lone-surrogate", "/v1/completions", {**COMPLETION, "prompt": "\ud800"}),
    ("prompt-list-lone-surrogate", "/v1/completions", {**COMPLETION, "prompt": ["1", "a\udfff"]}),
    ("stop-lone-surrogate", "/v1/completions", {**COMPLETION, "stop": ["\ud800"]}),
    ("model-lone-surrogate", "/v1/completions", {**COMPLETION, "model": "\ud800"}),
    ("zero-byte-safetensors", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "zero-bytes"}),
    ("huge-header-safetensors", "/v1/load_lora_adapter", {"lora_name": "h", "lora_path": "huge-header"}),
    ("lora_path-nul", "/v1/load_lora_adapter", {"lora_name": "n", "lora_path": "addition\x00"}),
    ("lora_path-5000", "/v1/load_lora_adapter", {"lora_name": "long", "lora_path": "a" * 5000}),
    ("lora_path-long-component", "/v1/load_lora_adapter", {"lora_name": "long", "lora_path": "a" * 300}),
    ("example-lone-surrogate", "/v1/sessions", {"adapters": ["addition"], "examples": [{"prompt": "\ud800", "target": "1"}]}),
    ("alpha-1e308", "/v1/sessions/{sid}/materialize", {"alpha": [1e308, 1.0], "beta": [1.0, 1.0]}),
    ("alpha-nan", "/v1/sessions/{sid}/materialize", {"alpha": [float("nan"), 1.0], "beta": [1.0, 1.0]}),
    ("beta-minus-1e30", "/v1/sessions/{sid}/materialize", {"alpha": [1.0, 1.0], "beta": [-1e30, 1.0]}),
    ("evaluate-beta-1e308", "/v1/sessions/{sid}/evaluate", {"alpha": [1.0, 1.0], "beta": [1e308, 1e308]}),
]


@pytest.mark.parametrize("path, body", [c[1:] for c in UNHONOURABLE], ids=[c[0] for c in UNHONOURABLE])
def test_valid_json_the_server_cannot_honour_is_a_4xx_in_the_openai_shape(service, auth, hostile_files, path, body):
    r = post_raw(service, path.format(**hostile_files), body, auth)
    assert_openai_error(r, 400)


def test_non_finite_logits_are_refused_not_sampled(tiny_models):
    from types import SimpleNamespace

    from evomerge.models.zoo.tiny_lm import build_tokenizer
    from evomerge.server.completion_engine import SamplingParams, complete
    from evomerge.server.model_host import ServiceError

    class Diverged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache, **_):
            logits = torch.full((1, input_ids.shape[1], 40), float("nan"))
            return SimpleNamespace(logits=logits, cache=None, past_key_values=None)

    tokenizer = build_tokenizer()
    with pytest.raises(ServiceError) as refused:
        complete(Diverged(), tokenizer, [1, 2], "12", SamplingParams(max_tokens=2), torch.Generator())
    assert refused.value.status == 400 and refused.value.code == "non_finite_output"


def test_an_unexpected_error_is_a_logged_500_in_the_openai_shape(host, serve_app, monkeypatch, caplog):
    from evomerge.server.app import create_app

    def broken():
        raise RuntimeError("a bug that must not reach the client")

    monkeypatch.setattr(host, "model_names", broken)
    with caplog.at_level(logging.ERROR, logger="evomerge.server"), serve_app(create_app(host, "t")) as url:
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer t"})
    assert_openai_error(r, 500, "internal_error")
    assert "bug" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info and "a bug that must not" in str(rec.exc_info[1])]
    assert len(logged) == 1


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes ``sock`` before ``deadline`` (whatever it answered first)."""
    sock.setblocking(False)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except BlockingIOError:
            time.sleep(0.02)
        except ConnectionResetError:
            return True
    return False


def test_silent_slow_and_idle_connections_are_closed_and_health_still_answers(host, serve_app):
    from evomerge.server.app import create_app
    from evomerge.server.connections import ConnectionLimits

    limits = ConnectionLimits(head_timeout=0.5, keep_alive=1, max_connections=8)
    with serve_app(create_app(host, "t"), limits) as url:
        port = int(url.rsplit(":", 1)[1])
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(24)]
        sockets[-1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthoriz")  # a slow head
        sockets[-2].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # then idles on keep-alive
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
        deadline = started + 5 * limits.head_timeout + 2
        try:
            assert all(closed_by_peer(s, deadline) for s in sockets)
        finally:
            for s in sockets:
                s.close()
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}


def test_runtime_adapters_are_limited_to_max_loras_and_unloading_frees_one(host, serve_app):
    from evomerge.cli import build_parser
    from evomerge.server.app import create_app

    headers = {"Authorization": "Bearer t"}
    with serve_app(create_app(host, "t")) as url:
        def load(name, **extra):
            return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "addition", **extra},
                              headers=headers, timeout=60)

        try:
            assert load("one").status_code == 200 and load("two").status_code == 200
            assert_openai_error(load("three"), 400, "max_loras_reached")
            assert load("two", load_inplace=True).status_code == 200  # a replacement takes no new slot
            assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "one"}, headers=headers).status_code == 200
            assert load("three").status_code == 200
        finally:
            for name in ("one", "two", "three"):
                host.adapters.pop(name, None)
    assert build_parser().parse_args(["serve", "--model", "m", "--max-loras", "3"]).max_loras == 3


def test_auth_size_and_admission_are_decided_before_the_body_is_parsed(host, serve_app):
    from evomerge.server.app import create_app

    json_type = {"Content-Type": "application/json"}
    headers = {"Authorization": "Bearer t", **json_type}
    with serve_app(create_app(host, "t")) as url:
        for without_token in (json_type, {**BAD, **json_type}):
            r = httpx.post(url + "/v1/completions", content=b"{not json", headers=without_token)
            assert_openai_error(r, 401, "invalid_api_key")
        assert_openai_error(httpx.post(url + "/v1/completions", content=b"x" * (2 << 20), headers=json_type), 401)
        chunked = (b"x" * (1 << 20) for _ in range(12))  # no Content-Length: counted as it arrives
        assert_openai_error(httpx.post(url + "/v1/completions", content=chunked, headers=headers, timeout=30), 413,
                            "request_too_large")
        assert httpx.get(url + "/health").status_code == 200
    with serve_app(create_app(host, "t", max_pending=0)) as url:
        r = httpx.post(url + "/v1/completions", content=b"{not json", headers=headers)
        assert_openai_error(r, 429, "rate_limit_exceeded")
    with serve_app(create_app(host, "t", body_timeout=0.3)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists directories whatever their mode")
def test_serve_refuses_an_adapter_root_it_cannot_list_in_one_line(tiny_models, tmp_path, monkeypatch, capsys):
    from evomerge.cli import EXIT_USER_ERROR, main
    from evomerge.server.app import TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    root = tmp_path / "root"
    shutil.copytree(tiny_models["adapters"] / "addition", root / "addition")
    root.chmod(0o300)  # writable, searchable, not listable
    try:
        assert main(["serve", "--model", str(tiny_models["base"]), "--adapters", str(root)]) == EXIT_USER_ERROR
    finally:
        root.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith("error: --adapters: cannot list") and str(root) in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["taken", "unresolvable"])
def test_serve_refuses_an_address_it_cannot_listen_on_in_one_line_before_loading(tmp_path, monkeypatch, capsys, where):
    from evomerge.cli import EXIT_USER_ERROR, main
    from evomerge.server.app import TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    model = str(tmp_path / "never-read")  # the address is refused before a model is looked for
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        host = "127.0.0.1" if where == "taken" else "no-such-host.invalid"
        assert main(["serve", "--model", model, "--host", host, "--port", str(port)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: --host {host}") and err.count("\n") == 1, err
