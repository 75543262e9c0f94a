"""Docker without a Docker engine (issue 8).

No project machine runs Docker, so the images are never built and the compose stack never starts here.
These tests check what a mistake in docker/ would break and can be seen without an engine:

- docker/compose.yaml parses and is wired coherently: start order gated by healthchecks, the trainers'
  MLFLOW_TRACKING_URI naming the mlflow service and port (and admitted by its --allowed-hosts), MLflow's
  backend URI naming the postgres service with its user, database and password variables, artifacts on a
  declared volume, every `mlflow server` flag known to the MLflow the project uses, every build file
  present, the GPU service behind a profile with the GPUs reserved;
- each Dockerfile installs what the README's set-up installs (the torch pin, the project, the [cuda]
  extra with the kernels built against that torch) and its ENTRYPOINT + CMD is the README's first run;
- nothing a Dockerfile copies is excluded by .dockerignore;
- every docker command documented in README.md and in the docker/ files' headers names files and images
  that exist, and its key=value arguments are valid keys of the ehrlong command it runs.

When a `docker compose` binary is present, `docker compose config` validates the file too.
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
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ehrlong.config import PRESETS_DIR, TrainConfig, parse
from ehrlong.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
README = REPO / "README.md"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TRAIN_ENTRYPOINT = ["python", "-m", "ehrlong.train"]
# A password for interpolation; the compose file requires one and must not carry its own.
ENV = {"POSTGRES_PASSWORD": "pw-from-env"}


# --- compose -----------------------------------------------------------------------------------------


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", ":?") and value == "":
            value = None
        if value is not None:
            return value
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return ""

    return _VAR.sub(sub, text)


def resolve(obj, env: dict[str, str]):
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [resolve(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, env) for k, v in obj.items()}
    return obj


def strings(obj):
    """Every string value of a parsed YAML tree (what compose interpolates; comments are gone)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list | dict):
        for x in obj.values() if isinstance(obj, dict) else obj:
            yield from strings(x)


def compose(env: dict[str, str] | None = None) -> dict:
    return resolve(yaml.safe_load(COMPOSE.read_text()), ENV if env is None else env)


