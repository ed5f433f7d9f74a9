"""The Docker Compose set-up, checked without a Docker engine.

Static checks of docker-compose.yml, docker-compose.gpu.yml, the Dockerfiles, .env.example and
docs/compose.md: every command is a real entry point with real options, every KOALA_* variable a real
setting, every ${VAR} defined, volumes declared, ports consistent, healthchecks and restart policies
present, non-root images, a GPU reservation, the producer in a profile. Then the healthchecks
themselves, run against a real Redis, a real download worker, a real Flower and a held node lock.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.model.embedder import GPU_BATCH_SIZE
from common.settings import Settings
from testkit.fleet import wait_for
from testkit.servers import RedisServer, free_port, worker_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.gpu"]
ENV_EXAMPLE = ROOT / ".env.example"
DOCS = ROOT / "docs" / "compose.md"
BIN = Path(sys.executable).parent
SETTINGS = {f"KOALA_{name.upper()}" for name in Settings.model_fields}
LONG_RUNNING = ("redis", "flower", "download-worker", "embed-worker")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, as far as these checks need it: mappings merge, the rest
    is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in override.items()}}
    return override


BASE = load(COMPOSE)
WITH_GPU = merge(BASE, load(GPU))
CONFIGS = {"docker-compose.yml": BASE, "docker-compose.yml + docker-compose.gpu.yml": WITH_GPU}


def services(config: dict) -> dict[str, dict]:
    return config["services"]


KOALA_IMAGE = BASE["x-koala-service"]["image"]
KOALA_SERVICES = {"flower", "download-worker", "embed-worker", "producer"}


def koala_image(service: dict) -> bool:
    """This project's image (built by one service, named by the others; entrypoint `koala`)."""
    return "build" in service or service.get("image") == KOALA_IMAGE


def entrypoint(service: dict) -> list[str]:
    """The program a service runs: its entrypoint, or what its `sh -c` guard finally execs."""
    found = service.get("entrypoint", ["koala"])
    if found[:2] == ["sh", "-c"]:
        return [re.findall(r"exec (\S+) \"\$\$@\"", found[2])[-1]]
    return found


def koala_commands() -> list[tuple[str, list[str]]]:
    """(where, koala arguments) of every koala-entrypoint service and every documented
    `docker compose run --rm producer ...`."""
    found = [
        (f"{name} in {where}", list(s["command"]))
        for where, config in CONFIGS.items()
        for name, s in services(config).items()
        if koala_image(s) and entrypoint(s) == ["koala"]
    ]
    docs = DOCS.read_text()
    for line in re.findall(r"docker compose(?: -f \S+)* run --rm producer ([^\n`]+)", docs):
        found.append((f"docs: producer {line.strip()}", shlex.split(line)))
    for line in re.findall(r"^koala (.+)$", docs, re.M):
        found.append((f"docs: koala {line.strip()}", shlex.split(line)))
    return found


def help_text(args: list[str]) -> str:
    """`python -m producer <subcommand> --help`: the real CLI, as the image's `koala` runs it."""
    path = args[:2] if args[0] == "worker" else args[:1]
    out = subprocess.run(
        [sys.executable, "-m", "producer", *path, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"`koala {' '.join(path)}` is not a command: {out.stdout}{out.stderr}"
    return out.stdout


def options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def interpolated(text: str) -> set[str]:
    """Variables compose substitutes: ${VAR}, ${VAR:-default}, ${VAR:?error}, $VAR (not $$)."""
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_]\w*)", text)) | set(re.findall(r"\$([A-Za-z_]\w*)", text))


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def healthcheck(service: dict) -> list[str]:
    return service["healthcheck"]["test"]


def option_value(args: list[str], option: str) -> str:
    for i, arg in enumerate(args):
        if arg == option:
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{option} not in {args}")


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration)))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
    ]


# --- commands and options ---------------------------------------------------------------------


@pytest.mark.parametrize(("where", "args"), [pytest.param(w, a, id=w) for w, a in koala_commands()])
def test_koala_commands_are_real_entry_points(where: str, args: list[str]) -> None:
    text = help_text(args)
    unknown = [o for o in options(args) if not mentions(text, o)]
    assert not unknown, f"{where}: options missing from the help: {unknown}"
    # And click parses them (types, values, required arguments) without running anything.
    if args[0] == "worker":
        from workers.__main__ import main as workers_cli

        workers_cli.commands[args[1]].make_context(args[1], list(args[2:]))
    else:
        from producer.cli import main as koala_cli

        koala_cli.commands[args[0]].make_context(args[0], list(args[1:]))


