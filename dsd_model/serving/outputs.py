"""What every generated image goes through before it leaves, whichever way it leaves (REST, gRPC, job results, the
command line):

    output check (may withhold or blur) → watermark (from 256 px a side) → encode → C2PA manifest
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PIL import Image

from ..images import encode_image
from ..settings import Settings
from . import metrics
from .provenance import MIN_WATERMARK_SIDE, Claim, ContentCredentials, Watermark
from .safety import SafetyChecks

logger = logging.getLogger(__name__)


def model_name(settings: Settings) -> str:
    """The model a manifest names: the tiny profile, or FLUX.1-dev with the DSD transformer's file or folder name."""
    if settings.resolved_profile == "tiny":
        return "dsd-tiny (random weights)"
    return f"FLUX.1-dev with DSD transformer {Path(settings.transformer_path or 'dsd_transformer').name}"


class OutputStage:
    """The safety checks, the watermark and the C2PA signer of one service, loaded once at start."""

    def __init__(self, settings: Settings):
        self.safety = SafetyChecks(settings)
        self.watermark = Watermark(settings.watermark_service_id) if settings.watermark else None
        self.credentials = ContentCredentials(settings)
        self.model_name = model_name(settings)

    def notices(self, size: int) -> list[str]:
        """What a response with outputs of `size` px a side says about them: once, that they are too small to carry
        the watermark. Nothing when the operator turned the watermark off (`DSD_WATERMARK`)."""
        if self.watermark is None or size >= MIN_WATERMARK_SIDE:
            return []
        return [f"size: {size} px output is below the watermark's {MIN_WATERMARK_SIDE} px minimum; it is not marked"]

    def finish(self, image: Image.Image, output_format: str, claim: Claim, quality: int | None = None) -> bytes:
        """The encoded (`quality` as in `encode_image`), marked and signed image; raises `ContentPolicyError` when
        the output check withholds it."""
        stage = time.perf_counter()

        def timed(name: str) -> None:
            nonlocal stage
            now = time.perf_counter()
            metrics.PROVENANCE_DURATION.labels(stage=name).observe(now - stage)
            stage = now

        image = self.safety.check_output(image, claim.request_id)
        timed("check")
        if self.watermark is None:
            metrics.WATERMARKS.labels(result="disabled").inc()
        else:
            marked = self.watermark.embed(image, claim.provenance_id)
            if marked is None:
                metrics.WATERMARKS.labels(result="too_small").inc()
                logger.info("request %s: %dx%d output is below the watermark's minimum side and is not marked",
                            claim.request_id, *image.size)
            else:
                metrics.WATERMARKS.labels(result="embedded").inc()
                image = marked
            timed("watermark")
        data = encode_image(image, output_format, quality)
        timed("encode")
        data = self.credentials.sign(data, output_format, claim)
        timed("sign")
        return data
