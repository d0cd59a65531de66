"""softprompt-convert end to end: a torch.save'd nn.Embedding (the soft-prompt-tuning blog's format)
converted by the console script's module, uploaded to a real server, and served with the tokens
of a PromptTuningConfig PeftModel whose embedding is that table."""

from __future__ import annotations

import subprocess
import sys

from tests.convert_material import peft_greedy_for_table, save_format, table

from .conftest import PROMPT
from .support import REPO, generate, token_ids, upload


def test_converted_embedding_uploads_and_equals_peft(client, model_dir, tokenizer, tmp_path):
    prompt = table(64, seed=3)
    src, _ = save_format("embedding", prompt, tmp_path / "in")
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "adapters.convert", str(src), "--base-model", str(model_dir),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nn.Embedding" in done.stdout and "4 virtual tokens x 64" in done.stdout, done.stdout
    r = upload(client, "converted-embedding", out)
    assert r.status_code == 201, r.text
    ids = tokenizer(PROMPT).input_ids
    body = generate(client, PROMPT, "converted-embedding", 8)
    assert token_ids(body) == peft_greedy_for_table(model_dir, prompt, ids, 8)