def flag(command: list[str], name: str) -> str:
    """The value after `name` in an exec-form command line."""
    assert name in command, f"`{name}` missing from {command}"
    return command[command.index(name) + 1]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def named_volumes(service: dict) -> dict[str, str]:
    """{volume name: mount target} of a service's named-volume mounts (bind mounts are paths)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if not source.startswith((".", "/", "~", "$")):
            out[source] = target
    return out


def test_compose_declares_the_stack_and_every_volume_it_mounts():
    c = compose()
    assert set(c["services"]) == {"postgres", "mlflow", "trainer", "trainer-cuda"}
    used = {name for s in c["services"].values() for name in named_volumes(s)}
    declared = set(c.get("volumes") or {})
    assert used == declared, (
        f"mounted but not declared: {used - declared}; declared, unused: {declared - used}"
    )
    assert named_volumes(c["services"]["postgres"]) == {"pgdata": "/var/lib/postgresql/data"}
    # Image major 17 keeps PGDATA at /var/lib/postgresql/data (18 moved it, and the volume would miss it).
    assert c["services"]["postgres"]["image"] == "postgres:17"


def test_start_order_is_gated_by_healthchecks():
    s = compose()["services"]
    pg_test = " ".join(s["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg_test and "POSTGRES_USER" in pg_test and "POSTGRES_DB" in pg_test
    assert "-h 127.0.0.1" in pg_test  # TCP: the image's init-time server listens on the socket only
    assert s["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    port = flag(s["mlflow"]["command"], "--port")
    health = " ".join(s["mlflow"]["healthcheck"]["test"])
    assert f"http://localhost:{port}/health" in health
    for name in ("trainer", "trainer-cuda"):
        assert s[name]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}, name


def test_trainers_get_time_to_checkpoint_on_stop():
    # SIGTERM -> finish the step, write last.ckpt (ehrlong/safety.py); compose's default grace is 10 s.
    units = {"s": 1, "m": 60, "h": 3600}
    for name in ("trainer", "trainer-cuda"):
        grace = compose()["services"][name]["stop_grace_period"]
        seconds = sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", grace))
        assert seconds >= 60, (name, grace)


@pytest.mark.parametrize(
    "env", [ENV, {"POSTGRES_PASSWORD": "s3cret", "POSTGRES_USER": "alice", "POSTGRES_DB": "tracking"}]
)
def test_mlflow_backend_is_the_postgres_service(env):
    s = compose(env)["services"]
    pg = env_of(s["postgres"])
    uri = urlsplit(flag(s["mlflow"]["command"], "--backend-store-uri"))
    assert uri.scheme.split("+")[0] == "postgresql"
    assert uri.hostname == "postgres" and uri.hostname in s
    assert uri.port == 5432  # the postgres image's port; the service publishes no other
    assert uri.username == pg["POSTGRES_USER"] == env.get("POSTGRES_USER", "ehrlong")
    assert uri.path.lstrip("/") == pg["POSTGRES_DB"] == env.get("POSTGRES_DB", "ehrlong")
    # The password reaches libpq through PGPASSWORD, never through the URI (logged, shown by inspect).
    assert uri.password is None
    assert env_of(s["mlflow"])["PGPASSWORD"] == pg["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]


def test_the_database_password_is_required_not_written_down():
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for service, key in (("postgres", "POSTGRES_PASSWORD"), ("mlflow", "PGPASSWORD")):
        assert raw[service]["environment"][key].startswith("${POSTGRES_PASSWORD:?"), (service, key)
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        compose({})


def test_env_example_sets_every_variable_the_compose_file_reads():
    example = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    used = {
        m.group(1) or m.group(4)
        for s in strings(yaml.safe_load(COMPOSE.read_text()))
        for m in _VAR.finditer(s)
    }
    used -= {None}
    assert used <= set(example), f"not in docker/.env.example: {sorted(used - set(example))}"
    compose(example)  # interpolates with nothing missing
    assert "docker/.env" in (REPO / ".dockerignore").read_text()
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_mlflow_serves_artifacts_from_a_declared_volume():
    s = compose()["services"]["mlflow"]
    command = s["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command and "--no-serve-artifacts" not in command
    destination = flag(command, "--artifacts-destination")
    assert destination in named_volumes(s).values(), f"{destination} is not on a volume: {s['volumes']}"
    # Reachable from the other containers (the default 127.0.0.1 binds the container's loopback only).
    assert flag(command, "--host") == "0.0.0.0"


def test_mlflow_server_flags_exist_in_the_projects_mlflow():
    from mlflow.cli import server

    known = {opt for p in server.params for opt in (*p.opts, *p.secondary_opts)}
    command = compose()["services"]["mlflow"]["command"]
    flags = [a for a in command[2:] if a.startswith("--")]
    assert flags and not set(flags) - known, f"unknown to `mlflow server`: {set(flags) - known}"


# SQLAlchemy driver name -> the package that provides it.
POSTGRES_DRIVERS = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]"}


def test_mlflow_image_pins_a_version_the_project_accepts_with_the_postgres_driver():
    text = (DOCKER / "Dockerfile.mlflow").read_text()
    pinned = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", text, re.M).group(1)
    spec = next(
        Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "mlflow"
    )
    assert spec.specifier.contains(pinned), (pinned, str(spec))
    run = " ".join(args for instr, args in instructions(DOCKER / "Dockerfile.mlflow") if instr == "RUN")
    assert '"mlflow==${MLFLOW_VERSION}"' in run
    # The backend URI names its driver, and the image installs it. A bare postgresql:// would leave the
    # choice to SQLAlchemy, whose 2.1 default (psycopg 3) is not the driver installed: the server would
    # not start (seen with mlflow 3.17.2 and SQLAlchemy 2.1.9 against a local PostgreSQL).
    scheme = urlsplit(flag(compose()["services"]["mlflow"]["command"], "--backend-store-uri")).scheme
    dialect, _, driver = scheme.partition("+")
    assert dialect == "postgresql" and driver in POSTGRES_DRIVERS, scheme
    assert f'"{POSTGRES_DRIVERS[driver]}==' in run, (driver, run)


def test_trainers_track_to_the_mlflow_service_and_are_let_in():
    from mlflow.server.security_utils import is_allowed_host_header

    s = compose()["services"]
    command = s["mlflow"]["command"]
    port = int(flag(command, "--port"))
    allowed = [h.strip() for h in flag(command, "--allowed-hosts").split(",")]
    for name in ("trainer", "trainer-cuda"):
        uri = urlsplit(env_of(s[name])["MLFLOW_TRACKING_URI"])
        assert (uri.scheme, uri.hostname, uri.port) == ("http", "mlflow", port), name
        # MLflow 3 answers 403 to a Host header its --allowed-hosts does not admit.
        assert is_allowed_host_header(allowed, uri.netloc), (uri.netloc, allowed)
    # The UI from the host's browser, through the published port.
    (mapping,) = s["mlflow"]["ports"]
    host_ip, published, target = mapping.split(":")
    assert (host_ip, int(target)) == ("127.0.0.1", port)
    assert is_allowed_host_header(allowed, f"localhost:{published}")
    assert not is_allowed_host_header(allowed, f"attacker.example:{published}")


def test_every_build_file_exists_and_each_trainer_uses_its_image():
    s = compose()["services"]
    for name, service in s.items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == REPO, (name, context)
            assert (context / service["build"]["dockerfile"]).is_file(), name
    assert s["trainer"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert s["trainer-cuda"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert s["mlflow"]["build"]["dockerfile"] == "docker/Dockerfile.mlflow"


def test_gpu_trainer_reserves_gpus_behind_a_profile():
    s = compose()["services"]
    assert "profiles" not in s["trainer"]  # `up` runs the CPU trainer ...
    assert s["trainer-cuda"]["profiles"] == ["cuda"]  # ... and leaves the GPU one out
    (device,) = s["trainer-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_trainer_commands_are_valid_train_configs():
    s = compose()["services"]
    for name in ("trainer", "trainer-cuda"):
        assert entrypoint(DOCKER / Path(s[name]["build"]["dockerfile"]).name) == TRAIN_ENTRYPOINT
        parse(TrainConfig, s[name]["command"], presets_dir=PRESETS_DIR)
    # The CPU service runs the README's first run, as the CPU image does by default.
    assert s["trainer"]["command"] == readme_first_run()[len(TRAIN_ENTRYPOINT) :]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no `docker compose` here (no project machine has one)",
)
def test_docker_compose_config_accepts_the_file():
    out = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--profile", "cuda", "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
    )
    assert out.returncode == 0, out.stderr


# --- Dockerfiles -------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instr, _, args = pending.strip().partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        pending = ""
    return out


def entrypoint(path: Path, which: str = "ENTRYPOINT") -> list[str]:
    (args,) = [a for i, a in instructions(path) if i == which]
    return json.loads(args)  # exec form: a shell form would not pass `docker run` arguments on


def runs(path: Path) -> list[list[str]]:
    """Each RUN instruction as shell words, split at && into commands."""
    out = []
    for instr, args in instructions(path):
        if instr == "RUN":
            for command in args.split("&&"):
                out.append(shlex.split(command))
    return out


def pip_installs(path: Path) -> list[list[str]]:
    """The words after `pip install` of every pip install command, environment assignments dropped."""
    out = []
    for words in runs(path):
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]
        if words[:2] == ["pip", "install"]:
            out.append(words[2:])
    return out


def readme_setup() -> list[str]:
    """The README's set-up command: `pip install torch==X -e '.[dev]'`."""
    for line in bash_lines(README.read_text()):
        for command in line.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] and any(w.startswith("torch==") for w in words):
                return words[2:]
    raise AssertionError("README.md has no `pip install torch==...` set-up command")


