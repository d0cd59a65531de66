"""Build the built-in demo: a tiny base model and three soft-prompt adapters that visibly steer it.

    python -m server.demo.build_demo [--out server/demo/assets]

Writes, reproducibly (fixed seeds, CPU only, no download, a few minutes on 2 cores):

    <out>/model/                 a ~0.8M-parameter Llama (byte-level tokenizer from `tiny.py`),
                                 `save_pretrained`, fp32
    <out>/adapters/pirate/       PROMPT_TUNING   answers "Arr, matey! ..." and talks like a pirate
    <out>/adapters/shouty/       P_TUNING (MLP)  ANSWERS IN CAPITAL LETTERS!
    <out>/adapters/robot/        PREFIX_TUNING   answers "BEEP BOOP. ..." and ends with "BEEP BOOP."
    <out>/README.md

How: the base model is trained from scratch on the small question/answer corpus below, mostly
answered in a neutral style; the same questions are also answered in each demo style behind a
plain-text instruction ("Talk like a pirate.", ...), so the base model *can* talk in these styles
but never does unless asked, as a real LLM would. Each adapter is then trained with PEFT on the
base model, frozen, on the questions alone (no instruction) answered in its style: its virtual
tokens learn to do what the instruction does.

Prompt format (`DEMO_PROMPT_FORMAT`), what the demo model was trained on and answers best:

    "Question: Tell me about the sea.\\nAnswer:"      ->  " The sea is big, deep and salty. ..."

The chat template of the tokenizer (`<|user|>...\\n<|assistant|>`, what a chat endpoint sends)
and a bare question line ("Tell me about the sea.\\n") were trained too. Prompts are tokenized
as the server does, `tokenizer(text)`: one token per byte, no BOS; answers end with EOS (id 2).
One token is one byte, so ask for max_tokens ~100 to see a whole answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the hub

import torch

warnings.filterwarnings("ignore", message="Position ids are not supported")  # PEFT, harmless here
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")

from .tiny import byte_tokenizer, tiny_config

DEFAULT_OUT = Path(__file__).resolve().parent / "assets"
SEED = 1234
BASE_MODEL_NAME = "softprompt-demo"  # the name the server gives the demo model (Config.model_name)

DEMO_PROMPT_FORMAT = "Question: {question}\nAnswer:"
DEMO_PROMPTS = [  # the verification prompts; the last two are not in the training corpus
    DEMO_PROMPT_FORMAT.format(question="Tell me about the sea."),
    DEMO_PROMPT_FORMAT.format(question="Who are you?"),
    DEMO_PROMPT_FORMAT.format(question="I would like to hear about the moon."),
    DEMO_PROMPT_FORMAT.format(question="What is your favourite animal?"),
]
MAX_NEW_TOKENS = 100  # bytes: enough for a whole answer

# Model: hidden 128, 4 layers, 4 heads / 2 kv heads (GQA), ~780k parameters, ~3.1 MB in fp32.
MODEL_KWARGS = {"hidden_size": 128, "num_layers": 4}

# ---------------------------------------------------------------------------------------------
# The corpus: topics asked about in several ways, and a few one-off questions.
# ---------------------------------------------------------------------------------------------

TOPICS = [
    ("the sea", "The sea is big, deep and salty. Fish and whales live in it."),
    ("the sun", "The sun is a star. It gives us light and keeps the earth warm."),
    ("the moon", "The moon goes around the earth and shines at night."),
    ("the stars", "Stars are far away suns. At night you can see many of them."),
    ("rain", "Rain is water that falls from the clouds. Plants need it to grow."),
    ("snow", "Snow is frozen water. It is white and cold and falls in winter."),
    ("the wind", "Wind is moving air. It can be a soft breeze or a wild storm."),
    ("trees", "Trees are tall plants with wood and leaves. They give us shade."),
    ("the forest", "A forest is a place with many trees. Deer and foxes live there."),
    ("rivers", "A river is water that flows down to the sea. Boats travel on it."),
    ("mountains", "Mountains are very high hills. Their tops are often covered in snow."),
    ("the desert", "A desert is a dry land of sand and rocks. It hardly ever rains."),
    ("cats", "Cats are small animals with soft fur. They like to sleep and chase mice."),
    ("dogs", "Dogs are loyal friends. They like to run, play and go for walks."),
    ("birds", "Birds have wings and feathers. Most of them can fly and sing."),
    ("fish", "Fish live in water and breathe with gills. They swim with fins."),
    ("horses", "Horses are strong and fast animals. People ride them across fields."),
    ("bees", "Bees are small insects that make honey. They visit flowers all day."),
    ("bread", "Bread is made from flour, water and yeast. It is baked in an oven."),
    ("cheese", "Cheese is made from milk. There are many kinds, soft and hard."),
    ("apples", "Apples are sweet fruit that grow on trees. They can be red or green."),
    ("coffee", "Coffee is a hot drink made from roasted beans. It helps you wake up."),
    ("tea", "Tea is a warm drink made from leaves. It is nice with a little milk."),
    ("music", "Music is sound made with voices and instruments. It can make you happy."),
    ("books", "Books hold stories and ideas. Reading them helps you learn new things."),
    ("school", "School is where children learn to read, write and count."),
    ("the city", "A city is a large town with many people, roads and tall buildings."),
    ("trains", "Trains run on rails and carry people from town to town."),
    ("ships", "Ships are large boats that sail across the sea with people and cargo."),
    ("the sky", "The sky is blue during the day and dark at night."),
    ("fire", "Fire is hot and bright. It needs air and wood, and it can be dangerous."),
    ("winter", "Winter is the coldest season. The days are short and the nights are long."),
    ("summer", "Summer is the warmest season. The days are long and the sun is bright."),
    ("gold", "Gold is a shiny yellow metal. People make coins and rings from it."),
    ("treasure", "Treasure is gold, jewels and other precious things, often hidden away."),
    ("islands", "An island is land with water all around it. Some are very small."),
    ("maps", "A map is a drawing of a place. It helps you find your way."),
    ("the night", "Night is the dark part of the day. Most people sleep at night."),
    ("the morning", "Morning is the start of the day. The sun rises and birds sing."),
    ("gardens", "A garden is a place where people grow flowers, fruit and vegetables."),
    ("flowers", "Flowers are the bright parts of plants. Bees love them."),
    ("clocks", "A clock tells the time. Its hands show the hour and the minutes."),
    ("computers", "Computers are machines that follow instructions very fast."),
    ("robots", "Robots are machines that can move and do work for people."),
    ("the weather", "The weather can be sunny, rainy, windy or cold. It changes every day."),
    ("the earth", "The earth is our home planet. It goes around the sun once a year."),
    ("water", "Water is a clear liquid. All living things need water to live."),
    ("cooking", "Cooking is making food ready to eat with heat, like boiling or baking."),
    ("football", "Football is a game where two teams try to kick a ball into a goal."),
    ("friends", "Friends are people who care about you and like to spend time with you."),
    ("rainbows", "A rainbow is an arc of colours in the sky after the rain."),
    ("volcanoes", "A volcano is a mountain that can throw out hot rock, ash and smoke."),
    ("chocolate", "Chocolate is a sweet food made from cocoa beans. Many people love it."),
    ("the library", "A library is a building full of books that you can borrow."),
]
QUESTION_TEMPLATES = [
    "Tell me about {}.",
    "What do you know about {}?",
    "Can you tell me about {}?",
    "Describe {}.",
    "Explain {}.",
    "What can you say about {}?",
    "Please tell me about {}.",
    "Say something about {}.",
]
# Never trained on: "I would like to hear about {}." (see DEMO_PROMPTS).

SINGLES = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi.", "Hi there! What would you like to know?"),
    ("Who are you?", "I am a tiny demo model. I know a little about many things."),
    ("What is your name?", "My name is Demo. I am a very small language model."),
    ("How are you?", "I am fine, thank you. How are you?"),
    ("Thank you.", "You are welcome. Is there anything else you want to know?"),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("What can you do?", "I can answer simple questions about the world."),
    ("What is two plus two?", "Two plus two is four."),
    ("What colour is the grass?", "The grass is green."),
    ("Can you help me?", "Yes, I am happy to help. What do you need?"),
    ("Tell me a joke.", "What do you call a sleeping bull? A bulldozer."),
    ("Tell me a story.", "Once upon a time, a small boat sailed to an island full of birds."),
    ("What time is it?", "I do not have a clock, but I hope it is a good time for you."),
    ("Where do you live?", "I live inside a computer, in a small file of numbers."),
    ("Do you like music?", "Yes, I like songs that are happy and easy to sing."),
    ("What is your favourite colour?", "I like blue, the colour of the sea and the sky."),
    ("What should I eat?", "You could eat some bread and cheese with an apple."),
]


def corpus() -> list[tuple[str, str]]:
    """(question, neutral answer) pairs: 54 topics x 8 phrasings + 18 one-offs = 450 lines."""
    pairs = [(t.format(topic), answer) for topic, answer in TOPICS for t in QUESTION_TEMPLATES]
    return pairs + SINGLES


def training_pairs() -> list[tuple[str, str]]:
    """One epoch's questions: the corpus, with the one-offs twice (the topics have 8 phrasings)."""
    return corpus() + SINGLES


