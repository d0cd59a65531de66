"""softprompt-convert: every format it reads becomes PEFT's files with the same table, served with
PEFT's tokens; shapes checked against the base model; an unknown layout lists what it saw."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file

from adapters import AdapterRegistry
from adapters.convert import main
from server.engine.request import SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS
from tests.convert_material import peft_greedy_for_table, save_format, table

FORMATS = ["embedding", "tensor", "state-dict", "tgis", "nemo", "nemo-new", "peft"]


def _convert(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_converts_and_serves_as_peft(llama, tmp_path, capsys, fmt):
    prompt = table(llama.spec.hidden_size)
    if fmt == "peft":  # vLLM's prompt adapters were PEFT's own files: checked and written again
        src, extra, prompt = llama.adapter_dirs["prompt"], [], load_file(
            str(llama.adapter_dirs["prompt"] / "adapter_model.safetensors"))["prompt_embeddings"]
    else:
        src, extra = save_format(fmt, prompt, tmp_path / "in")
        if fmt == "tgis":
            prompt = prompt.to(torch.float16).float()
    out = tmp_path / "out"
    code, stdout, stderr = _convert([src, "--base-model", llama.model_dir, "--output", out, *extra], capsys)
    assert code == 0, stderr
    assert f"{prompt.shape[0]} virtual tokens x {prompt.shape[1]}, float32" in stdout, stdout
    config = json.loads((out / "adapter_config.json").read_text())
    expected = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.shape[0],
                "token_dim": llama.spec.hidden_size, "num_layers": llama.spec.num_layers, "num_attention_heads": 4,
                "num_transformer_submodules": 1, "base_model_name_or_path": str(llama.model_dir)}
    assert {k: config[k] for k in expected} == expected
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert list(weights) == ["prompt_embeddings"]
    torch.testing.assert_close(weights["prompt_embeddings"], prompt, rtol=0, atol=0)
    if fmt not in ("embedding", "nemo"):
        return  # the table is what matters; two formats are served end to end here, one more over HTTP
    registry = AdapterRegistry(llama.spec, llama.model)
    adapter = registry.add_dir("converted", out, source="test")
    engine = llama.engine()
    ids = llama.ids(PROMPTS[1])
    seq = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=MAX_NEW), adapter))
    while engine.has_work():
        engine.step()
    assert seq.output_ids == peft_greedy_for_table(llama.model_dir, prompt, ids, MAX_NEW)


def _fails(capsys, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("softprompt-convert: error: "), err
    return err


def test_width_checked_against_the_base_model(llama, tmp_path, capsys):
    src, _ = save_format("tensor", table(32), tmp_path / "in")
    err = _fails(capsys, src, "--base-model", llama.model_dir, "--output", tmp_path / "out")
    assert "32 wide" in err and "hidden size 64" in err
    assert not (tmp_path / "out").exists()


def test_unknown_layout_lists_keys_and_shapes(llama, tmp_path, capsys):
    torch.save({"a": torch.zeros(2, 3), "b": torch.zeros(4), "step": 7}, tmp_path / "odd.pt")
    err = _fails(capsys, tmp_path / "odd.pt", "--base-model", llama.model_dir, "--output", tmp_path / "out")
    assert "unknown layout" in err and "a (2, 3)" in err and "b (4,)" in err and "step (int)" in err


def test_nemo_with_several_tasks_needs_task(llama, tmp_path, capsys):
    src, _ = save_format("nemo", table(64), tmp_path / "in")
    err = _fails(capsys, src, "--base-model", llama.model_dir, "--output", tmp_path / "out")
    assert "--task" in err and "'other'" in err and "'squad'" in err
    err = _fails(capsys, src, "--base-model", llama.model_dir, "--output", tmp_path / "out", "--task", "nope")
    assert "no task 'nope'" in err


class Custom:
    def __init__(self):
        self.weight = torch.zeros(2, 64)


def test_pickles_of_other_classes_are_refused(llama, tmp_path, capsys):
    torch.save(Custom(), tmp_path / "custom.pt")
    err = _fails(capsys, tmp_path / "custom.pt", "--base-model", llama.model_dir, "--output", tmp_path / "out")
    assert "weights_only=True" in err


def test_tgis_encoder_only_and_missing_input(llama, tmp_path, capsys):
    (tmp_path / "tgis").mkdir()
    torch.save(table(64), tmp_path / "tgis" / "encoder.pt")
    assert "encoder-decoder" in _fails(capsys, tmp_path / "tgis", "--base-model", llama.model_dir, "--output", tmp_path / "o")
    assert "does not exist" in _fails(capsys, tmp_path / "nope.pt", "--base-model", llama.model_dir, "--output", tmp_path / "o")
    buffer = io.BytesIO()
    torch.save(table(64), buffer)
    (tmp_path / "p.pt").write_bytes(buffer.getvalue())
    assert "base model" in _fails(capsys, tmp_path / "p.pt", "--base-model", tmp_path / "no-model", "--output", tmp_path / "o")
