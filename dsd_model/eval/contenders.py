"""Contenders: what generates the images of an evaluation. Each is named on the command line as `NAME=SPEC`:

    local                  the local pipeline (DSD_* settings: tiny profile or real weights) with its default adapter
    local:base             the local pipeline without any adapter
    local:<adapter>        a named adapter of the local pipeline (DSD_ADAPTERS; the tiny profile has `identity`
                           and `structure`)
    local:<file>.safetensors   an adapter file, loaded into the local pipeline under the contender's name
    http://host:port       a running DSD Serve over REST (`POST /generate`, mode identity)
    grpc://host:port       a running DSD Serve over gRPC (needs the `serve` extra)

Every contender draws image k of a (subject, prompt) from seed `seed + k`, so images of different contenders pair up.
"""

from __future__ import annotations

import base64
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
from PIL import Image

from ..errors import InputError

CONTENDER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
REMOTE_ATTEMPTS = 5
"""Tries of one remote generation while the service answers 429/503 (a full queue, a rollout)."""
MAX_RETRY_WAIT_S = 30.0


@dataclass(frozen=True)
class GenerationParams:
    steps: int
    guidance: float
    size: int
    timeout_s: float
    api_key: str | None


class Contender(Protocol):
    name: str
    spec: str

    def generate(self, reference: Path, prompt: str, seeds: list[int]) -> list[Image.Image]:
        """One image per seed, in order."""


def parse_contender(text: str) -> tuple[str, str]:
    """`NAME=SPEC` → (name, spec), checked."""
    name, sep, spec = text.partition("=")
    if not sep or not spec:
        raise InputError("contender", f"{text!r} must be NAME=SPEC, e.g. dsd=local or prod=http://127.0.0.1:3000")
    if not CONTENDER_NAME.match(name):
        raise InputError("contender", f"name {name!r} must match {CONTENDER_NAME.pattern}")
    if not (spec == "local" or spec.startswith(("local:", "http://", "https://", "grpc://"))):
        raise InputError("contender", f"{name}: spec {spec!r} is none of local, local:<adapter or file>, "
                         "http(s)://host:port, grpc://host:port")
    return name, spec


class LocalContender:
    """An adapter (or none) of one local pipeline shared by all local contenders of a run."""

    def __init__(self, name: str, spec: str, pipe, params: GenerationParams):
        self.name, self.spec, self.pipe, self.params = name, spec, pipe, params
        target = spec.partition(":")[2]
        if target.endswith(".safetensors"):
            pipe.load_adapter(Path(target), name)
            self.adapter = name
        elif target == "base":
            self.adapter = None
        elif target:
            if target not in pipe.adapters.names:
                raise InputError("contender", f"{name}: adapter {target!r} is not loaded; loaded adapters: "
                                 f"{', '.join(pipe.adapters.names) or 'none'} (DSD_ADAPTERS)")
            self.adapter = target
        else:
            self.adapter = pipe.default_adapter

    def generate(self, reference: Path, prompt: str, seeds: list[int]) -> list[Image.Image]:
        result = self.pipe(
            [reference.read_bytes()] * len(seeds), [prompt] * len(seeds), num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance, size=self.params.size, seed=list(seeds), adapter=self.adapter,
        )
        return result.images


class RestContender:
    def __init__(self, name: str, spec: str, params: GenerationParams):
        self.name, self.spec, self.params = name, spec, params
        headers = {"Authorization": f"Bearer {params.api_key}"} if params.api_key else {}
        self._http = httpx.Client(base_url=spec.rstrip("/"), headers=headers, timeout=params.timeout_s)

    def generate(self, reference: Path, prompt: str, seeds: list[int]) -> list[Image.Image]:
        image = base64.b64encode(reference.read_bytes()).decode("ascii")
        return [self._one(image, prompt, seed) for seed in seeds]

    def _one(self, image: str, prompt: str, seed: int) -> Image.Image:
        body = {"image": image, "prompt": prompt, "steps": self.params.steps, "guidance": self.params.guidance,
                "size": self.params.size, "seed": seed}
        for attempt in range(1, REMOTE_ATTEMPTS + 1):
            response = self._http.post("/generate", json=body)
            if response.status_code == 200:
                return _decode(base64.b64decode(response.json()["images"][0]))
            if response.status_code not in (429, 503) or attempt == REMOTE_ATTEMPTS:
                raise ContenderError(f"{self.name} ({self.spec}): HTTP {response.status_code}: {response.text[:300]}")
            time.sleep(min(float(response.headers.get("retry-after", 1)), MAX_RETRY_WAIT_S))


class GrpcContender:
    def __init__(self, name: str, spec: str, params: GenerationParams):
        import grpc

        from dsd_serve.grpc_stubs import dsd_pb2, dsd_pb2_grpc

        self.name, self.spec, self.params, self._pb = name, spec, params, dsd_pb2
        channel = grpc.insecure_channel(spec.removeprefix("grpc://"),
                                        options=[("grpc.max_receive_message_length", 64 * 2**20)])
        self._stub = dsd_pb2_grpc.DSDServiceStub(channel)
        self._metadata = [("authorization", f"Bearer {params.api_key}")] if params.api_key else []
        self._grpc = grpc

    def generate(self, reference: Path, prompt: str, seeds: list[int]) -> list[Image.Image]:
        image = reference.read_bytes()
        return [self._one(image, prompt, seed) for seed in seeds]

    def _one(self, image: bytes, prompt: str, seed: int) -> Image.Image:
        request = self._pb.GenerateRequest(image=image, prompt=prompt, steps=self.params.steps,
                                           guidance=self.params.guidance, size=self.params.size, seed=seed)
        retryable = (self._grpc.StatusCode.RESOURCE_EXHAUSTED, self._grpc.StatusCode.UNAVAILABLE)
        for attempt in range(1, REMOTE_ATTEMPTS + 1):
            try:
                response = self._stub.Generate(request, metadata=self._metadata, timeout=self.params.timeout_s)
                return _decode(response.images[0])
            except self._grpc.RpcError as exc:
                if exc.code() not in retryable or attempt == REMOTE_ATTEMPTS:
                    raise ContenderError(f"{self.name} ({self.spec}): {exc.code().name}: {exc.details()}") from exc
                trailing = dict(exc.trailing_metadata() or ())
                time.sleep(min(float(trailing.get("retry-after-s", 1)), MAX_RETRY_WAIT_S))


class ContenderError(RuntimeError):
    """A contender could not generate (a remote service refusing or failing); the run stops and resumes later."""


def build_contenders(specs: dict[str, str], params: GenerationParams, load_local) -> list[Contender]:
    """Contenders for `{name: spec}`; `load_local()` gives the local pipeline, loaded once and only when needed."""
    contenders, pipe = [], None
    for name, spec in specs.items():
        if spec.startswith("local"):
            pipe = pipe or load_local()
            contenders.append(LocalContender(name, spec, pipe, params))
        elif spec.startswith("grpc://"):
            contenders.append(GrpcContender(name, spec, params))
        else:
            contenders.append(RestContender(name, spec, params))
    return contenders


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
