"""OpenAI's error shape on /v1/*: `{"error": {"message", "type", "param", "code"}}`, so the `openai`
client shows the server's message (not a bare "Error code: 404"); 400 for a bad request, as OpenAI
and vLLM answer. TGI's routes keep `{"error", "error_type"}` and 422."""

from __future__ import annotations

import openai
import pytest

from .conftest import PROMPT
from .support import assert_error, generate_body

MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def test_an_invalid_request_is_a_bad_request_error_with_the_message(oai):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=None, prompt=PROMPT, max_tokens=2, top_p=1.5)
    assert exc.value.status_code == 400
    assert "top_p: must be in (0, 1], got 1.5" in str(exc.value)  # what the client prints
    assert (exc.value.param, exc.value.type) == ("top_p", "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model="", messages=MESSAGES, max_tokens=2, temperature=-1)
    assert "temperature: must be >= 0" in exc.value.message and exc.value.param == "temperature"


def test_a_schema_error_names_the_field(oai):
    """Pydantic's validation (a wrong type) is a 400 too, `param` its location."""
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model="", prompt=PROMPT, max_tokens="many")  # type: ignore[arg-type]
    assert exc.value.param == "max_tokens" and "max_tokens" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model="", messages=[], max_tokens=2)
    assert exc.value.param == "messages"


def test_an_unknown_model_is_a_not_found_error(oai):
    for create in (lambda: oai.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2),
                   lambda: oai.chat.completions.create(model="no-such-adapter", messages=MESSAGES, max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as exc:
            create()
        assert "'no-such-adapter' not found" in str(exc.value)
        assert (exc.value.code, exc.value.param, exc.value.type) == ("model_not_found", "model",
                                                                     "invalid_request_error")


def test_a_refused_stream_request_is_a_status_in_its_routes_shape(client):
    """Refused before its stream starts: a status, in the shape of its kind of route."""
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True, "top_k": -2})
    assert assert_error(r, 400, "top_k")["param"] == "top_k"
    r = client.post("/generate", json=generate_body(PROMPT, None, 2, top_k=-1))
    assert assert_error(r, 422, "top_k")["error_type"] == "validation"


def test_unknown_routes_and_methods_keep_their_status(client):
    assert assert_error(client.get("/v1/nothing-here"), 404)["type"] == "invalid_request_error"
    assert_error(client.get("/v1/completions"), 405)
    assert_error(client.get("/nothing-here"), 404)


def test_auth_errors_through_the_client(model_dir, tmp_path):
    from .conftest import running_server

    with running_server(model_dir, tmp_path / "store", tmp_path, "--api-key", "k", name="oai-auth") as s:
        with openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0, timeout=60) as bad:
            with pytest.raises(openai.PermissionDeniedError) as exc:
                bad.models.list()
            assert "does not grant generation" in exc.value.message
        with s.client() as c:
            r = c.get("/v1/models")
            assert assert_error(r, 401, "missing credentials")["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"].lower().startswith("bearer")
        with openai.OpenAI(base_url=f"{s.url}/v1", api_key="k", max_retries=0, timeout=60) as good:
            assert good.models.list().data


def test_limits_are_named_as_the_client_sent_them(oai):
    """The engine's limits say max_new_tokens and inputs (TGI's names); on /v1 the error names
    max_tokens, and the prompt (completions) or the messages (chat)."""
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=None, prompt=PROMPT, max_tokens=10**6)
    assert exc.value.param == "max_tokens" and "max_new_tokens" not in exc.value.message
    assert "- max_tokens: " in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model=None, messages=[{"role": "user", "content": "x" * 100_000}], max_tokens=2)
    assert exc.value.param == "messages" and "inputs" not in exc.value.message, exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=None, prompt="x" * 100_000, max_tokens=2)
    assert exc.value.param == "prompt" and "- prompt: " in exc.value.message, exc.value.message
