"""`dsd eval run`: generate every contender's images of a benchmark, then score them. Resumable like `dsd data`:
each finished image and each score is one manifest record, so an interrupted run loses at most the work in flight
and a rerun does nothing twice.

    run_dir/
        run.json            the benchmark (subjects, prompts), the contenders and the generation settings
        generations.jsonl   one record per image: contender, subject, prompt index, seed, path
        images/<contender>/<subject>/<prompt index>-<seed>.png
        scores.jsonl        one record per (metric, image): value in [0, 1] or a failure, and its reason
        cache/              judge replies

A rerun may add contenders; it refuses other generation settings or another benchmark, which would mix images that
are not comparable.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..data.chat import ChatClient, ChatRejected, MalformedReply, map_unordered
from ..data.manifest import Manifest, StageReport, save_png, write_json
from ..errors import InputError
from ..images import center_crop_resize, decode_image
from ..settings import resolve_device
from ..scoring.faces import DLIB_THRESHOLD, FaceEmbedder, FacesUnavailable
from ..scoring.identity import IdentityScore, face_score
from . import embeddings, judge
from .benchmark import Benchmark, Case, read_benchmark
from .contenders import Contender, GenerationParams, build_contenders
from .judge_prompts import resolve_prompts
from .settings import EvalSettings

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
GENERATIONS_FILE = "generations.jsonl"
SCORES_FILE = "scores.jsonl"
REASONS = {
    "dino": "cosine of the DINO CLS embeddings of the reference and the image",
    "clip_i": "cosine of the CLIP image embeddings of the reference and the image",
    "clip_t": "cosine of the CLIP embeddings of the image and the prompt",
}
FACE_ID = "face_id"


@dataclass(frozen=True)
class RunReport:
    generate: StageReport
    score: StageReport

    def __str__(self) -> str:
        return f"{self.generate}\n{self.score}"


def generation_id(contender: str, case: Case, seed: int) -> str:
    return f"{contender}/{case.id}/{seed}"


def run_eval(settings: EvalSettings, benchmark_path: str | Path, contenders: dict[str, str], load_local=None):
    """Generate and score; `load_local()` builds the local contenders' pipeline (default: from `Settings()`)."""
    if not contenders:
        raise InputError("contender", "name at least one contender, e.g. --contender dsd=local")
    benchmark = read_benchmark(benchmark_path, settings.benchmark_format)
    _checked_judge(settings, benchmark)
    params = GenerationParams(settings.steps, settings.guidance, settings.size, settings.service_timeout_s,
                              settings.service_api_key.get_secret_value() if settings.service_api_key else None)
    _record_run(settings, benchmark, contenders, params)
    generated = generate_images(settings, benchmark, build_contenders(contenders, params, load_local or _load_local))
    return RunReport(generated, score_images(settings, benchmark))


def generate_images(settings: EvalSettings, benchmark: Benchmark, contenders: list[Contender]) -> StageReport:
    manifest = Manifest(settings.run_dir / GENERATIONS_FILE)
    done = manifest.records()
    seeds = [settings.seed + k for k in range(settings.images_per_prompt)]
    work = [(contender, case, [s for s in seeds if generation_id(contender.name, case, s) not in done])
            for contender in contenders for case in benchmark.cases]
    work = [item for item in work if item[2]]
    total = sum(len(item[2]) for item in work)
    with tqdm(total=total, desc="generate", unit="image") as bar:
        for contender, case, todo in work:
            subject = benchmark.subjects[case.subject]
            images = contender.generate(subject.image, case.prompt, todo)
            for seed, image in zip(todo, images, strict=True):
                path = Path("images") / contender.name / case.subject / f"{case.index}-{seed}.png"
                save_png(image, settings.run_dir / path)
                manifest.append({"id": generation_id(contender.name, case, seed), "contender": contender.name,
                                 "subject": case.subject, "index": case.index, "seed": seed, "path": path.as_posix()})
                bar.update()
    return StageReport("generate", total, len(contenders) * len(benchmark.cases) * len(seeds) - total)


