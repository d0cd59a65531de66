"""The one configuration object, built once from command-line flags and the environment.

Every flag `--some-flag` can also be set as `SOFTPROMPT_SOME_FLAG`; a flag given on the command
line wins over the environment. Nothing else in the project reads `os.environ`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.fast_path import ATTENTION, CUDA_GRAPHS, LINEAR, NATIVE_DECODE, FastPaths

ENV_PREFIX = "SOFTPROMPT_"


@dataclass(frozen=True)
class Config:
    model: str | None = None  # hub id or local directory; None serves the built-in demo model
    adapter_dir: Path | None = None  # persistent adapter store; None: the demo adapters, read-only
    adapter_store: str | None = None  # local directory or s3://bucket/prefix; None: adapter_dir
    s3_endpoint_url: str | None = None  # S3-compatible server of an s3:// store; None: boto3's own resolution
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    revision: str | None = None  # hub revision of --model
    max_batch_size: int = 64  # requests decoded together at most
    max_waiting: int = 256  # queued requests before new ones are refused (503)
    max_prefill_tokens: int = 2048  # prompt tokens computed in one engine step (longer prompts: in chunks)
    cpu_threads: str = "auto"  # auto | N | a CPU list ("8-15"): the engine's torch threads on CPU
    compile: str = "off"  # on | off: the packed forward under torch.compile (measured slower so far; --no-compile)
    fast_path: str = "on"  # on | off: off serves through transformers' forward, plain linears and SDPA attention
    cpu_linear: str = "auto"  # auto | avx2 | onednn | torch: the CPU linear layers' backend
    native_decode: str = "auto"  # auto | on | off: a CPU decoding step's layers in one C++ call
    attention_kernel: str = "auto"  # auto | kernel | sdpa: decoding attention in one kernel call, or SDPA per request
    cuda_graphs: str = "auto"  # auto | on | off: decoding steps replayed from CUDA graphs recorded at start-up
    kv_cache_memory: str = "auto"  # the KV pool: bytes ("4GiB") or a fraction of free device memory ("0.9")
    max_input_tokens: int = 2048  # longest prompt accepted (422 above)
    max_new_tokens: int = 1024  # largest max_new_tokens accepted (422 above)
    max_upload_bytes: int = 256 * 1024 * 1024  # adapter upload cap (413 above)
    max_virtual_tokens: int = 512  # most num_virtual_tokens an adapter may declare (422 above)
    max_request_bytes: int = 4 * 1024 * 1024  # any other request body (413 above), before it is parsed
    max_stop_sequences: int = 4  # stop sequences per request (422 above), as TGI
    allow_prompt_embeds: str = "off"  # on | off: vLLM's `prompt_embeds` (a torch.save pickle) on /v1/completions
    max_adapters: int = 10000  # adapters registered (and stored) at most; uploads past it get 507
    max_adapter_labels: int = 100  # adapters named in per-adapter metrics; the others count as "__other__"
    adapter_cache_memory: str = "0.25"  # materialized prefixes kept: bytes, or a fraction of the KV cache
    pin_adapters: str | None = None  # comma-separated names kept materialized always
    api_key: str | None = field(default=None, repr=False)  # required for generation when set
    admin_key: str | None = field(default=None, repr=False)  # required for adapter changes when set
    allow_hub_adapters: str | None = None  # hub repos (ids or glob patterns, comma-separated) any client may fetch
    shutdown_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM
    log_level: str = "info"

    @property
    def fast_paths(self) -> FastPaths:
        return FastPaths(self.fast_path == "on", self.cpu_linear, self.native_decode, self.attention_kernel,
                         self.cuda_graphs)

    @property
    def model_name(self) -> str:
        """The name clients use for the base model (OpenAI `model`, /info)."""
        return self.model or "softprompt-demo"


_HELP = {
    "model": "Hugging Face hub id or local directory of the base causal LM (default: built-in demo model)",
    "adapter_dir": "directory of PEFT adapters, registered at start-up; uploads are stored here "
                   "(with an s3:// --adapter-store: that store's local disk cache)",
    "adapter_store": "where adapters are stored: a local directory (same as --adapter-dir), or s3://bucket/prefix "
                     "(S3-compatible object storage, shared by several servers; credentials from boto3's standard "
                     "chain: AWS_* variables, ~/.aws, instance roles)",
    "s3_endpoint_url": "URL of the S3-compatible server (MinIO, Ceph, ...) for an s3:// --adapter-store "
                       "(default: boto3's resolution: AWS_ENDPOINT_URL, ~/.aws/config, then AWS)",
    "host": "address to listen on",
    "port": "port to listen on",
    "device": "auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
    "dtype": "auto (on a GPU: bf16 where supported, else fp16; on a CPU: bf16 where it computes it natively, "
             "AVX512-BF16 or AMX, else fp32), float32, bfloat16, float16",
    "revision": "hub revision (branch, tag or commit) of --model",
    "max_batch_size": "most requests decoded together",
    "max_waiting": "most queued requests; more are refused with 503 and Retry-After",
    "max_prefill_tokens": "prompt tokens computed in one engine step; longer prompts are prefilled in chunks "
                          "of this size alongside the running requests' decoding (larger: prompts computed "
                          "faster, running streams paused longer while a chunk computes)",
    "cpu_threads": "the engine's torch threads on CPU: auto (torch's default, but no more than the CPUs the process "
                   "may use nor its cgroup's CPU quota), a count N, or a list of CPUs to confine them to, one "
                   "thread each, like 8-15, 0,2,4,6 or 3-3",
    "compile": "on: run the model's packed forward under torch.compile (inductor), with CUDA graphs on a GPU; "
               "compiling takes a minute or more at start-up (the log and /info report it). Measured slower than "
               "eager so far on CPU and GPU (server/engine/compiled.py), so off by default (--no-compile: off)",
    "fast_path": "on: take the fast paths below where they run (each checked at start-up against transformers' plain "
                 "forward, and dropped for the plain path if it disagrees); off: transformers' own forward, plain "
                 "linears, one SDPA call per request's attention",
    "cpu_linear": "the CPU linear layers: auto (our AVX2 kernel where AVX2 is the CPU's best vector unit, else oneDNN), "
                  "avx2 (our kernel, on any CPU with AVX2 and FMA), onednn (oneDNN's packed weights), torch (plain "
                  "F.linear); a backend that cannot run here stops the start",
    "native_decode": "a CPU step's layers in one C++ call without the GIL (decoding steps; prefilling ones too on "
                     "AVX-512 CPUs): auto (where the linears run on packed weights, the AVX2 kernel's or oneDNN's, "
                     "and attention on the kernel), on (or stop the start), off",
    "attention_kernel": "a step's attention in one call: auto and kernel (our C++ kernel on CPU, every request's rows "
                        "on AVX-512 CPUs, decoding requests' elsewhere; variable-length flash attention on CUDA), "
                        "sdpa (one SDPA call per request)",
    "cuda_graphs": "on a GPU, decoding steps replayed from CUDA graphs recorded at start-up, one per batch size "
                   "(1, 2, 4, then every 8 up to --max-batch-size): auto (where the written-out forward and flash "
                   "attention run), on (or stop the start), off",
    "kv_cache_memory": "the key/value cache, allocated once: bytes (e.g. 4GiB, 512MiB) or a fraction of the device "
                       "memory free after loading the model (e.g. 0.9); auto: 0.9 on a GPU, 2GiB on CPU",
    "max_input_tokens": "longest prompt in tokens (longer: 422)",
    "max_new_tokens": "largest max_new_tokens a request may ask for (larger: 422)",
    "max_upload_bytes": "largest adapter upload in bytes (larger: 413)",
    "max_virtual_tokens": "most virtual tokens an adapter may declare (more: 422)",
    "max_request_bytes": "largest body of any other request in bytes, refused before parsing (larger: 413)",
    "max_stop_sequences": "most stop sequences per request (more: 422)",
    "allow_prompt_embeds": "on: accept vLLM's prompt_embeds on /v1/completions (base64 of torch.save of one tensor "
                           "[n, hidden], served as virtual tokens before the prompt; read with torch.load(weights_only="
                           "True), dense tensors only, sizes checked first); off: 422 naming this flag. "
                           "--allow-prompt-embeds alone means on. Our own soft_prompt (safetensors) needs no flag",
    "max_adapters": "most adapters registered and stored; an upload (or hub fetch) past it is refused with 507",
    "max_adapter_labels": "most adapters named in the per-adapter metrics (the first seen since start-up); "
                          "the others are counted under adapter=\"__other__\"",
    "adapter_cache_memory": "device memory for materialized adapter prefixes, least recently used evicted: bytes "
                            "(e.g. 512MiB) or a fraction of the KV cache (e.g. 0.25); evicted ones load again "
                            "from their saved prefix, with no model forward",
    "pin_adapters": "comma-separated adapter names kept materialized always (loaded at start-up)",
    "api_key": "if set, generation routes need 'Authorization: Bearer KEY' (or the --admin-key)",
    "admin_key": "if set, adapter uploads and deletions need 'Authorization: Bearer KEY'; a generation request "
                 "carrying it may fetch any hub adapter (adapter_source \"hub\")",
    "allow_hub_adapters": "comma-separated Hugging Face hub repo ids or glob patterns (e.g. acme/*) that any client "
                          "may have fetched with adapter_source \"hub\"; other repos need the --admin-key",
    "shutdown_timeout": "seconds running requests get to finish after SIGTERM",
    "log_level": "debug, info, warning or error",
}


_SWITCHES = ("allow_prompt_embeds",)  # on | off flags that, given alone, mean on


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _converter(f: dataclasses.Field):
    kind = str(f.type)
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    if kind.startswith("Path"):
        return Path
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt-server",
        description="Serve soft-prompt adapters on one frozen causal LM. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>.",
    )
    for f in dataclasses.fields(Config):
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=_converter(f),
            default=None,
            **({"nargs": "?", "const": "on"} if f.name in _SWITCHES else {}),
            help=f"{_HELP[f.name]} [env {env_var(f.name)}; default {f.default}]",
        )
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                        help="the same as --compile off")
    return parser


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Flags first, then `SOFTPROMPT_*` variables, then the defaults."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values = {}
    for f in dataclasses.fields(Config):
        raw = args[f.name]
        if raw is None and environ.get(env_var(f.name), "") != "":
            try:
                raw = _converter(f)(environ[env_var(f.name)])
            except ValueError:
                raise SystemExit(f"{env_var(f.name)}={environ[env_var(f.name)]!r} is not a valid {f.name}") from None
        if raw is not None:
            values[f.name] = raw
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    positive = ["port", "max_batch_size", "max_waiting", "max_prefill_tokens", "max_input_tokens",
                "max_new_tokens", "max_upload_bytes", "max_virtual_tokens", "max_request_bytes", "max_stop_sequences",
                "max_adapters", "max_adapter_labels"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise SystemExit(f"{_flag(name)} must be positive, got {getattr(config, name)}")
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype must be auto, float32, bfloat16 or float16, got {config.dtype!r}")
    try:
        parse_cpu_threads(config.cpu_threads)
    except ValueError as exc:
        raise SystemExit(f"--cpu-threads: {exc}") from None
    for name, allowed in (("compile", ("on", "off")), ("fast_path", ("on", "off")), ("allow_prompt_embeds", ("on", "off")), ("cpu_linear", LINEAR),
                          ("native_decode", NATIVE_DECODE), ("attention_kernel", ATTENTION),
                          ("cuda_graphs", CUDA_GRAPHS)):
        if getattr(config, name) not in allowed:
            raise SystemExit(f"{_flag(name)} must be {' or '.join(allowed)}, got {getattr(config, name)!r}")
    try:
        config.fast_paths
    except ValueError as exc:
        raise SystemExit(f"--native-decode: {exc}") from None
    for name in ("kv_cache_memory", "adapter_cache_memory"):
        try:
            parse_memory(getattr(config, name))
        except ValueError as exc:
            raise SystemExit(f"{_flag(name)}: {exc}") from None
    if config.shutdown_timeout < 0:
        raise SystemExit(f"--shutdown-timeout must be >= 0, got {config.shutdown_timeout}")
    _check_store(config)


def _check_store(config: Config) -> None:
    store = config.adapter_store
    if store is None:
        if config.s3_endpoint_url:
            raise SystemExit("--s3-endpoint-url needs an s3:// --adapter-store")
        return
    if "://" in store:
        if not store.startswith("s3://") or not store[len("s3://"):].split("/")[0]:
            raise SystemExit(f"--adapter-store {store!r}: use a local directory or s3://bucket/prefix")
    elif config.s3_endpoint_url:
        raise SystemExit("--s3-endpoint-url needs an s3:// --adapter-store")
    elif config.adapter_dir is not None and Path(store).resolve() != config.adapter_dir.resolve():
        raise SystemExit(f"--adapter-store {store} and --adapter-dir {config.adapter_dir} name two local "
                         "directories: give one (--adapter-dir is an s3:// store's cache)")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int | float | None:
    """'auto' -> None; '0.9' -> 0.9 (a fraction, in (0, 1]); '4GiB', '512MB', '1000000' -> bytes."""
    text = text.strip().lower()
    if text == "auto":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not 'auto', a fraction like 0.9, or a size like 4GiB or 512MB")
    number, unit = float(match.group(1)), match.group(2)
    if not unit and "." in match.group(1):
        if not 0 < number <= 1:
            raise ValueError(f"a fraction of free memory must be in (0, 1], got {number}")
        return number
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return size


def parse_cpu_threads(text: str) -> str | int | list[int]:
    """'auto' -> 'auto'; '4' -> 4 (threads); '0-3,8' -> [0, 1, 2, 3, 8] (CPUs). ValueError if malformed,
    zero, or naming a CPU twice."""
    text = text.strip().lower()
    if text == "auto":
        return text
    if text.isdigit():
        if int(text) < 1:
            raise ValueError("a thread count must be positive, got 0")
        return int(text)
    cpus: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"{text!r} is not 'auto', a thread count, or a CPU list like 1-7 or 0,2,4")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"{text!r}: the range {first}-{last} runs backwards")
        cpus.extend(range(first, last + 1))
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"{text!r} names a CPU twice")
    return cpus
