"""--api-key and --admin-key: generation needs the API key, adapter changes need the admin key."""

from __future__ import annotations

import openai
import pytest

from .conftest import PROMPT, running_server
from .support import adapter_names, assert_error, assert_unharmed, generate_body, upload

API, ADMIN = "k", "a"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secured(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-server")
    with running_server(model_dir, root / "store", root, "--api-key", API, "--admin-key", ADMIN, name="auth") as s:
        yield s


@pytest.fixture
def c(secured):
    with secured.client() as client:
        yield client


def test_health_needs_no_key(c):
    assert c.get("/health").status_code == 200


def test_generation_needs_the_api_key(c):
    body = generate_body(PROMPT, None, 3)
    for route in ("/generate", "/generate_stream", "/"):
        r = c.post(route, json=body)
        assert_error(r, 401)
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
        assert_error(c.post(route, json=body, headers=bearer("wrong")), 403)
        assert_error(c.post(route, json=body, headers=bearer(ADMIN + "x")), 403)
        assert c.post(route, json=body, headers=bearer(API)).status_code == 200
    assert c.post("/generate", json=body, headers={"X-API-Key": API}).status_code == 200
    assert_error(c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}), 401)
    assert_error(c.get("/v1/models"), 401)
    assert_error(c.get("/adapters"), 401)


def test_adapter_changes_need_the_admin_key(c, secured, adapter_srcs):
    store = secured.adapter_dir
    src = adapter_srcs["prompt"]
    assert_error(upload(c, "guarded", src), 401)
    assert_error(upload(c, "guarded", src, headers=bearer(API)), 403)
    assert_error(upload(c, "guarded", src, headers=bearer("wrong")), 403)
    assert not (store / "guarded").exists()
    assert_unharmed(c, store, [], headers=bearer(API))

    assert upload(c, "guarded", src, headers=bearer(ADMIN)).status_code == 201
    assert adapter_names(c, headers=bearer(API)) == ["guarded"]
    r = c.post("/generate", json=generate_body(PROMPT, "guarded", 3), headers=bearer(API))
    assert r.status_code == 200, r.text

    assert_error(c.delete("/adapters/guarded"), 401)
    assert_error(c.delete("/adapters/guarded", headers=bearer(API)), 403)
    assert_unharmed(c, store, ["guarded"], headers=bearer(API))
    assert c.delete("/adapters/guarded", headers=bearer(ADMIN)).status_code == 204
    assert_unharmed(c, store, [], headers=bearer(API))


def test_openai_client_with_keys(secured):
    url = f"{secured.url}/v1"
    with openai.OpenAI(base_url=url, api_key=API, max_retries=0, timeout=60) as good, \
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0, timeout=60) as wrong:
        got = good.completions.create(model=secured.model_name, prompt=PROMPT, max_tokens=2, temperature=0)
        assert len(got.choices) == 1
        assert secured.model_name in [m.id for m in good.models.list()]
        with pytest.raises(openai.PermissionDeniedError):
            wrong.completions.create(model=secured.model_name, prompt=PROMPT, max_tokens=2, temperature=0)
        with pytest.raises(openai.PermissionDeniedError):
            wrong.models.list()