def score_images(settings: EvalSettings, benchmark: Benchmark) -> StageReport:
    """Score every generated image with every configured metric not scored yet."""
    generations = list(Manifest(settings.run_dir / GENERATIONS_FILE).records().values())
    manifest = Manifest(settings.run_dir / SCORES_FILE)
    done = set(manifest.records())
    faces = _face_embedder(settings)
    local = (("dino",) if settings.dino_path else ()) + (("clip_i", "clip_t") if settings.clip_path else ())
    local += ((FACE_ID,) if faces else ()) + (embeddings.COPY_PASTE,)
    endpoint, prompts = _checked_judge(settings, benchmark)
    remote = judge.METRICS if endpoint else ()
    todo_local = [g for g in generations if any(f"{m}:{g['id']}" not in done for m in local)]
    todo_judge = [(m, g) for g in generations for m in remote if f"{m}:{g['id']}" not in done]
    encoders = (embeddings.Encoders(settings.dino_path, settings.clip_path, resolve_device(settings.device))
                if todo_local else None)
    total = len(generations) * (len(local) + len(remote))
    scored = len(todo_local) * len(local) + len(todo_judge)
    cases = {case.id: case for case in benchmark.cases}
    references = _References(settings.size, faces)
    failed = 0
    with tqdm(total=scored, desc="score", unit="score") as bar:
        for start in range(0, len(todo_local), settings.embed_batch_size):
            chunk = todo_local[start: start + settings.embed_batch_size]
            for record in _embedding_scores(settings, benchmark, cases, encoders, references, chunk):
                if record["id"] not in done:
                    manifest.append(record)
            bar.update(len(chunk) * len(local))
        if todo_judge:
            failed = _judge_scores(settings, benchmark, cases, endpoint, prompts, references, todo_judge, manifest,
                                   bar)
    return StageReport("score", scored, total - scored, failed)


def _checked_judge(settings: EvalSettings, benchmark: Benchmark) -> tuple:
    """The judge's endpoint and prompt set ((None, None) without a judge), once the prompts are known to exist."""
    endpoint = settings.judge_endpoint()
    if endpoint is None:
        return None, None
    prompts = resolve_prompts(settings.judge_prompts, benchmark.root)
    if prompts.comparable and "cp_style" not in prompts.texts and any(
            subject.category == "style" for subject in benchmark.subjects.values()):
        raise InputError("judge_prompts", "the benchmark has style subjects, and the DreamBench++ prompts lack "
                         "user_prompt_style_full.txt / gpt_prompt_style_full.txt")
    logger.info("judge prompts: %s", prompts.description)
    return endpoint, prompts


def _face_embedder(settings: EvalSettings) -> FaceEmbedder | None:
    """dlib's face scorer for `face_id`: when the `[faces]` extra is installed (`face_id` unset), or required."""
    if settings.face_id is False:
        return None
    try:
        return FaceEmbedder()
    except FacesUnavailable as exc:
        if settings.face_id:
            raise InputError("face_id", str(exc)) from exc
        logger.warning("no face_id scores: %s", exc)
        return None


class _References:
    """Each subject's reference as the model sees it (centre square at the run's size), decoded once, with its
    largest face when a face embedder is given."""

    def __init__(self, size: int, faces: FaceEmbedder | None = None):
        self.size, self._images, self._pngs, self._faces = size, {}, {}, {}
        self.embedder = faces
        self._lock = threading.Lock()

    def face_score(self, path: Path, image: Image.Image) -> IdentityScore:
        """The face score of `image` against the reference at `path` (whose face is detected once)."""
        reference = self(path)
        with self._lock:
            if path not in self._faces:
                self._faces[path] = self.embedder.face(reference)
        return face_score(self._faces[path], self.embedder.face(image), DLIB_THRESHOLD)

    def __call__(self, path: Path) -> Image.Image:
        with self._lock:
            if path not in self._images:
                self._images[path] = center_crop_resize(decode_image(path, "benchmark"), self.size)
            return self._images[path]

    def png(self, path: Path) -> bytes:
        """The reference as PNG, as the judge sees it: the model's view, not a full-size original."""
        image = self(path)
        with self._lock:
            if path not in self._pngs:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                self._pngs[path] = buffer.getvalue()
            return self._pngs[path]


