"""The container recipe: `bentoml build` accepts the project, and the service's requirements match pyproject."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from servers import BENTOML, ROOT


def pins(lines) -> dict[str, str]:
    result = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name = line.split("=")[0].split(">")[0].split("<")[0].strip().lower()
            result[name] = line
    return result


def test_serve_requirements_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = pins(project["dependencies"] + extras["serve"] + extras["faces"] + extras["safety"])
    declared["torch"] = next(d for d in project["optional-dependencies"]["dev"] if d.startswith("torch=="))
    required = pins((ROOT / "requirements" / "serve.txt").read_text().splitlines())
    assert required == declared


def test_bentoml_build(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path), BENTOML_DO_NOT_TRACK="True",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    build = subprocess.run([str(BENTOML), "build", str(ROOT), "--output", "tag"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    bentos = list((tmp_path / "bentos" / "dsd").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento = bentos[0].parent
    assert (bento / "src" / "service.py").is_file()
    assert (bento / "src" / "dsd_model" / "pipeline.py").is_file()
    assert (bento / "src" / "dsd_serve" / "http.py").is_file()
    assert (bento / "src" / "dsd_serve" / "pb" / "dsd_pb2_grpc.py").is_file()
    assert not (bento / "src" / "tests").exists()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in package_data.items():
        for pattern in patterns:
            files = list((ROOT / package.replace(".", "/")).glob(pattern))
            assert files and all((bento / "src" / f.relative_to(ROOT)).is_file() for f in files), (package, pattern)
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "diffusers==0.42.1" in requirements
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "cuda" in dockerfile.lower()
