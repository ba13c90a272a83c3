"""Deployment files. No Docker engine runs on these machines: the Dockerfiles are linted with
hadolint and the compose file is validated against the Compose specification's JSON schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(sys.prefix) / "share" / "compose-spec.json"  # fetched by scripts/setup


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([hadolint(), str(ROOT / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification():
    import copy
    import json

    # The schema declares draft 2019-09 (with a trailing '#' jsonschema does not resolve).
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    validator.validate(compose)
    broken = copy.deepcopy(compose)
    broken["services"]["vllm-snapkv"]["helthcheck"] = broken["services"]["vllm-snapkv"]["healthcheck"]
    assert list(validator.iter_errors(broken)), "the schema must reject an unknown service key"


def test_compose_serves_with_snapkv_health_and_restart():
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["vllm-snapkv"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "--kv-compression=snapkv" in service["command"]
    assert "--snapkv-budget=${SNAPKV_BUDGET:-256}" in service["command"]
    assert service["volumes"][0]["target"] == "/models/model" and service["volumes"][0]["read_only"]
    assert service["ports"] == ["${PORT:-8000}:8000"]
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_files_are_valid_vllm_serve_configs(config):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["some/model", "--config", str(config)])
    section = AsyncEngineArgs.from_cli_args(args).additional_config["kv_compression"]
    assert section["method"] == "snapkv" and section["window_size"] == 32


def test_demo_model_is_readable_by_the_images_user(tmp_path):
    # Dockerfile.cpu serves as uid 1000 from a read-only bind mount of the host's model folder.
    import stat

    from vllm_snapkv.demo_model import build_demo_model, make_world_readable

    assert "USER 1000:1000" in (ROOT / "docker/Dockerfile.cpu").read_text()
    folder = build_demo_model()
    for path in (folder, *folder.rglob("*")):
        mode = path.stat().st_mode
        needed = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        assert mode & needed == needed, (path, oct(mode))
    # A folder written 0600/0700 (as transformers leaves weights) is repaired.
    (tmp_path / "sub").mkdir(mode=0o700)
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "sub" / "model.safetensors").chmod(0o600)
    make_world_readable(tmp_path / "sub")
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o644
