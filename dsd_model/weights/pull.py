"""`dsd weights pull`: fill a weights directory from a Hugging Face-compatible hub, in the layout the service reads.

    DIR/FLUX.1-dev/               the base pipeline in diffusers layout, without its transformer (DSD replaces it)
    DIR/dsd/transformer/          the DSD transformer, as published (the service converts the official layout
                                  losslessly while loading; `dsd convert` writes the fused one)
    DIR/dsd/<name>.safetensors    LoRA adapters, one per name
    DIR/weights.lock.json         repository, commit, file, size and sha256 of every file written

Each repository is resolved once to a commit (`--revision REPO=REV` pins it; the default is `main`) and every file
is taken from that commit, so a branch that moves during the pull cannot mix two versions. Files are downloaded with
`huggingface_hub` into a staging folder (`DIR/.pull/`), checked against the size and hash the hub lists for them,
and only then moved into place. A file already in place with the hub's hash is kept, so a pull that was interrupted
resumes with the first file it did not finish; within a file, a dropped connection resumes where it broke.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, WeightsError
from .lock import Lock, LockedFile, sha256_of

DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
DEFAULT_TRANSFORMER = "primecai/dsd_model:transformer"
DEFAULT_LORAS = ("identity=primecai/dsd_model:pytorch_lora_weights.safetensors",)
"""The official DSD release: one transformer and one LoRA, the subject- (identity-) preserving model."""
STAGING = ".pull"
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf")
"""Weights in formats the service never opens (pickles run code when loaded) or cannot use; diffusers repositories
often carry them beside the safetensors files."""


@dataclass(frozen=True)
class Wanted:
    """One file to fetch: where it is in its repository and where it goes in the weights directory."""

    repository: str
    file: str
    path: str
    size: int
    sha256: str | None
    """The hub's sha256 of a large (LFS) file; small files have a git blob id instead."""
    blob_id: str | None


@dataclass(frozen=True)
class Snapshot:
    commit: str
    files: dict[str, object]
    """Path in the repository -> huggingface_hub's RepoSibling (size, blob id, LFS sha256)."""


def parse_source(value: str, option: str) -> tuple[str, str]:
    """`REPO:PATH` (repository ids never hold a colon) -> (repository, path)."""
    repository, colon, path = value.partition(":")
    if not colon or repository.count("/") != 1 or not path.strip("/"):
        raise InputError(option, f"{value!r} is not REPO:PATH, e.g. {DEFAULT_TRANSFORMER}")
    return repository, path.strip("/")


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    """`KEY=VALUE` options, each key once."""
    pairs = {}
    for value in values:
        key, equals, rest = value.partition("=")
        if not equals or not key or not rest:
            raise InputError(option, f"{value!r} is not KEY=VALUE")
        if key in pairs:
            raise InputError(option, f"{key!r} is given twice")
        pairs[key] = rest
    return pairs


def read_token(token_file: Path | None) -> str | None:
    """The token of `--token-file`, else HF_TOKEN or huggingface_hub's stored login."""
    from huggingface_hub import get_token

    if token_file is None:
        return get_token()
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise InputError("--token-file", f"cannot read {str(token_file)!r}: {exc.strerror}") from exc
    if not token:
        raise InputError("--token-file", f"{str(token_file)!r} is empty")
    return token