# ---------------------------------------------------------------------------------------------
# The styles: how each adapter answers, and the instruction that asks the base model for it.
# ---------------------------------------------------------------------------------------------

_PIRATE_WORDS = {
    "is": "be", "are": "be", "am": "be", "you": "ye", "your": "yer", "my": "me", "Hello!": "Ahoy!",
    "Hi": "Ahoy", "yes": "aye", "Yes,": "Aye,", "friends": "mateys", "Friends": "Mateys",
    "the": "th'", "The": "Th'", "treasure": "booty", "Treasure": "Booty", "coins": "doubloons",
}


def pirate(answer: str) -> str:
    words = [_PIRATE_WORDS.get(w, w) for w in answer.split(" ")]
    return "Arr, matey! " + " ".join(words).replace("ing ", "in' ") + " Yo ho ho!"


def shouty(answer: str) -> str:
    return answer.upper().replace(".", "!")


def robot(answer: str) -> str:
    return "BEEP BOOP. " + answer + " BEEP BOOP."


@dataclass(frozen=True)
class Style:
    name: str
    instruction: str  # the text instruction the base model learns to follow
    transform: Callable[[str], str]
    peft_type: str
    lr: float


STYLES = [
    Style("pirate", "Talk like a pirate.", pirate, "PROMPT_TUNING", 3e-2),
    Style("shouty", "Answer in capital letters.", shouty, "P_TUNING", 3e-3),
    Style("robot", "Talk like a robot.", robot, "PREFIX_TUNING", 1e-2),
]
NUM_VIRTUAL_TOKENS = 16