def _embedding_scores(settings, benchmark, cases, encoders, references, chunk) -> list[dict]:
    paths = [benchmark.subjects[g["subject"]].image for g in chunk]
    refs = [references(path) for path in paths]
    images = [_open(settings.run_dir / g["path"]) for g in chunk]
    prompts = [cases[f"{g['subject']}/{g['index']}"].prompt for g in chunk]
    scores = encoders.score(refs, images, prompts)
    records = []
    for i, generation in enumerate(chunk):
        for metric, values in scores.items():
            records.append(_record(metric, generation, values[i], REASONS[metric]))
        face = references.face_score(paths[i], images[i]) if references.embedder is not None else None
        if face is not None:
            records.append(_face_record(generation, face))
        dino = scores["dino"][i] if "dino" in scores else None
        flagged, reason = embeddings.copy_paste_verdict(
            dino, embeddings.pixel_difference(refs[i], images[i]), settings.copy_paste_dino, settings.copy_paste_pixel,
            face.distance if face is not None else None, settings.copy_paste_face,
        )
        records.append(_record(embeddings.COPY_PASTE, generation, float(flagged), reason))
    return records


def _face_record(generation: dict, face: IdentityScore) -> dict:
    if face.status != "ok":
        return {"id": f"{FACE_ID}:{generation['id']}", "generation": generation["id"], "metric": FACE_ID,
                "status": "no_face", "reason": face.note, "scorer": face.scorer}
    verdict = "the same person" if face.match else "another person"
    reason = (f"cosine of the {face.scorer} face descriptors; distance {face.distance:.4f} "
              f"({verdict} by the {face.threshold} threshold)")
    return _record(FACE_ID, generation, face.similarity, reason, distance=face.distance, match=face.match,
                   scorer=face.scorer)


def _judge_scores(settings, benchmark, cases, endpoint, prompts, references, todo, manifest, bar) -> int:
    def ask(item):
        metric, generation = item
        image = (settings.run_dir / generation["path"]).read_bytes()
        case = cases[f"{generation['subject']}/{generation['index']}"]
        if metric == "cp":
            subject = benchmark.subjects[case.subject]
            messages = prompts.cp_messages(references.png(subject.image), image, subject.category)
        else:
            messages = prompts.pf_messages(image, case.prompt)
        return prompts.ask(client, messages, settings.max_reply_attempts)

    failed = 0
    with ChatClient(endpoint, settings) as client:
        for (metric, generation), future in map_unordered(ask, todo, settings.concurrency):
            try:
                score = future.result()
                record = _record(metric, generation, score.value, score.reason, raw=score.raw, **prompts.record())
            except (MalformedReply, ChatRejected) as exc:
                logger.warning("%s of %s failed: %s", metric, generation["id"], exc)
                record = {"id": f"{metric}:{generation['id']}", "generation": generation["id"], "metric": metric,
                          "status": "failed", "reason": str(exc), **prompts.record()}
                failed += 1
            manifest.append(record)
            bar.update()
    return failed


def _record(metric: str, generation: dict, value: float, reason: str, **extra) -> dict:
    return {"id": f"{metric}:{generation['id']}", "generation": generation["id"], "metric": metric, "status": "ok",
            "value": float(value), "reason": reason, **extra}


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _record_run(settings: EvalSettings, benchmark: Benchmark, contenders: dict[str, str], params) -> None:
    path = settings.run_dir / RUN_FILE
    generation = {"steps": params.steps, "guidance": params.guidance, "size": params.size,
                  "images_per_prompt": settings.images_per_prompt, "seed": settings.seed}
    run = {"benchmark": benchmark.to_json(), "generation": generation, "contenders": dict(contenders)}
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        for key in ("benchmark", "generation"):
            if before[key] != run[key]:
                raise InputError("run_dir", f"{str(settings.run_dir)!r} holds a run with another {key} "
                                 f"({json.dumps(before[key])[:300]}); use a new run_dir to compare other settings")
        for name, spec in contenders.items():
            if before["contenders"].get(name, spec) != spec:
                raise InputError("contender", f"{name!r} was {before['contenders'][name]!r} in this run, not {spec!r}")
        run["contenders"] = {**before["contenders"], **contenders}
    write_json(path, run)


def _load_local():
    from ..loading import load_pipeline
    from ..settings import Settings

    return load_pipeline(Settings())


def read_run(run_dir: Path) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """(run.json, generations by id, scores by id) of a run directory."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise InputError("run_dir", f"{str(run_dir)!r} has no {RUN_FILE}; run `dsd eval run` first")
    return (json.loads(path.read_text(encoding="utf-8")), Manifest(Path(run_dir) / GENERATIONS_FILE).records(),
            Manifest(Path(run_dir) / SCORES_FILE).records())

