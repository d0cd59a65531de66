"""The text the engine returns is exactly the tokens' text, with a SentencePiece-style (Metaspace)
tokenizer too: its first generated token keeps its leading space."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from adapters import AdapterRegistry
from server.demo.tiny import seeded_init, tiny_config
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.request import SamplingParams, Sequence
from server.model import load_base_model
from tests.factory import trained_peft

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
PIECES = ["s", "ing", "ed", "!", ",", "é", "日本"]  # glued to the previous word: no ▁
PROMPTS = ["hello world", "the cat sat on the mat", "a dog", "dog"]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + [f"▁{w}" for w in WORDS] + PIECES)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def metaspace_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("metaspace")
    tokenizer = metaspace_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)))
    seeded_init(model, seed=1)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    base = load_base_model(str(root / "model"), dtype="float32")
    registry = AdapterRegistry(base.spec, base.model)
    for variant in ("prompt", "prefix"):
        trained_peft(root / "model", variant, seed=3).save_pretrained(root / variant)
        registry.add_dir(variant, root / variant, source="test")
    return base, registry


def test_decoding_alone_drops_the_space_so_the_test_means_something():
    tokenizer = metaspace_tokenizer()
    ids = tokenizer("hello world").input_ids
    assert tokenizer.decode(ids[1:]) == "world" and tokenizer.decode(ids) == "hello world"
    assert IncrementalDetokenizer(tokenizer, ids[:1]).step(ids[1]) == " world"


@pytest.mark.parametrize("variant", [None, "prompt", "prefix"])
def test_generated_text_is_the_full_decode_minus_the_prompt(metaspace_world, variant):
    base, registry = metaspace_world
    engine = Engine(base.model, base.tokenizer, base.spec)
    adapter = registry.get(variant) if variant else None
    spaced = 0
    for prompt in PROMPTS:
        ids = base.tokenizer(prompt).input_ids
        streamed = []
        seq = Sequence(ids, SamplingParams(max_new_tokens=12, ignore_eos=True), adapter,
                       on_token=lambda _, event: streamed.append(event.text))
        engine.submit(seq)
        while not seq.finished:
            engine.step()
        decode = lambda t: base.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        full, head = decode(ids + seq.output_ids), decode(ids)
        assert full.startswith(head)
        assert seq.text == full[len(head):], f"{variant} {prompt!r}: {seq.output_ids}"
        assert "".join(streamed) == seq.text
        spaced += seq.text.startswith(" ")
    assert spaced, "no generation started with a ▁ word: the leading-space case went untested"


def _python_path(tokenizer, prompt_ids) -> IncrementalDetokenizer:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    detokenizer._stream = None  # as for a tokenizer without a Rust backend, or one that cleans up spaces
    return detokenizer


def test_the_rust_stream_and_the_python_window_give_the_same_text_token_by_token():
    """The fast path (`tokenizers`' DecodeStream) against the two-decode window, on a Metaspace
    tokenizer (leading spaces, multi-character pieces) and on the demo's byte-level one (UTF-8
    characters split across tokens, invalid bytes, ids it has no token for, special ids), after
    prompts of whole characters (where the prompt's text ends is then unambiguous)."""
    import random

    from transformers import AutoTokenizer

    from server.model import DEMO_MODEL

    rng = random.Random(0)
    for tokenizer in (metaspace_tokenizer(), AutoTokenizer.from_pretrained(str(DEMO_MODEL))):
        assert IncrementalDetokenizer(tokenizer, [5])._stream is not None
        top = len(tokenizer) + 3  # a few ids past the vocabulary, as a padded lm_head can make
        for _ in range(20):
            prompt = tokenizer(rng.choice(PROMPTS + ["日本 é", "x"])).input_ids
            ids = [rng.randrange(0, top) for _ in range(40)]
            fast, slow = IncrementalDetokenizer(tokenizer, prompt), _python_path(tokenizer, prompt)
            assert [fast.step(i) for i in ids] == [slow.step(i) for i in ids], (prompt, ids)


def test_flush_gives_what_an_incomplete_character_held_back():
    """Stepped text + `flush()` is the full decode of the generated ids (in the prompt's context),
    an incomplete character at the end included as U+FFFD, as `tokenizer.decode` shows it; after
    a flush there is nothing more to give."""
    import random

    from transformers import AutoTokenizer

    from server.model import DEMO_MODEL

    rng = random.Random(1)
    held = 0
    for tokenizer in (metaspace_tokenizer(), AutoTokenizer.from_pretrained(str(DEMO_MODEL))):
        for _ in range(40):
            prompt = tokenizer(rng.choice(PROMPTS + ["日本 é", "x"])).input_ids
            ids = [rng.randrange(0, len(tokenizer)) for _ in range(rng.randrange(1, 12))]
            decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
            full = decode(prompt + ids)[len(decode(prompt)):]
            for detokenizer in (IncrementalDetokenizer(tokenizer, prompt), _python_path(tokenizer, prompt)):
                stepped = "".join(detokenizer.step(i) for i in ids)
                tail = detokenizer.flush()
                assert stepped + tail == full, (prompt, ids)
                assert detokenizer.flush() == ""
                held += bool(tail)
    assert held, "no generation ended inside a character: the flush went untested"