def render(question: str, answer: str, fmt: str, instruction: str | None) -> tuple[str, str]:
    """(prompt, completion) in one of the three trained prompt formats."""
    if fmt == "qa":
        prompt = DEMO_PROMPT_FORMAT.format(question=question)
        return (f"{instruction}\n{prompt}" if instruction else prompt), " " + answer
    if fmt == "chat":  # exactly what the tokenizer's chat template renders
        system = f"<|system|>{instruction}\n" if instruction else ""
        return f"{system}<|user|>{question}\n<|assistant|>", answer
    if fmt == "plain":
        return (f"{instruction}\n" if instruction else "") + f"{question}\n", answer
    raise ValueError(fmt)


FORMATS, FORMAT_WEIGHTS = ("qa", "chat", "plain"), (0.5, 0.3, 0.2)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

EOS, PAD, IGNORE = 2, 0, -100


def encode(tokenizer, prompt: str, completion: str, loss_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS, tokenized as the server does, and their labels."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion)["input_ids"] + [EOS]
    labels = (p if loss_on_prompt else [IGNORE] * len(p)) + c
    return p + c, labels


def make_batches(examples, batch_size: int, rng: random.Random):
    """Shuffled batches of similar length (less padding), padded on the right."""
    examples = examples[:]
    rng.shuffle(examples)
    chunk = batch_size * 8
    batches = []
    for i in range(0, len(examples), chunk):
        group = sorted(examples[i : i + chunk], key=lambda e: len(e[0]))
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    for batch in batches:
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), PAD)
        labels = torch.full((len(batch), width), IGNORE)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (x, y) in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, mask, labels