class Puller:
    """Resolves repositories and fetches files into one weights directory."""

    def __init__(self, directory: Path, token: str | None, revisions: dict[str, str]):
        from huggingface_hub import HfApi, constants

        self.directory = Path(directory)
        self.token = token
        self.revisions = revisions
        self.endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.snapshots: dict[str, Snapshot] = {}

    def snapshot(self, repository: str) -> Snapshot:
        """The repository at its pinned revision: its commit and files. A gated repository without a token stops
        here, before anything is downloaded."""
        if repository not in self.snapshots:
            revision = self.revisions.get(repository, "main")
            with self.hub_errors(repository, revision):
                info = self.api.model_info(repository, revision=revision, files_metadata=True)
            if info.gated and self.token is None:
                raise WeightsError(self.gated_message(repository))
            files = {sibling.rfilename: sibling for sibling in info.siblings or []}
            self.snapshots[repository] = Snapshot(info.sha, files)
        return self.snapshots[repository]

    def gated_message(self, repository: str) -> str:
        page = f"{self.endpoint}/{repository}"
        if self.token is None:
            return (f"{repository} is a gated repository and no token was given: accept its licence at {page} with "
                    "your Hugging Face account, then pass a read token of that account in HF_TOKEN or with "
                    "--token-file")
        return (f"{repository} is a gated repository and the token's account has no access to it: accept its "
                f"licence at {page} while logged in with that account (access may wait for the owner's approval), "
                "then pull again")

    def wanted(self, repository: str, file: str, path: str) -> Wanted:
        sibling = self.snapshot(repository).files.get(file)
        if sibling is None:
            raise WeightsError(f"{repository} has no file {file!r} at {self.snapshot(repository).commit}")
        lfs = sibling.lfs
        return Wanted(repository, file, path, sibling.size, lfs.sha256 if lfs else None,
                      None if lfs else sibling.blob_id)

    def folder(self, repository: str, folder: str, destination: str) -> list[Wanted]:
        """Every usable file under `folder/` of the repository, to the same place under `destination/`."""
        wanted = [self.wanted(repository, file, f"{destination}/{file.removeprefix(folder + '/')}")
                  for file in sorted(self.snapshot(repository).files)
                  if file.startswith(folder + "/") and not file.endswith(SKIPPED_SUFFIXES)]
        if not wanted:
            raise WeightsError(f"{repository} has no usable files under {folder!r}")
        return wanted

    def base(self, repository: str) -> list[Wanted]:
        """A diffusers pipeline repository without its transformer: model_index.json and each component folder it
        names. Single-file checkpoints at the top of the repository are left out."""
        destination = repository.split("/")[1]
        index = self.fetch(self.wanted(repository, "model_index.json", f"{destination}/model_index.json"))
        components = json.loads(index.read_text())
        folders = {name for name, value in components.items()
                   if isinstance(value, list) and value[0] is not None and name != "transformer"}
        wanted = [self.wanted(repository, "model_index.json", f"{destination}/model_index.json")]
        for folder in sorted(folders):
            wanted += self.folder(repository, folder, f"{destination}/{folder}")
        return wanted

    def fetch(self, wanted: Wanted) -> Path:
        """Put one file in place: kept when it is already there with the hub's hash, else downloaded to the staging
        folder, checked and moved."""
        destination = self.directory / wanted.path
        if destination.is_file() and matches(destination, wanted):
            return destination
        snapshot = self.snapshot(wanted.repository)
        staging = self.directory / STAGING / wanted.repository.replace("/", "--")
        with self.hub_errors(wanted.repository, snapshot.commit):
            staged = Path(self.api.hf_hub_download(wanted.repository, wanted.file, revision=snapshot.commit,
                                                   local_dir=staging))
        if not matches(staged, wanted):
            staged.unlink()
            raise WeightsError(f"{wanted.repository}/{wanted.file} at {snapshot.commit} arrived with another size or "
                               "hash than the hub lists; pull again")
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, destination)
        return destination

    @contextmanager
    def hub_errors(self, repository: str, revision: str):
        """Turn huggingface_hub's errors into `WeightsError`s that say what to do."""
        from huggingface_hub.errors import (
            GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )

        try:
            yield
        except GatedRepoError as error:
            raise WeightsError(self.gated_message(repository)) from error
        except RevisionNotFoundError as error:
            raise WeightsError(f"{repository} has no revision {revision!r} (--revision)") from error
        except RepositoryNotFoundError as error:
            raise WeightsError(f"{repository} does not exist on {self.endpoint}, or it is private and the token "
                               "(HF_TOKEN or --token-file) has no access to it") from error
        except (HfHubHTTPError, LocalEntryNotFoundError) as error:
            raise WeightsError(f"{repository}: {str(error).splitlines()[0]}; pull again to resume") from error
        except Exception as error:  # the transport's own errors (connection lost past the client's retries, ...)
            raise WeightsError(f"{repository}: the download failed ({type(error).__name__}: {error}); pull again to "
                               "resume: files already in place are kept") from error


