"""The Dockerfile and Singularity recipe, checked statically, and the image's entrypoint run
here the way the image runs it (no Docker engine is available to build the image itself)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import spec2vol_bids

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def _key_values(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args) if "=" in item)


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in _instructions(DOCKERFILE):
        if op == "ENV":
            env.update(_key_values(args))
    return env


def _sections(path: Path) -> dict[str, str]:
    """Singularity %sections -> their bodies; the header under key ''."""
    parts = re.split(r"^%(\w+)\s*$", path.read_text(), flags=re.M)
    sections = {"": parts[0]}
    sections.update(zip(parts[1::2], parts[2::2]))
    return sections


def test_dockerfile_static():
    ops = _instructions(DOCKERFILE)
    names = [op for op, _ in ops]
    froms = [args for op, args in ops if op == "FROM"]
    assert len(froms) == 1
    base_default = next(_key_values(a)["BASE_IMAGE"] for op, a in ops
                        if op == "ARG" and a.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+(\.\d+)?-cuda1[12]\.\d+-cudnn\d-devel", base_default)

    # entrypoint and the user it runs as
    assert [a for op, a in ops if op == "ENTRYPOINT"] == ['["spec2vol"]']
    users = [a for op, a in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert names.index("USER") < names.index("ENTRYPOINT")
    run_text = " ".join(a for op, a in ops if op == "RUN")
    assert re.search(rf"useradd\b.*\b{users[-1]}\b", run_text)

    # runtime environment
    env = _docker_env()
    assert env["PYTHONNOUSERSITE"] == "1"
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert env["HOME"] == f"/home/{users[-1]}"
    assert env["SPEC2VOL_CONTAINER_TYPE"] == "docker"
    assert env["SPEC2VOL_CONTAINER_TAG"] == "${IMAGE_TAG}"
    assert any(op == "ARG" and a.startswith("IMAGE_TAG=") for op, a in ops)

    # the version file, checked against the package at build time
    assert re.search(r"__version__\)\"\s*>\s*/version", run_text)
    version_arg = next(_key_values(a)["VERSION"] for op, a in ops
                       if op == "ARG" and a.startswith("VERSION="))
    assert version_arg == spec2vol_bids.__version__, "bump ARG VERSION in the Dockerfile"

    # labels
    labels = {}
    for op, args in ops:
        if op == "LABEL":
            labels.update(_key_values(args))
    for key in ("title", "description", "version", "licenses", "source", "created", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), key

    # CUDA extensions compiled here for the common architectures, never fetched as wheels
    arch = next(_key_values(a)["TORCH_CUDA_ARCH_LIST"] for op, a in ops
                if op == "ARG" and a.startswith("TORCH_CUDA_ARCH_LIST="))
    assert set(arch.split(";")) >= {"7.0", "7.5", "8.0", "8.6", "8.9", "9.0"}
    build = [a for op, a in ops if op == "RUN" and "mamba-ssm" in a]
    assert build
    for cmd in build:
        for flag in ("MAMBA_FORCE_BUILD=TRUE", "CAUSAL_CONV1D_FORCE_BUILD=TRUE",
                     'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"', "-u MAMBA_SKIP_CUDA_BUILD",
                     "--no-binary causal-conv1d,mamba-ssm", "--no-build-isolation"):
            assert flag in cmd, flag
    assert "selective_scan_cuda" in run_text and "causal_conv1d_cuda" in run_text
    assert "SKIP_CUDA_BUILD=TRUE" not in DOCKERFILE.read_text()

    # the package is installed from the files the COPY lines bring in (LICENSE: into its metadata)
    copied = " ".join(a for op, a in ops if op == "COPY")
    for path in ("pyproject.toml", "README.md", "LICENSE", "spec2vol_bids"):
        assert path in copied
        assert (ROOT / path).exists(), path


def test_nothing_fetched_at_run_time():
    ops = _instructions(DOCKERFILE)
    # nothing that runs at start-up besides the tool: no shell wrapper, no ONBUILD/HEALTHCHECK
    assert not any(op in ("ONBUILD", "HEALTHCHECK") for op, _ in ops)
    entry = [a for op, a in ops if op == "ENTRYPOINT"]
    assert entry == ['["spec2vol"]']
    env = _docker_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    # and the package itself opens no connection and downloads no template or data set
    pattern = re.compile(r"urlopen|urlretrieve|import requests|http\.client|"
                         r"nilearn\.datasets\.fetch|datasets\.fetch_|fetch_atlas|torch\.hub|"
                         r"from_pretrained|hf_hub_download|mne\.datasets")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "spec2vol_bids").rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_singularity_static():
    sections = _sections(SINGULARITY)
    header = dict(re.findall(r"^(\w+):\s*(\S+)", sections[""], re.M))
    assert header["Bootstrap"] in ("docker-daemon", "docker", "docker-archive")
    assert header["From"].startswith("spec2vol")
    assert sections["runscript"].split() == ["exec", "spec2vol", '"$@"']
    assert "spec2vol --version" in sections["test"]
    env = dict(re.findall(r"^\s*export\s+(\w+)=(.*)$", sections["environment"], re.M))
    assert env["SPEC2VOL_CONTAINER_TYPE"] == "singularity"
    assert env["PYTHONNOUSERSITE"] == "1"
    # a read-only image: every writable location is under /tmp, per user
    for name in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "NUMBA_CACHE_DIR"):
        assert env[name].strip('"').startswith("/tmp/") and "$(id -u)" in env[name], name
    # no build steps that would write into the image at run time
    assert "post" not in sections and "setup" not in sections


def _entrypoint() -> Path:
    """The ``spec2vol`` console script pip installed for this interpreter (what the image runs)."""
    script = Path(sysconfig.get_path("scripts")) / "spec2vol"
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .)"
    return script


def _image_env(tmp_path: Path, image_env: dict[str, str]) -> dict[str, str]:
    """A clean environment (as ``env -i`` or ``--cleanenv``) holding only the image's variables,
    with HOME pointing nowhere writable and the scratch folders under ``tmp_path``."""
    env = {k: v for k, v in image_env.items() if "$" not in v}
    env.update({
        "PATH": f"{_entrypoint().parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "no-home"),  # does not exist: nothing may need it
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
        "SPEC2VOL_CONTAINER_TAG": "spec2vol:test",
        "LANG": "C.UTF-8",
    })
    return env


def _without_network() -> list[str]:
    """A prefix that runs a command in a fresh network namespace, where that is allowed."""
    probe = ["unshare", "--net", "--map-root-user", "true"]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        return probe[:-1]
    return []


@pytest.mark.parametrize("flavour", ["docker", "singularity"])
def test_entrypoint_runs_as_in_the_image(tmp_path, flavour):
    if flavour == "docker":
        image_env = _docker_env()
    else:
        body = _sections(SINGULARITY)["environment"]
        image_env = {**_docker_env(),
                     **dict(re.findall(r"^\s*export\s+(\w+)=(\S+)$", body, re.M))}
    env = _image_env(tmp_path, image_env)
    assert env["SPEC2VOL_CONTAINER_TYPE"] == flavour
    prefix = _without_network()
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def run(*args):
        return subprocess.run([*prefix, "spec2vol", *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=120)

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"spec2vol {spec2vol_bids.__version__}"
    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    for word in ("participant", "group", "--participant-label", "--folds", "--model"):
        assert word in helped.stdout
    # the BIDS-App usage error path works too, and nothing was written to HOME or the cwd
    bad = run(str(tmp_path / "missing"), str(tmp_path / "out"), "participant")
    assert bad.returncode == 66 and "BIDS_DIR" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "no-home").exists()
    assert list(cwd.iterdir()) == []


def test_python_module_entrypoint(tmp_path):
    """``python -m spec2vol_bids`` is the same program (used by torchrun in docs/hpc.md)."""
    env = _image_env(tmp_path, _docker_env())
    out = subprocess.run([sys.executable, "-m", "spec2vol_bids", "--version"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"spec2vol {spec2vol_bids.__version__}"
