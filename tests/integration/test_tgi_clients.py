"""The published TGI/LoRAX Python clients, unchanged, against the real server.

`text-generation` has no adapter_id: it is used for the base model; `lorax-client` (module
`lorax`) for adapters. Both are imported inside the tests, so a broken install fails these tests
only (with the import error) and not the rest of the module.
"""

from __future__ import annotations

import pytest

from .conftest import PROMPT
from .support import generate, token_ids

MAX_NEW = 8


def test_text_generation_client_generate(server, client, reference):
    from text_generation import Client

    tgi = Client(server.url, timeout=60)
    got = tgi.generate(PROMPT, max_new_tokens=MAX_NEW)
    raw = generate(client, PROMPT, None, MAX_NEW)
    assert got.generated_text == raw["generated_text"]
    assert [t.id for t in got.details.tokens] == token_ids(raw) == reference(None, PROMPT, MAX_NEW)
    assert got.details.finish_reason.value == raw["details"]["finish_reason"] == "length"
    assert got.details.generated_tokens == MAX_NEW
    assert raw["details"]["adapter_version"] is None  # the base model


def test_text_generation_client_generate_stream(server, client):
    from text_generation import Client

    responses = list(Client(server.url, timeout=60).generate_stream(PROMPT, max_new_tokens=MAX_NEW))
    raw = generate(client, PROMPT, None, MAX_NEW)
    assert [r.token.id for r in responses] == token_ids(raw)
    assert all(r.details is None and r.generated_text is None for r in responses[:-1])
    last = responses[-1]
    assert last.generated_text == raw["generated_text"]
    assert last.details.finish_reason.value == "length"
    assert last.details.generated_tokens == MAX_NEW


def test_text_generation_client_errors(server):
    from text_generation import Client
    from text_generation.errors import ValidationError

    with pytest.raises(ValidationError, match="max_new_tokens"):
        Client(server.url, timeout=60).generate(PROMPT, max_new_tokens=10**6)


@pytest.mark.parametrize("variant", ["prompt", "prefix", "prefix-proj"])
def test_lorax_client_generate_with_adapter(variant, server, client, uploaded, reference):
    from lorax import Client

    name = uploaded[variant]
    got = Client(server.url, timeout=60).generate(PROMPT, adapter_id=name, max_new_tokens=MAX_NEW)
    raw = generate(client, PROMPT, name, MAX_NEW)
    assert got.generated_text == raw["generated_text"]
    assert [t.id for t in got.details.tokens] == token_ids(raw) == reference(variant, PROMPT, MAX_NEW)
    assert got.details.finish_reason.value == raw["details"]["finish_reason"]
    assert got.details.generated_tokens == raw["details"]["generated_tokens"]
    assert got.details.prompt_tokens == len(PROMPT)
    # our `adapter_version` in details: the clients parse past it
    assert raw["details"]["adapter_version"] == client.get(f"/adapters/{name}").json()["version"]


def test_lorax_client_generate_stream_with_adapter(server, client, uploaded, reference):
    from lorax import Client

    name = uploaded["ptuning-lstm"]
    responses = list(Client(server.url, timeout=60).generate_stream(PROMPT, adapter_id=name, max_new_tokens=MAX_NEW))
    raw = generate(client, PROMPT, name, MAX_NEW)
    assert [r.token.id for r in responses] == token_ids(raw) == reference("ptuning-lstm", PROMPT, MAX_NEW)
    assert responses[-1].generated_text == raw["generated_text"]
    assert responses[-1].details.finish_reason.value == "length"


def test_lorax_client_unknown_adapter(server):
    from lorax import Client
    from lorax.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no-such-adapter"):
        Client(server.url, timeout=60).generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=MAX_NEW)