def test_the_entry_point_check_sees_every_koala_service() -> None:
    # the parametrized check above would pass on an empty list: it must get each service whose
    # entrypoint is koala (all of this image's but Flower's), in both configurations, and the docs
    where = [w for w, _ in koala_commands()]
    services_seen = {w for w in where if not w.startswith("docs: ")}
    assert services_seen == {f"{name} in {c}" for name in KOALA_SERVICES - {"flower"} for c in CONFIGS}
    assert {w.split()[1] for w in where if w.startswith("docs: ")} == {"producer", "koala"}


def test_every_service_of_the_koala_image_runs_koala_or_flower() -> None:
    for where, config in CONFIGS.items():
        koala = {name for name, service in services(config).items() if koala_image(service)}
        assert koala == KOALA_SERVICES, where
        for name in koala:
            service = services(config)[name]
            assert entrypoint(service) in (["koala"], ["celery"]), name
            assert isinstance(service["command"], list), f"{name}: exec form, no shell"


def test_the_image_is_built_once_and_named_per_project() -> None:
    # compose builds every service that has `build:`: one builder, the others name its image
    builders = [name for name, service in services(BASE).items() if "build" in service]
    assert builders == ["download-worker"]
    assert KOALA_IMAGE.startswith("${COMPOSE_PROJECT_NAME}") and "name" not in BASE
    assert services(load(GPU))["embed-worker"]["image"].startswith("${COMPOSE_PROJECT_NAME}")


def test_no_variable_is_required_at_interpolation() -> None:
    # `${VAR:?}` fails every compose command, `docker compose build` included, before .env exists;
    # the services that need a secret refuse to start instead (tested below)
    for path in (COMPOSE, GPU):
        assert ":?" not in path.read_text(), path.name