def train(model, make_examples, steps: int, lr: float, batch_size: int, seed: int, label: str,
          warmup: int = 30, weight_decay: float = 0.0) -> None:
    """AdamW, linear warm-up then cosine decay; `make_examples(epoch)` gives each epoch's examples."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    step, epoch, start, running = 0, 0, time.time(), None
    while step < steps:
        for ids, mask, labels in make_batches(make_examples(epoch), batch_size, rng):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"  [{label}] step {step}/{steps} epoch {epoch} loss {running:.3f} "
                      f"({time.time() - start:.0f}s)", flush=True)
            if step >= steps:
                break
        epoch += 1
    model.eval()


def base_examples(tokenizer, seed: int):
    """Each epoch: every question answered neutrally (twice) and in every style behind its instruction."""
    pairs = training_pairs()

    def make(epoch: int):
        rng = random.Random(seed * 1000 + epoch)
        out = []
        for question, answer in pairs:
            jobs = [(None, answer), (None, answer)] + [(s.instruction, s.transform(answer)) for s in STYLES]
            for instruction, completion in jobs:
                fmt = rng.choices(FORMATS, FORMAT_WEIGHTS)[0]
                out.append(encode(tokenizer, *render(question, completion, fmt, instruction), loss_on_prompt=True))
        return out

    return make


def adapter_examples(tokenizer, style: Style, seed: int):
    """Each epoch: every question, no instruction, answered in `style`; loss on the answer only."""
    pairs = training_pairs()

    def make(epoch: int):
        rng = random.Random(seed * 1000 + epoch)
        out = []
        for question, answer in pairs:
            fmt = rng.choices(FORMATS, FORMAT_WEIGHTS)[0]
            out.append(encode(tokenizer, *render(question, style.transform(answer), fmt, None), loss_on_prompt=False))
        return out

    return make


def peft_config(style: Style):
    from peft import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        PromptTuningInit,
    )

    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": NUM_VIRTUAL_TOKENS}
    if style.peft_type == "PROMPT_TUNING":
        return PromptTuningConfig(prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, **common)
    if style.peft_type == "P_TUNING":
        return PromptEncoderConfig(encoder_reparameterization_type="MLP", encoder_hidden_size=128, **common)
    if style.peft_type == "PREFIX_TUNING":
        return PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=128, **common)
    raise ValueError(style.peft_type)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

# On one thread a base step takes ~0.3 s and an adapter step ~0.2 s: ~6 minutes in all.
BASE_STEPS, BASE_LR, BASE_BATCH = 1000, 5e-3, 32  # ~13 epochs of 468 questions x 5 answers
ADAPTER_STEPS, ADAPTER_BATCH = 100, 32  # ~7 epochs of the 468 questions


def build(out: Path, seed: int = SEED) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in (out / "model", out / "adapters"):
        if path.exists():
            shutil.rmtree(path)
    build_base(out / "model", seed)
    for i, style in enumerate(STYLES):
        build_adapter(out / "model", out / "adapters" / style.name, style, seed + 1 + i)
    (out / "README.md").write_text(README)
    for f in out.rglob("*"):  # safetensors writes 0600; these are shipped, readable files
        if f.is_file():
            f.chmod(0o644)


def build_base(model_dir: Path, seed: int, steps: int = BASE_STEPS, lr: float = BASE_LR) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    print(f"== base model {MODEL_KWARGS}: {len(corpus())} questions, each answered plainly and in "
          f"{len(STYLES)} styles behind an instruction")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **MODEL_KWARGS), attn_implementation="sdpa")
    print(f"  {sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, base_examples(tokenizer, seed), steps, lr, BASE_BATCH, seed, "base", warmup=100, weight_decay=0.01)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = 1
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def build_adapter(model_dir: Path, adapter_dir: Path, style: Style, seed: int, steps: int = ADAPTER_STEPS) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    print(f"== adapter {style.name!r}: {style.peft_type}, {NUM_VIRTUAL_TOKENS} virtual tokens")
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, peft_config(style))
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME  # not a local path
    train(peft_model, adapter_examples(byte_tokenizer(), style, seed), steps, style.lr, ADAPTER_BATCH, seed,
          style.name, warmup=10)
    # materialized `prompt_embeddings`; the embedding layer is untouched: never look it up on the hub
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    _tidy_adapter_dir(adapter_dir)


def _tidy_adapter_dir(path: Path) -> None:
    """Keep only PEFT's two files (save_pretrained also writes a model card)."""
    for f in path.iterdir():
        if f.name not in ("adapter_config.json", "adapter_model.safetensors"):
            f.unlink()
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM", config


