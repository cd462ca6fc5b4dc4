"""Build the pipeline a settings object describes: the tiny profile in-process, or real weights from local paths."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import InputError, WeightsError
from .pipeline import DSDPipeline
from .serving.acceleration import accelerate
from .serving.adapter_store import scan
from .serving.prompt_cache import PromptCache
from .settings import Settings

logger = logging.getLogger(__name__)

MODES = ("identity", "structure")
"""Request modes; each selects the adapter `Settings.mode_adapters` maps it to, by default the one of its name."""
TINY_NOTICE = (
    "profile 'tiny': built-in random components of a few hundred KB; images are noise-like by design. "
    "Set DSD_MODEL_DIR (and DSD_ADAPTERS) to serve real FLUX.1-dev / DSD weights."
)


def load_pipeline(settings: Settings | None = None) -> DSDPipeline:
    """Load, move to the device and attach adapters. Nothing is downloaded: real weights must be on disk."""
    settings = settings or Settings()
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    if settings.resolved_profile == "tiny":
        pipe = _tiny_pipeline()
        logger.warning(TINY_NOTICE)
    else:
        pipe = _real_pipeline(settings, dtype)
        for name, path in settings.adapters.items():
            pipe.load_adapter(path, name)
        if settings.fuse_adapters:
            pipe.adapters.fuse(next(iter(settings.adapters)))
    pipe.profile = settings.resolved_profile
    pipe.max_sequence_length = settings.max_sequence_length
    if settings.prompt_cache_size:
        pipe.set_prompt_cache(PromptCache(settings.prompt_cache_size, pinned=[("", settings.max_sequence_length)]))
    pipe.default_adapter, pipe.mode_adapters = adapter_choice(settings, pipe.adapters.names
                                                              + sorted(scan(settings.adapter_dirs)))
    if pipe.transformer.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    accelerate(pipe, settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_pipeline() -> DSDPipeline:
    from .tiny import build_tiny_components, tiny_lora_state_dict

    pipe = DSDPipeline(**build_tiny_components())
    for seed, name in enumerate(MODES, start=1):
        pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=seed), name)
    return pipe


def _real_pipeline(settings: Settings, dtype) -> DSDPipeline:
    from .convert import load_dsd_transformer

    model_dir = Path(settings.model_dir)
    check_weights(settings)
    if not (model_dir / "model_index.json").is_file():
        raise WeightsError(
            f"DSD_MODEL_DIR {str(model_dir)!r} is not a diffusers pipeline directory (no model_index.json); "
            "point it at a local copy of FLUX.1-dev"
        )
    transformer_path = Path(settings.transformer_path or model_dir / "dsd_transformer")
    if not transformer_path.exists():
        raise WeightsError(
            f"DSD transformer weights {str(transformer_path)!r} do not exist; set DSD_TRANSFORMER_PATH to the "
            "official DSD transformer or to a directory written by `dsd convert`"
        )
    transformer, folded_lora = load_dsd_transformer(transformer_path, dtype=dtype)
    pipe = DSDPipeline.from_pretrained(
        model_dir, transformer=transformer, torch_dtype=dtype, local_files_only=True
    )
    pipe.adapters.folded_lora = folded_lora
    return pipe


def check_weights(settings: Settings) -> None:
    """Compare the weights directory with its lock file before anything loads (`Settings.verify_weights`): a missing
    or changed file stops the start with every such file named; files the lock does not list are only logged."""
    from .weights.lock import LOCK_NAME, Lock, verify

    if settings.verify_weights == "off":
        return
    model_dir = Path(settings.model_dir)
    if settings.weights_lock is not None:
        lock_path = Path(settings.weights_lock)
        if not lock_path.is_file():
            raise WeightsError(f"DSD_WEIGHTS_LOCK {str(lock_path)!r} does not exist")
    else:
        found = [path for path in (model_dir.parent / LOCK_NAME, model_dir / LOCK_NAME) if path.is_file()]
        if not found:
            logger.info("no %s beside DSD_MODEL_DIR: the weights are not checked", LOCK_NAME)
            return
        lock_path = found[0]
    directory = lock_path.parent
    result = verify(directory, full=settings.verify_weights == "full", lock=Lock.read(lock_path))
    if result.missing or result.changed:
        problems = [line for line in result.lines() if not line.startswith("extra: ")]
        raise WeightsError(
            f"the weights in {str(directory)!r} differ from {str(lock_path)!r}: {'; '.join(problems)}. Pull them "
            f"again (`dsd weights pull`) or restore the files; `dsd weights verify {directory} --full` lists every "
            "difference"
        )
    if result.extra:
        logger.warning("%d files in %s are not in %s: %s", len(result.extra), directory, lock_path,
                       ", ".join(result.extra[:20]))
    logger.info("weights match %s (%d files, %s)", lock_path, result.checked, settings.verify_weights)


def adapter_choice(settings: Settings, loaded: list[str]) -> tuple[str | None, dict[str, str]]:
    """The default adapter and the mode → adapter mapping, checked against the adapters actually loaded, so that a
    setting naming one that is not loaded stops the start instead of failing every request."""
    listed = ", ".join(loaded) or "none"
    for mode, adapter in settings.mode_adapters.items():
        if adapter not in loaded:
            raise ValueError(
                f"DSD_MODE_ADAPTERS maps mode {mode!r} to adapter {adapter!r}, which is not loaded; loaded adapters: "
                f"{listed} (DSD_ADAPTERS)"
            )
    if settings.default_adapter is not None and settings.default_adapter not in loaded:
        raise ValueError(
            f"DSD_DEFAULT_ADAPTER {settings.default_adapter!r} is not loaded; loaded adapters: {listed} (DSD_ADAPTERS)"
        )
    default = settings.default_adapter or (loaded[0] if loaded else None)
    return default, dict(settings.mode_adapters)


def adapter_for_mode(pipe: DSDPipeline, mode: str | None, available: list[str] | None = None) -> str | None:
    """The adapter serving a request: the default adapter when it names no mode, else the adapter its mode maps to,
    among `available` (default: the pipeline's named adapters). None when there is no adapter at all: the base model
    then serves every mode."""
    if mode is None:
        return pipe.default_adapter
    if mode not in MODES:
        raise InputError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    names = pipe.adapters.names if available is None else available
    if not names:
        return None
    adapter = pipe.mode_adapters.get(mode, mode)
    if adapter not in names:
        served = [name for name in MODES if pipe.mode_adapters.get(name, name) in names]
        raise InputError(
            "mode",
            f"{mode!r} has no adapter loaded on this server; modes served: {', '.join(served) or 'none'}; loaded "
            f"adapters: {', '.join(names)}; omit the mode to use the default adapter {pipe.default_adapter!r}",
        )
    return adapter