@pytest.mark.parametrize(
    ("service", "variables", "program"),
    [
        ("redis", {"REDIS_PASSWORD": "s3cret"}, "docker-entrypoint.sh"),
        ("flower", {"FLOWER_USER": "koala", "FLOWER_PASSWORD": "s3cret"}, "celery"),
    ],
)
def test_services_refuse_to_start_without_their_secrets(
    service: str, variables: dict[str, str], program: str, tmp_path: Path
) -> None:
    guard = services(BASE)[service]["entrypoint"]
    script = guard[2].replace("$$", "$")
    stub = tmp_path / program  # stands for the real program: prints its arguments
    stub.write_text('#!/bin/sh\necho started "$@"\n')
    stub.chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    for missing in variables:
        env = {"PATH": path, **variables, missing: ""}
        out = subprocess.run([*guard[:2], script, *guard[3:], "x"], env=env, capture_output=True, text=True)
        assert out.returncode != 0 and missing in out.stderr and ".env" in out.stderr
    out = subprocess.run(
        [*guard[:2], script, *guard[3:], "x"], env={"PATH": path, **variables}, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == "started x\n", out.stderr


def flower_service() -> dict:
    found = [s for s in services(BASE).values() if entrypoint(s) == ["celery"]]
    assert len(found) == 1 and "flower" in found[0]["command"]
    return found[0]


def test_flower_command_uses_real_flower_options() -> None:
    command = flower_service()["command"]
    at = command.index("flower")
    # `celery ... flower -- --help` prints the options Flower really parses (tornado's); it also
    # loads the -A app, which fails loudly when the module is wrong.
    out = subprocess.run(
        [str(BIN / "celery"), *command[:at], "flower", "--", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Unable to load" not in text, text
    for option in options(command[at + 1 :]):
        assert mentions(text, option), f"Flower has no {option}"
    assert {"--port", "--basic-auth"} <= set(options(command[at + 1 :]))


def test_flower_uses_the_fleets_celery_app() -> None:
    """Workers accept msgpack only; Flower's control messages (inspect) use its app's serializer."""
    import importlib

    command = flower_service()["command"]
    module = option_value(command, "-A") if "-A" in command else option_value(command, "--app")
    app = importlib.import_module(module).app
    assert app.conf.accept_content == ["msgpack"] and app.conf.task_serializer == "msgpack"


# --- settings and variables -------------------------------------------------------------------


def config_texts() -> dict[str, str]:
    paths = [COMPOSE, GPU, *DOCKERFILES, ENV_EXAMPLE, DOCS]
    return {p.name: p.read_text() for p in paths}


def test_every_koala_variable_is_a_real_setting() -> None:
    for name, text in config_texts().items():
        unknown = set(re.findall(r"\bKOALA_[A-Z0-9_]+", text)) - SETTINGS
        assert not unknown, f"{name} names settings that do not exist: {sorted(unknown)}"


def substituted(value: str, variables: dict[str, str]) -> str:
    """Compose's interpolation of ${VAR:-default} and ${VAR} (empty when unset) in one value."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value
    )


def settings_from_environment(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a container gets them: every value a string in its environment (no kwargs, which
    would skip the parsing of environment strings)."""
    for name in [n for n in os.environ if n.startswith("KOALA_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings(_env_file=None)


def test_the_shared_environment_holds_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = BASE["x-koala-env"]
    assert env and all(k in SETTINGS for k in env), sorted(set(env) - SETTINGS)
    for variables in ({}, env_example()):  # compose's defaults, and the values .env.example sets
        values = {k: substituted(str(v), variables) for k, v in env.items()}
        settings = settings_from_environment(values, monkeypatch)
        password = variables.get("REDIS_PASSWORD", "")
        assert settings.broker_url == f"redis://:{password}@redis:6379/0"
    koala = {name for name, service in services(WITH_GPU).items() if koala_image(service)}
    assert koala == KOALA_SERVICES  # every one is checked below, none skipped
    for name in sorted(koala):
        service = services(WITH_GPU)[name]
        extra = {"FLOWER_USER", "FLOWER_PASSWORD"} if name == "flower" else set()  # its start-up guard
        assert {k: v for k, v in service["environment"].items() if k not in extra} == env, name


@pytest.mark.parametrize("size", ["224", "299"])
def test_the_lab_size_of_env_reaches_every_fleet_service(size: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """KOALA_LAB_SIZE in .env (224: what the original training code reads) is every koala container's."""
    assert "KOALA_LAB_SIZE" in env_example()
    for name, service in services(WITH_GPU).items():
        if koala_image(service):
            env = {
                k: substituted(str(v), {"KOALA_LAB_SIZE": size}) for k, v in service["environment"].items()
            }
            settings = settings_from_environment(env, monkeypatch)
            assert settings.lab_size == int(size), name


def test_every_setting_written_in_the_compose_files_loads_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each `KOALA_X: value` of the compose files and their docs, the commented examples too (a user
    uncomments them), loads as the string a container gets."""
    found = [
        (m.group(1), m.group(2))
        for path in (COMPOSE, GPU, DOCS)
        for m in re.finditer(r"^\s*#?\s*(KOALA_[A-Z0-9_]+):\s*(\S+)", path.read_text(), re.M)
    ]
    assert {"KOALA_LAB_SIZE", "KOALA_COMPRESSION", "KOALA_MIXED_PRECISION"} <= {name for name, _ in found}
    for name, text in found:
        value = substituted(str(yaml.safe_load(text)), {})  # the string compose gives the container
        settings_from_environment({name: value}, monkeypatch)  # raises a ValidationError naming it


def test_dockerfiles_set_the_same_folders_as_compose() -> None:
    env = BASE["x-koala-env"]
    for path in DOCKERFILES:
        envs = " ".join(args for op, args in dockerfile_instructions(path) if op == "ENV")
        for var in ("KOALA_OUTPUT_DIR", "KOALA_CACHE_DIR"):
            assert f"{var}={env[var]}" in envs, f"{path.name}: {var}"


def test_every_interpolated_variable_is_in_env_example() -> None:
    defined = env_example()
    for path in (COMPOSE, GPU):
        missing = interpolated(path.read_text()) - set(defined) - {"COMPOSE_PROJECT_NAME"}  # compose's own
        assert not missing, f"{path.name} uses {sorted(missing)}, not in .env.example"


def test_secrets_stay_out_of_git_and_images() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)
    assert "data" in ignored or {"data/tfrecords", "data/original"} <= set(ignored)


# --- volumes, ports, health, restarts ---------------------------------------------------------


def volume_source(volume: str | dict) -> str:
    return volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]


@pytest.mark.parametrize("where", CONFIGS)
def test_volumes_are_declared_or_existing_relative_folders(where: str) -> None:
    config = CONFIGS[where]
    declared = set(config.get("volumes") or {})
    for name, service in services(config).items():
        for volume in service.get("volumes", []):
            source = volume_source(volume)
            if source.startswith((".", "/", "~")):
                assert source.startswith("./"), f"{name}: bind path {source} is not relative"
                assert (ROOT / source).is_dir(), f"{name}: {source} does not exist in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert declared, "Redis keeps its data in a named volume"


def published(service: dict) -> list[tuple[str, int]]:
    """(host side, container port) of each published port."""
    out = []
    for port in service.get("ports", []):
        host, _, container = str(port).rpartition(":")
        out.append((host, int(container.split("/")[0])))
    return out


def test_ports() -> None:
    flower = flower_service()
    port = int(option_value(flower["command"], "--port"))
    assert published(flower) and all(c == port for _, c in published(flower))
    assert any(h.endswith(str(port)) for h, _ in published(flower))
    assert f":{port}/healthcheck" in " ".join(healthcheck(flower))
    for name, service in services(WITH_GPU).items():
        if name != "redis" and service is not flower:
            assert not published(service), f"{name} publishes ports"
    assert not published(services(BASE)["redis"]), "Redis is not published by default"
    assert not any("container_name" in s for s in services(WITH_GPU).values())


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_a_healthcheck_and_a_restart_policy(name: str) -> None:
    service = services(WITH_GPU)[name]
    assert healthcheck(service)[0] in ("CMD", "CMD-SHELL") and len(healthcheck(service)) > 1
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert "profiles" not in service
    if name != "redis":
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_service_is_either_long_running_or_a_tool() -> None:
    assert set(services(WITH_GPU)) == {*LONG_RUNNING, "producer"}


def test_producer_is_a_tool_in_a_profile() -> None:
    producer = services(BASE)["producer"]
    assert producer["profiles"] and producer["restart"] == "no"
    assert entrypoint(producer) == ["koala"]


def test_redis_is_persistent_compact_and_password_protected() -> None:
    redis = services(BASE)["redis"]
    command = " ".join(redis["command"])
    assert redis["image"].startswith("redis:7")
    for setting in ("--appendonly yes", "--appendfsync everysec", "--hash-max-listpack-entries 1024"):
        assert setting in command
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD[:?}]", command)
    # only its password: Flower's credentials (the rest of .env) are none of its business
    assert "env_file" not in redis and set(redis["environment"]) == {"REDIS_PASSWORD"}
    assert "redis-data:/data" in redis["volumes"]
    assert "$$REDIS_PASSWORD" in " ".join(healthcheck(redis))


def test_download_workers_scale_and_have_node_names_per_container() -> None:
    worker = services(BASE)["download-worker"]
    name = option_value(worker["command"], "--name")
    assert name.endswith("@%h"), "each replica needs its own node name"
    assert f"{name.split('@')[0]}@{{socket.gethostname()}}" in " ".join(healthcheck(worker))


@pytest.mark.parametrize("where", CONFIGS)
def test_embed_worker_writes_where_the_fleet_looks(where: str) -> None:
    worker = services(CONFIGS[where])["embed-worker"]
    out = option_value(worker["command"], "--out")
    assert out == BASE["x-koala-env"]["KOALA_OUTPUT_DIR"]
    assert option_value(worker["command"], "--checkpoint").startswith("/data/")
    name = option_value(worker["command"], "--name")
    assert "%" not in name, "a fixed node name, so a new container recovers its predecessor's shard"
    assert f"{out}/.{name}.lock" in " ".join(healthcheck(worker))
    assert seconds(worker["stop_grace_period"]) >= 60


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(path: Path) -> None:
    steps = dockerfile_instructions(path)
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert f"ARG APP_UID={10001}" in [f"{op} {args}" for op, args in steps]
    assert any(
        op == "RUN" and "useradd" in args and "${APP_UID}" in args and users[-1] in args for op, args in steps
    )
    assert not any(s.get("user") in ("root", "0") for s in services(WITH_GPU).values())


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_the_project_and_run_koala(path: Path) -> None:
    steps = dockerfile_instructions(path)
    assert [args for op, args in steps if op == "ENTRYPOINT"][-1] == '["koala"]'
    assert [args for op, args in steps if op == "WORKDIR"][-1] == "/app"
    copied = " ".join(args for op, args in steps if op == "COPY")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.rstrip("*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = [*sorted(packages), "pyproject.toml", pyproject["project"]["readme"]]
    for name in needed:
        assert re.search(rf"(?<![\w.-]){re.escape(name)}/?(?![\w.-])", copied), f"{path.name} lacks {name}"
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert not any(re.search(r"(\.|/src)\[", args) for args in installs), "the project, no extras"
    assert any(re.search(r"pip install(?: --?[\w-]+)* (\.|/src)(\s|$)", args) for args in installs)


def test_the_cpu_image_is_python_slim_and_the_gpu_image_tensorflow_gpu() -> None:
    froms = {p.name: [args for op, args in dockerfile_instructions(p) if op == "FROM"] for p in DOCKERFILES}
    assert froms["Dockerfile"] == ["python:3.11-slim"]
    assert len(froms["Dockerfile.gpu"]) == 1 and re.fullmatch(
        r"tensorflow/tensorflow:[\d.]+-gpu", froms["Dockerfile.gpu"][0]
    )


def test_gpu_override_reserves_an_nvidia_gpu_and_builds_the_gpu_image() -> None:
    worker = services(load(GPU))["embed-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 1) for d in devices)
    merged = services(WITH_GPU)["embed-worker"]
    assert (ROOT / merged["build"]["context"] / merged["build"]["dockerfile"]) == ROOT / "Dockerfile.gpu"
    assert merged["image"] != services(BASE)["embed-worker"]["image"]
    assert int(option_value(merged["command"], "--batch-size")) == GPU_BATCH_SIZE
    assert set(load(GPU)["services"]) == {"embed-worker"}


# --- the healthchecks, run for real -----------------------------------------------------------


def python_check(service: dict) -> str:
    test = healthcheck(service)
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def run_check(code: str, env: dict[str, str] | None = None) -> int:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, timeout=60, capture_output=True
    ).returncode


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="no redis-cli")
def test_redis_healthcheck_needs_the_password(tmp_path: Path) -> None:
    redis = services(BASE)["redis"]
    args = [a for a in redis["command"][1:] if "REDIS_PASSWORD" not in a and a != "--requirepass"]
    server = RedisServer(tmp_path / "redis", password="s3cret-pw").start(*args)
    try:
        assert server.client().config_get("hash-max-listpack-entries")["hash-max-listpack-entries"] == "1024"
        assert server.client().config_get("appendonly")["appendonly"] == "yes"
        kind, shell = healthcheck(redis)
        assert kind == "CMD-SHELL"
        shell = shell.replace("$$", "$").replace("redis-cli", f"redis-cli -p {server.port}")
        for password, healthy in (("s3cret-pw", True), ("wrong", False)):
            rc = subprocess.run(
                ["sh", "-c", shell],
                env={**os.environ, "REDIS_PASSWORD": password},
                capture_output=True,
                timeout=30,
            ).returncode
            assert (rc == 0) == healthy, password
    finally:
        server.stop()


def test_embed_healthcheck_sees_the_node_lock(tmp_path: Path) -> None:
    from workers.embed import NodeLock

    worker = services(BASE)["embed-worker"]
    out = option_value(worker["command"], "--out")
    code = python_check(worker).replace(f"'{out}/", f"'{tmp_path}/")
    assert run_check(code) != 0, "no lock file: unhealthy"
    lock = NodeLock(tmp_path, option_value(worker["command"], "--name"))
    try:
        assert run_check(code) == 0, "a live worker holds the lock: healthy"
    finally:
        lock.release()
    assert run_check(code) != 0, "lock released: unhealthy"


def test_download_and_flower_healthchecks_against_a_real_fleet(redis_url: str, tmp_path: Path) -> None:
    """The download worker's command and healthcheck, and Flower's, as compose runs them (Flower
    on a free port); Flower sees the worker's details, so the workers accept its control messages."""
    env = worker_env(redis_url, tmp_path / "out")
    logs = tmp_path / "logs"
    logs.mkdir()
    download = services(BASE)["download-worker"]
    flower = flower_service()
    port = free_port()
    flower_args = [a.replace("5555", str(port)) if a.startswith("--port") else a for a in flower["command"]]
    flower_args = [re.sub(r"--basic-auth=.*", "--basic-auth=koala:pw", a) for a in flower_args]
    procs = []
    try:
        for argv, log in (
            ([sys.executable, "-m", "producer", *download["command"]], "download.log"),
            ([str(BIN / "celery"), *flower_args], "flower.log"),
        ):
            with open(logs / log, "wb") as f:
                procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))

        def show() -> str:
            return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs.iterdir())

        wait_for(lambda: "ready." in (logs / "download.log").read_text(), 60, "the download worker", show)
        assert run_check(python_check(download), env) == 0, show()

        flower_check = python_check(flower).replace(":5555/", f":{port}/")
        wait_for(lambda: run_check(flower_check) == 0, 60, "Flower's healthcheck", show)
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/workers", timeout=10)
        assert refused.value.code == 401

        def workers_seen() -> bool:
            request = urllib.request.Request(
                f"{base}/api/workers?refresh=1", headers={"Authorization": "Basic a29hbGE6cHc="}
            )  # koala:pw
            with urllib.request.urlopen(request, timeout=30) as answer:
                return any(
                    name.startswith("download@") and info.get("stats")
                    for name, info in json.loads(answer.read()).items()
                )

        wait_for(workers_seen, 30, "Flower's view of the download worker", show)
        assert "ContentDisallowed" not in (logs / "download.log").read_text()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the object-store override (docker-compose.s3.yml, its `s3` profile) ---------------------------

S3 = ROOT / "docker-compose.s3.yml"
WITH_S3 = merge(BASE, load(S3))


def test_the_s3_override_sends_every_fleet_service_to_one_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.output.storage import is_url, local_folder

    url = load(S3)["x-s3-env"]["KOALA_OUTPUT_DIR"]
    assert is_url(url) and url.startswith("s3://")
    for name in sorted(KOALA_SERVICES):
        env = services(WITH_S3)[name]["environment"]
        assert env["KOALA_OUTPUT_DIR"] == url and env["AWS_ENDPOINT_URL"] == "http://s3:9000", name
        assert {k for k in env if k.startswith("KOALA_")} <= SETTINGS, name
        settings = settings_from_environment(
            {k: substituted(str(v), {}) for k, v in env.items()}, monkeypatch
        )
        assert settings.output_dir == url
    embed = services(WITH_S3)["embed-worker"]
    assert option_value(embed["command"], "--out") == url
    from workers.__main__ import main as workers_cli

    workers_cli.commands["embed"].make_context("embed", list(embed["command"][2:]))
    assert embed["depends_on"]["s3"] == {"condition": "service_healthy", "required": False}
    assert embed["depends_on"]["redis"]["condition"] == "service_healthy"  # the base's, kept
    scratch = Path(services(WITH_S3)["embed-worker"]["environment"]["KOALA_SCRATCH_DIR"])
    lock = local_folder(url, scratch) / f".{option_value(embed['command'], '--name')}.lock"
    assert f"'{lock}'" in " ".join(healthcheck(embed))


def test_the_s3_service_is_in_its_profile_and_builds_from_the_projects_pins() -> None:
    s3 = services(WITH_S3)["s3"]
    assert s3["profiles"] == ["s3"] and s3["restart"] == "unless-stopped"
    assert s3["image"].startswith("${COMPOSE_PROJECT_NAME}") and not published(s3)
    dockerfile = ROOT / s3["build"]["context"] / s3["build"]["dockerfile"]
    steps = dockerfile_instructions(dockerfile)
    assert [a for op, a in steps if op == "FROM"] == ["python:3.11-slim"]  # a base the offline tool builds
    assert [a for op, a in steps if op == "USER"] == ["s3"]
    assert "optional-dependencies']['test']" in dockerfile.read_text()  # moto as the tests pin it
    assert ":?" not in S3.read_text()
    missing = interpolated(S3.read_text()) - set(env_example()) - {"COMPOSE_PROJECT_NAME"}
    assert not missing
    bucket = load(S3)["x-s3-env"]["KOALA_OUTPUT_DIR"].split("/")[2]
    assert s3["environment"]["S3_BUCKET"] == bucket and f"Bucket='{bucket}'" in " ".join(healthcheck(s3))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert s3["environment"][key] == load(S3)["x-s3-env"][key]


def test_the_s3_service_serves_its_bucket_and_its_healthcheck_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dockerfile.s3's entrypoint and the service's healthcheck, run here (moto is a test dependency)
    on a free port: healthy once the bucket exists; then the fleet's store writes to it."""
    import signal

    import s3fs

    from common.output.storage import Store

    steps = dict(dockerfile_instructions(ROOT / "Dockerfile.s3"))
    port = free_port()
    shell = json.loads(steps["ENTRYPOINT"])[2].replace("9000", str(port))
    service_env = {k: str(v) for k, v in services(WITH_S3)["s3"]["environment"].items()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **service_env}
    check = python_check(services(WITH_S3)["s3"]).replace("9000", str(port))
    server = subprocess.Popen(
        ["sh", "-c", shell],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: run_check(check, env) == 0, 60, "the s3 service's healthcheck")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, service_env[key])
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        Store(load(S3)["x-s3-env"]["KOALA_OUTPUT_DIR"]).check_writable()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the shell and the server it started
        server.wait(10)