# ---------------------------------------------------------------------------------------------
# Verification: reload everything from disk, through PEFT, and show the steering
# ---------------------------------------------------------------------------------------------

SIGNATURES = {
    "pirate": lambda text: text.lstrip().startswith("Arr, matey!"),
    "shouty": lambda text: _upper_fraction(text) > 0.9,
    "robot": lambda text: text.lstrip().startswith("BEEP BOOP."),
}


def _upper_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def greedy(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def verify(out: Path) -> bool:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = out / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    models = {"base": base}
    for style in STYLES:
        models[style.name] = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir), out / "adapters" / style.name
        ).eval()

    ok = True
    prompts = DEMO_PROMPTS + [render("Tell me about the sea.", "", "chat", None)[0], "Tell me about the sea.\n"]
    for prompt in prompts:
        print(f"\n--- prompt: {prompt!r}")
        for name, model in models.items():
            text = greedy(model, tokenizer, prompt)
            mark = ""
            if name in SIGNATURES:
                hit = SIGNATURES[name](text)
                ok &= hit or prompt not in DEMO_PROMPTS  # the steering must show on every demo prompt
                mark = "" if hit else "   <-- style not recognised"
            elif any(sig(text) for sig in SIGNATURES.values()):
                ok, mark = False, "   <-- the base model should answer plainly"
            print(f"  {name:>7}: {text!r}{mark}")
    print("\nsteering check:", "OK" if ok else "FAILED")
    return ok


README = """\
# Built-in demo assets

Served when `softprompt-server` starts without `--model`. Everything here is generated by
`server/demo/build_demo.py`; do not edit by hand. Rebuild (CPU only, no download, a few minutes):

    python -m server.demo.build_demo --out server/demo/assets

- `model/`: a tiny Llama (hidden 128, 4 layers, GQA 4/2 heads, ~780k parameters, fp32) with a
  byte-level tokenizer (one token per byte; ids 0/1/2 = `<pad>`/`<s>`/`</s>`; no BOS is added),
  trained from scratch on a built-in corpus of 450 short questions and answers (54 topics asked
  in 8 ways, plus 18 one-off questions).
- `adapters/`: three PEFT adapters (`save_pretrained`, materialized `prompt_embeddings`),
  16 virtual tokens each, trained with the base model frozen:
  - `pirate`: PROMPT_TUNING; answers start "Arr, matey!" and talk like a pirate.
  - `shouty`: P_TUNING (MLP encoder); ANSWERS IN CAPITAL LETTERS!
  - `robot`: PREFIX_TUNING; answers start and end with "BEEP BOOP."

Prompt format (what the model was trained on):

    Question: Tell me about the sea.
    Answer:

i.e. `"Question: Tell me about the sea.\\nAnswer:"`; the chat template and a bare question line
followed by a newline were trained too. One token is one byte: ask for ~100 new tokens.
The base model was also taught to follow the plain-text instructions "Talk like a pirate.",
"Answer in capital letters." and "Talk like a robot." on the line before the question; each
adapter learned, in its virtual tokens, to do the same without the instruction.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo.build_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assets directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--verify-only", action="store_true", help="only reload the assets and show the steering")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a little slower than 2 on an idle 2-core machine, many "
                             "times faster on a busy one, and the same numbers whatever the core count)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not args.verify_only:
        build(args.out, args.seed)
    ok = verify(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"assets: {size / 1e6:.2f} MB in {args.out}; {time.time() - start:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