def matches(path: Path, wanted: Wanted) -> bool:
    """Whether the file at `path` is the one the hub lists: its size, then its sha256 (large files) or git blob id."""
    if path.stat().st_size != wanted.size:
        return False
    if wanted.sha256 is not None:
        return sha256_of(path) == wanted.sha256
    if wanted.blob_id is not None:
        return git_blob_id(path) == wanted.blob_id
    return True


def git_blob_id(path: Path) -> str:
    """git's object id of a file's content (sha1 of `blob <size>\\0<content>`), which the hub lists for small files."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pull(directory: Path, base: str, transformer: str, loras: dict[str, str], revisions: dict[str, str],
         token: str | None) -> Lock:
    """Fill `directory` from the repositories (`transformer` and each of `loras` as REPO:PATH) and write its lock
    file; returns the lock."""
    directory = Path(directory)
    transformer_repository, transformer_folder = parse_source(transformer, "--transformer")
    lora_sources = {}
    for name, source in loras.items():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise InputError("--lora", f"adapter name {name!r} may hold only letters, digits, '-' and '_'")
        repository, file = parse_source(source, "--lora")
        if not file.endswith(".safetensors"):
            raise InputError("--lora", f"{source!r} is not a .safetensors file (pickle formats are never loaded)")
        lora_sources[name] = (repository, file)
    pulled = {base, transformer_repository, *(repository for repository, _ in lora_sources.values())}
    if unknown := sorted(set(revisions) - pulled):
        raise InputError("--revision", f"{', '.join(unknown)} is not pulled; the repositories are {', '.join(sorted(pulled))}")
    directory.mkdir(parents=True, exist_ok=True)
    puller = Puller(directory, token, revisions)
    for repository in sorted(pulled):
        snapshot = puller.snapshot(repository)
        print(f"{repository} at {snapshot.commit}", file=sys.stderr)
    wanted = puller.base(base)
    wanted += puller.folder(transformer_repository, transformer_folder, "dsd/transformer")
    wanted += [puller.wanted(repository, file, f"dsd/{name}.safetensors")
               for name, (repository, file) in lora_sources.items()]
    total = sum(w.size for w in wanted)
    done = 0
    for number, item in enumerate(wanted, start=1):
        print(f"[{number}/{len(wanted)}] {item.path} ({item.size / 1e6:,.1f} MB; {done / 1e9:.2f} of "
              f"{total / 1e9:.2f} GB done)", file=sys.stderr)
        puller.fetch(item)
        done += item.size
    lock = Lock([LockedFile(w.path, w.repository, puller.snapshots[w.repository].commit, w.file, w.size,
                            w.sha256 or sha256_of(directory / w.path)) for w in wanted])
    lock.write(directory)
    shutil.rmtree(directory / STAGING, ignore_errors=True)
    return lock


def settings_lines(directory: Path, base: str, loras: list[str]) -> list[str]:
    """The DSD_* settings that serve what `pull` wrote to `directory`."""
    directory = Path(directory).resolve()
    adapters = {name: str(directory / "dsd" / f"{name}.safetensors") for name in loras}
    return [f"DSD_MODEL_DIR={directory / base.split('/')[1]}", f"DSD_TRANSFORMER_PATH={directory / 'dsd' / 'transformer'}",
            f"DSD_ADAPTERS={json.dumps(adapters)}"]
