"""`dsd weights pull` against a hub-compatible server on loopback (tests/hub.py) serving a tiny FLUX.1-dev and DSD
release in hub layout to the real huggingface_hub client; `dsd weights verify`; the service's start-up check."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants
from safetensors.torch import save_file

from dsd_model.cli import main
from dsd_model.errors import WeightsError
from dsd_model.loading import load_pipeline
from dsd_model.settings import Settings
from dsd_model.tiny import build_tiny_components, tiny_lora_state_dict
from dsd_model.weights.lock import LOCK_NAME, Lock, LockedFile, sha256_of, verify
from hub import Hub, Repository
from servers import ROOT, start_service

FLUX = "black-forest-labs/FLUX.1-dev"
DSD = "primecai/dsd_model"
TOKEN = "hf_granted"
SHARD = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"


def files_of(directory: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The repositories' files: FLUX.1-dev in diffusers layout with the extras a real one carries (a single-file
    checkpoint, a pickle, its transformer), and the DSD release (official transformer in three shards, a LoRA) in two
    commits whose LoRAs differ."""
    from diffusers import FluxPipeline

    from dsd_model.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("release")
    FluxPipeline(**build_tiny_components(dsd=False)).save_pretrained(root / "flux")
    flux = files_of(root / "flux")
    flux["flux1-dev.safetensors"] = flux["transformer/diffusion_pytorch_model.safetensors"]
    flux["vae/diffusion_pytorch_model.bin"] = b"pickle, never downloaded"
    flux["README.md"] = b"# FLUX.1 [dev]\n"
    transformer = build_tiny_components()["transformer"]
    transformer.save_pretrained(root / "fused")
    convert_checkpoint(root / "fused", root / "official", to="official", max_shard_bytes=150_000)
    dsd = files_of(root / "official", "transformer/")
    assert SHARD in dsd
    loras = []
    for seed in (1, 2):
        save_file(tiny_lora_state_dict(transformer, seed=seed), str(root / f"lora{seed}.safetensors"))
        loras.append((root / f"lora{seed}.safetensors").read_bytes())
    return flux, dsd, loras


@pytest.fixture
def hub(release):
    flux, dsd, loras = release
    base = Repository(gated=True)
    base.commit(flux)
    official = Repository()
    official.commit({**dsd, "pytorch_lora_weights.safetensors": loras[0], "README.md": b"v1"})
    official.commit({**dsd, "pytorch_lora_weights.safetensors": loras[1], "README.md": b"v2"})
    with Hub({FLUX: base, DSD: official}, granted={TOKEN}) as server:
        yield server


@pytest.fixture
def dsd(hub, monkeypatch, tmp_path, capsys):
    """`dsd ...` in this process, pointed at the hub by HF_ENDPOINT, with no stored login; returns (exit status,
    stdout, stderr)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "token").write_text(TOKEN + "\n")

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main([str(arg) for arg in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def expected_paths(release) -> set[str]:
    flux, dsd, _ = release
    components = {name for name in flux if "/" in name and not name.startswith("transformer/")
                  and not name.endswith(".bin")}
    return ({"FLUX.1-dev/model_index.json"} | {f"FLUX.1-dev/{name}" for name in components}
            | {f"dsd/{name}" for name in dsd} | {"dsd/identity.safetensors"})


def test_pull_pins_a_revision_locks_every_file_and_serves(hub, dsd, release, tmp_path):
    flux, transformer, loras = release
    first = hub.repositories[DSD].refs["main"]
    old = next(sha for sha in hub.repositories[DSD].commits if sha != first)
    weights = tmp_path / "weights"
    status, out, err = dsd("weights", "pull", weights, "--token-file", tmp_path / "token", "--revision", f"{DSD}={old}")
    assert status == 0, err
    lock = json.loads((weights / LOCK_NAME).read_text())
    entries = {entry["path"]: entry for entry in lock["files"]}
    assert set(entries) == expected_paths(release)
    for path, entry in entries.items():
        repository, source = (FLUX, flux) if path.startswith("FLUX.1-dev/") else (DSD, None)
        data = (weights / path).read_bytes()
        assert entry == {"path": path, "repository": repository, "revision": hub.repositories[repository].resolve(
                         "main" if repository == FLUX else old), "file": entry["file"], "size": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()}
        served = hub.repositories[repository].commits[entry["revision"]][entry["file"]]
        assert data == served
    assert entries["dsd/identity.safetensors"]["file"] == "pytorch_lora_weights.safetensors"
    assert (weights / "dsd/identity.safetensors").read_bytes() == loras[0], "the pinned commit's LoRA, not main's"
    assert not (weights / ".pull").exists()
    assert f"DSD_MODEL_DIR={weights.resolve() / 'FLUX.1-dev'}" in out
    assert main(["weights", "verify", str(weights), "--full"]) == 0

    settings = Settings(model_dir=weights / "FLUX.1-dev", transformer_path=weights / "dsd/transformer",
                        adapters={"identity": weights / "dsd/identity.safetensors"})
    pipe = load_pipeline(settings)
    assert pipe.profile == "real" and pipe.adapters.names == ["identity"]

    fetched = len(hub.downloads())
    status, _, err = dsd("weights", "pull", weights, "--token-file", tmp_path / "token")
    assert status == 0, err
    again = hub.downloads()[fetched:]
    assert [request.file for request in again] == ["pytorch_lora_weights.safetensors"], "unchanged files are kept"
    assert (weights / "dsd/identity.safetensors").read_bytes() == loras[1]
    relocked = {entry["path"]: entry for entry in json.loads((weights / LOCK_NAME).read_text())["files"]}
    assert relocked["dsd/identity.safetensors"]["revision"] == first


def test_a_cut_transfer_resumes_where_it_broke(hub, dsd, release, tmp_path, monkeypatch):
    """The client writes what it received in chunks (10 MB by default; 4 KiB here, for a file of 140 KB) and asks
    for the rest from the end of the last whole chunk."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    shard = release[1][SHARD]
    hub.cut[SHARD] = "once"
    status, _, err = dsd("weights", "pull", tmp_path / "weights", "--token-file", tmp_path / "token")
    assert status == 0, err
    first, resumed = hub.downloads(SHARD)
    assert first.range is None
    start = len(shard) // 2 // 4096 * 4096
    assert resumed.range == f"bytes={start}-" and start > 0
    assert (tmp_path / "weights/dsd" / SHARD).read_bytes() == shard