def readme_first_run() -> list[str]:
    """The first `python -m ehrlong.train ...` in the README (its quick start's first run)."""
    for line in bash_lines(README.read_text()):
        words = shlex.split(line, comments=True)
        if words[: len(TRAIN_ENTRYPOINT)] == TRAIN_ENTRYPOINT:
            return words
    raise AssertionError("README.md has no `python -m ehrlong.train` command")


def torch_pin(words: list[str]) -> str:
    (pin,) = [w for w in words if w.startswith("torch==")]
    return pin


def editable_target(words: list[str]) -> str:
    return words[words.index("-e") + 1]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_installs_the_readme_setup(name):
    path = DOCKER / name
    setup = readme_setup()
    first, *rest = pip_installs(path)
    # torch first, pinned as in the README, from the index of the build this image needs.
    assert torch_pin(first) == torch_pin(setup), (first, setup)
    index = first[first.index("--index-url") + 1]
    assert index.startswith("https://download.pytorch.org/whl/"), index
    project = [words for words in rest if "-e" in words]
    assert len(project) == 1, f"{name}: one editable install of the project, got {project}"
    (project,) = project
    assert editable_target(setup).startswith(".[") and editable_target(project).split("[")[0] == "."
    if name == "Dockerfile.cpu":
        assert index.endswith("/cpu")
        assert editable_target(project) == "."  # no extras: [dev] is tests, [cuda] cannot build on CPU
    else:
        assert index.endswith("/cu130"), index
        assert editable_target(project) == ".[cuda]"
        # Built against the torch already installed, which no dependency may move afterwards.
        assert "--no-build-isolation" in project
        assert torch_pin(project) == torch_pin(setup)


def test_cuda_image_matches_torchs_cuda_and_builds_the_kernels():
    path = DOCKER / "Dockerfile.cuda"
    (base,) = [a for i, a in instructions(path) if i == "FROM"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu[\d.]+", base)
    assert m, f"{base}: the kernels compile with nvcc, which only -devel images carry"
    (first, *_) = pip_installs(path)
    index = first[first.index("--index-url") + 1]
    assert index.endswith(f"/cu{m.group(1)}{m.group(2)}"), (base, index)  # nvcc major == torch's CUDA major
    extra = [Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["cuda"]]
    assert set(extra) == {"mamba-ssm", "causal-conv1d"}
    (kernel_run,) = [" ".join(w) for w in runs(path) if "-e" in w and ".[cuda]" in w]
    for knob in ("MAMBA_FORCE_BUILD=", "CAUSAL_CONV1D_FORCE_BUILD=", "MAX_JOBS=", "TORCH_CUDA_ARCH_LIST="):
        assert knob in kernel_run, knob
    args = {a.split("=", 1)[0] for i, a in instructions(path) if i == "ARG"}
    assert {"KERNELS_FORCE_BUILD", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST"} <= args


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"])
def test_base_image_python_meets_requires_python(name):
    from packaging.specifiers import SpecifierSet

    (base,) = [a for i, a in instructions(DOCKER / name) if i == "FROM"]
    ubuntu_python = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10", "ubuntu20.04": "3.8"}
    m = re.fullmatch(r"python:(\d+\.\d+)(?:[.-].*)?", base)
    python = m.group(1) if m else ubuntu_python[base.rsplit("-", 1)[-1]]
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"]), (name, python)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_default_command_is_the_readme_first_run(name):
    path = DOCKER / name
    assert entrypoint(path) == TRAIN_ENTRYPOINT
    command = entrypoint(path, "CMD")
    assert TRAIN_ENTRYPOINT + command == readme_first_run()
    parse(TrainConfig, command, presets_dir=PRESETS_DIR)


# --- .dockerignore -----------------------------------------------------------------------------------


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return True  # the pattern names a folder above the path: everything under it goes with it
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns relative to the context root, `*` within one name, `**` any depth,
    `!` re-includes, the last matching pattern wins."""
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        parts = pattern.lstrip("!").strip("/").split("/")
        if _match(path.split("/"), parts):
            out = not negate
    return out


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest():
    patterns = dockerignore()
    copied = []
    for name in ("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"):
        for instr, args in instructions(DOCKER / name):
            if instr == "COPY":
                *sources, _ = shlex.split(args)
                copied += sources
    assert {"pyproject.toml", "README.md", "ehrlong", "configs", "tokenizers", "tasks"} <= set(copied)
    for source in copied:
        path = REPO / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert not ignored(rel, patterns), f"{rel} is copied by an image but .dockerignore drops it"
    assert not ignored("ehrlong/data/meds.py", patterns)  # /data is the generated cohort, not the package
    for heavy in (".venv/bin/python", "data/synthetic/x.parquet", "runs/mlflow.db", "cache/x", ".git/HEAD"):
        assert ignored(heavy, patterns), heavy
    assert ignored("docker/.env", patterns)


# --- documented commands -----------------------------------------------------------------------------


def bash_lines(markdown: str) -> list[str]:
    """Lines of the ```bash blocks, continuation lines joined."""
    out, block, pending = [], False, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if block:
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            if pending.strip():
                out.append(pending.strip())
            pending = ""
    return out


def header_commands(path: Path) -> list[str]:
    """`docker ...` commands shown in a file's comments."""
    return [m.group(1) for m in re.finditer(r"^#\s+(docker\s.*)$", path.read_text(), re.M)]


DOC_SOURCES = {
    "README.md": lambda: [c for c in bash_lines(README.read_text()) if c.startswith("docker ")],
    **{f"docker/{p.name}": (lambda p=p: header_commands(p)) for p in sorted(DOCKER.glob("Dockerfile.*"))},
    "docker/compose.yaml": lambda: header_commands(COMPOSE),
}

# `docker run` / `docker compose run` options that take a value (the rest used here are switches).
VALUE_OPTIONS = {
    "-v",
    "--volume",
    "-e",
    "--env",
    "--env-file",
    "--gpus",
    "--entrypoint",
    "-p",
    "--publish",
    "--name",
    "-w",
    "--workdir",
    "--network",
    "--shm-size",
    "-u",
    "--user",
    "--mount",
}
SWITCHES = {"--rm", "-d", "--detach", "-i", "-t", "-it", "--service-ports", "--no-deps", "--build"}


def split_run(words: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """`run` options, the image (or service) and the arguments after it."""
    options, i = {}, 0
    while i < len(words) and words[i].startswith("-"):
        word = words[i]
        name = word.split("=", 1)[0]
        if name in VALUE_OPTIONS:
            if "=" in word:
                options[name] = word.split("=", 1)[1]
            else:
                options[name] = words[i + 1]
                i += 1
        else:
            assert name in SWITCHES, (
                f"option {word} unknown to this test: add it to VALUE_OPTIONS or SWITCHES"
            )
        i += 1
    return options, words[i], words[i + 1 :]


def check_ehrlong_args(options: dict[str, str], args: list[str], where: str) -> None:
    """The arguments after the image go to its ENTRYPOINT (python -m ehrlong.train) or, with
    `--entrypoint python`, to `python -m MODULE`."""
    from ehrlong import gpucheck

    schemas = {"ehrlong.train": (TrainConfig, PRESETS_DIR), "ehrlong.gpucheck": (gpucheck.Args, None)}
    module = "ehrlong.train"
    if "--entrypoint" in options:
        assert options["--entrypoint"] == "python" and args[:1] == ["-m"], where
        module, args = args[1], args[2:]
    assert module in schemas, f"{where}: no schema known for {module}"
    schema, presets = schemas[module]
    try:
        parse(schema, args, presets_dir=presets, prog=module)
    except ConfigError as e:
        pytest.fail(f"{where}: {e}")


def documented(source: str) -> list[str]:
    return DOC_SOURCES[source]()


def test_readme_documents_the_images_and_the_stack():
    commands = documented("README.md")
    text = " ".join(commands)
    for needle in (
        "-f docker/Dockerfile.cpu",
        "-f docker/Dockerfile.cuda",
        "docker compose -f docker/compose.yaml",
    ):
        assert needle in text, f"README.md shows no `{needle}` command"
    assert any(c.startswith("docker run") and "ehrlong:cuda" in c for c in commands)


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_documented_docker_commands_are_valid(source):
    commands = documented(source)
    built = {}  # image tag -> Dockerfile, from the `docker build` lines of the README and the headers
    for other in DOC_SOURCES:
        for c in documented(other):
            words = shlex.split(c, comments=True)
            if words[:2] == ["docker", "build"]:
                built[words[words.index("-t") + 1]] = words[words.index("-f") + 1]
    services = compose()["services"]
    for c in commands:
        words = shlex.split(c, comments=True)
        where = f"{source}: `{c}`"
        if words[:2] == ["docker", "build"]:
            assert words[-1] == ".", f"{where}: the build context is the repository root"
            assert (REPO / words[words.index("-f") + 1]).is_file(), where
        elif words[:2] == ["docker", "run"]:
            options, image, args = split_run(words[2:])
            assert image in built, f"{where}: {image} is built by no documented `docker build -t`"
            if "--gpus" in options:
                assert built[image].endswith("Dockerfile.cuda"), where
            check_ehrlong_args(options, args, where)
        elif words[:3] == ["docker", "compose", "-f"]:
            assert (REPO / words[3]).resolve() == COMPOSE, where
            if words[4] == "run":
                options, service, args = split_run(words[5:])
                assert service in services, f"{where}: no service {service}"
                check_ehrlong_args(options, args, where)
        else:
            pytest.fail(f"{where}: a docker command this test does not know how to check")
    # The compose services carry the tags the documented builds give the same Dockerfiles.
    for service in services.values():
        if service.get("image") in built:
            assert service["build"]["dockerfile"] == built[service["image"]], service["image"]


def test_header_commands_are_checked_for_every_image():
    assert {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"} <= {
        p.name for p in DOCKER.glob("Dockerfile.*")
    }
    assert any("docker run" in c for c in header_commands(DOCKER / "Dockerfile.cpu"))
    assert any("docker run" in c for c in header_commands(DOCKER / "Dockerfile.cuda"))
    assert any("docker compose" in c for c in header_commands(COMPOSE))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