def test_an_interrupted_pull_resumes_with_the_files_it_did_not_finish(hub, dsd, release, tmp_path):
    lora = "pytorch_lora_weights.safetensors"
    hub.cut[lora] = "always"
    weights = tmp_path / "weights"
    status, _, err = dsd("weights", "pull", weights, "--token-file", tmp_path / "token")
    assert status == 2 and f"error: {DSD}: the download failed" in err and "pull again to resume" in err
    assert not (weights / LOCK_NAME).exists() and not (weights / "dsd/identity.safetensors").exists()
    done = {path.relative_to(weights).as_posix() for path in weights.rglob("*") if path.is_file()
            and ".pull" not in path.parts}
    assert done == expected_paths(release) - {"dsd/identity.safetensors"}

    del hub.cut[lora]
    fetched = len(hub.downloads())
    status, _, err = dsd("weights", "pull", weights, "--token-file", tmp_path / "token")
    assert status == 0, err
    assert [request.file for request in hub.downloads()[fetched:]] == [lora]
    assert verify(weights, full=True).ok


def test_a_gated_repository_without_a_token_names_its_licence_page(hub, release, tmp_path):
    """The console command in its own process, huggingface_hub pointed at the hub by HF_ENDPOINT alone."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([str(Path(sys.executable).parent / "dsd"), "weights", "pull", str(tmp_path / "weights")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert (f"error: {FLUX} is a gated repository and no token was given: accept its licence at {hub.url}/{FLUX}"
            in done.stderr)
    assert hub.downloads() == [], "nothing is downloaded before every repository is known to be reachable"


def test_a_token_without_access_is_told_to_accept_the_licence(hub, dsd, tmp_path):
    (tmp_path / "other").write_text("hf_not_granted")
    status, _, err = dsd("weights", "pull", tmp_path / "weights", "--token-file", tmp_path / "other")
    assert status == 2
    assert f"{FLUX} is a gated repository and the token's account has no access to it: accept its licence at " \
           f"{hub.url}/{FLUX}" in err


@pytest.mark.parametrize("argv, message", [
    (["--revision", "someone/else=abc"], "--revision: someone/else is not pulled"),
    (["--revision", f"{DSD}=0000000000000000000000000000000000000000"], f"{DSD} has no revision"),
    (["--lora", "identity=primecai/dsd_model:lora.bin"], "is not a .safetensors file"),
    (["--lora", f"identity={DSD}:missing.safetensors"], f"{DSD} has no file 'missing.safetensors'"),
    (["--transformer", "primecai/dsd_model"], "--transformer: 'primecai/dsd_model' is not REPO:PATH"),
])
def test_pull_names_the_option_at_fault(dsd, tmp_path, argv, message):
    status, _, err = dsd("weights", "pull", tmp_path / "weights", "--token-file", tmp_path / "token", *argv)
    assert status == 2 and message in err


def locked_directory(root: Path) -> Path:
    """A directory of three files and its lock, written as `dsd weights pull` writes it."""
    for path, data in {"a/one.safetensors": b"1" * 100, "a/two.json": b"{}", "three.txt": b"333"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    files = [LockedFile(path, "x/y", "0" * 40, path, (root / path).stat().st_size, sha256_of(root / path))
             for path in ("a/one.safetensors", "a/two.json", "three.txt")]
    Lock(files).write(root)
    (root / "lost+found").mkdir()
    return root


def test_verify_names_every_missing_extra_and_changed_file(tmp_path, capsys):
    root = locked_directory(tmp_path)
    assert main(["weights", "verify", str(root), "--full"]) == 0
    with open(root / "a/one.safetensors", "r+b") as handle:
        handle.write(b"2")
    assert main(["weights", "verify", str(root)]) == 0, "a changed byte keeps the size"
    capsys.readouterr()
    assert main(["weights", "verify", str(root), "--full"]) == 1
    assert f"changed: a/one.safetensors: sha256 {sha256_of(root / 'a/one.safetensors')}, the lock says " in \
        capsys.readouterr().out
    (root / "three.txt").write_bytes(b"33")
    (root / "a/two.json").unlink()
    (root / "a/new.safetensors").write_bytes(b"")
    assert main(["weights", "verify", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["missing: a/two.json", "changed: three.txt: 2 bytes, the lock says 3", "extra: a/new.safetensors"]


def test_verify_without_a_lock_says_where_it_comes_from(tmp_path, capsys):
    assert main(["weights", "verify", str(tmp_path)]) == 2
    assert f"has no {LOCK_NAME}; `dsd weights pull` writes it" in capsys.readouterr().err


def write_pulled_layout(root: Path) -> Path:
    """Tiny real-profile weights in the layout `dsd weights pull` writes, with their lock."""
    from diffusers import FluxPipeline

    from dsd_model.convert import convert_checkpoint

    components = build_tiny_components(dsd=False)
    del components["transformer"]
    FluxPipeline(**components, transformer=None).save_pretrained(root / "FLUX.1-dev")
    transformer = build_tiny_components()["transformer"]
    transformer.save_pretrained(root / "fused")
    convert_checkpoint(root / "fused", root / "dsd/transformer", to="official")
    shutil.rmtree(root / "fused")
    save_file(tiny_lora_state_dict(transformer, seed=1), str(root / "dsd/identity.safetensors"))
    files = [LockedFile(path, "local/test", "0" * 40, path, (root / path).stat().st_size, sha256_of(root / path))
             for path in files_of(root)]
    Lock(files).write(root)
    return root


def served_settings(root: Path, **more) -> Settings:
    return Settings(model_dir=root / "FLUX.1-dev", transformer_path=root / "dsd/transformer",
                    adapters={"identity": root / "dsd/identity.safetensors"}, **more)


def test_loading_checks_sizes_against_the_lock_and_hashes_on_request(tmp_path):
    root = write_pulled_layout(tmp_path / "weights")
    assert load_pipeline(served_settings(root)).profile == "real"
    scheduler = root / "FLUX.1-dev/scheduler/scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"shift": 3.0', '"shift": 3.1'))
    assert load_pipeline(served_settings(root)).profile == "real", "sizes alone cannot see a same-size change"
    with pytest.raises(WeightsError, match=r"changed: FLUX.1-dev/scheduler/scheduler_config.json: sha256 "):
        load_pipeline(served_settings(root, verify_weights="full"))
    assert load_pipeline(served_settings(root, verify_weights="off")).profile == "real"
    config = root / "dsd/transformer/config.json"
    size = config.stat().st_size
    config.write_text(config.read_text() + "\n")
    with pytest.raises(WeightsError) as refused:
        load_pipeline(served_settings(root))
    assert (f"the weights in {str(root)!r} differ from {str(root / LOCK_NAME)!r}: changed: "
            f"dsd/transformer/config.json: {size + 1} bytes, the lock says {size}") in str(refused.value)


def live(server) -> int | None:
    try:
        return httpx.get(f"{server.url}/livez", timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_the_service_refuses_to_start_on_a_mismatched_directory(tmp_path):
    root = write_pulled_layout(tmp_path / "weights")
    config = root / "dsd/transformer/config.json"
    config.write_text(config.read_text() + "\n")
    server = start_service(tmp_path, profile="real", model_dir=str(root / "FLUX.1-dev"),
                           transformer_path=str(root / "dsd/transformer"),
                           adapters=json.dumps({"identity": str(root / "dsd/identity.safetensors")}))
    try:
        end = time.monotonic() + 180
        while live(server) != 503:
            assert server.process.poll() is None and time.monotonic() < end, server.log_tail()
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code != 200
        log = server.log.read_text(errors="replace")
        assert "changed: dsd/transformer/config.json" in log and LOCK_NAME in log
    finally:
        server.stop()
