"""Provenance of generated images: an invisible watermark in the pixels and signed C2PA Content Credentials.

    generated image → Watermark.embed (pixels) → encode (PNG / JPEG / WebP) → ContentCredentials.sign (bytes)

The watermark is invisible-watermark's DWT-DCT-SVD (the DWT-DCT family FLUX's reference code uses, in the variant
that survives JPEG at quality 75 with 4:2:0 chroma; benchmarks/watermark.py) carrying 64 bits: a 32-bit service tag
(the first 4 bytes of SHA-256 of `watermark_service_id`) and a 32-bit provenance tag (the first 4 bytes of SHA-256 of
the provenance id: an id the server makes for each request, never one a client sends, so that no client can stamp an
image with the id of another request). The method works on images of at least `MIN_WATERMARK_SIDE` px per side; smaller
images are left unmarked, which is logged and counted. `verify` reads both the mark and the manifest back.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..limits import MAX_SIZE
from ..settings import Settings
from . import metrics

logger = logging.getLogger(__name__)

METHOD = "dwtDctSvd"
MIN_WATERMARK_SIDE = 256
"""invisible-watermark needs at least 256 x 256 pixels: below that too few 4x4 blocks carry each bit."""
MAX_MARKED_PIXELS = MAX_SIZE * 2 * MAX_SIZE
"""The largest image this service marks (the whole canvas `dsd generate --full-canvas` writes at the largest size).
A larger image is not read at its own size, where the read would cost seconds and gigabytes for no mark, only at the
sides in `READ_SIDES`."""
READ_SIDES = (512, MAX_SIZE)
"""Square sides a square image is also read at when the mark is not found at its own size (with twice its side, up
to the largest output side): a resized output, e.g. a 512 px output shrunk to 256, is read back at the size it was
marked at."""
TAG_BYTES = 4
PAYLOAD_BITS = 2 * TAG_BYTES * 8
SERVICE_TAG_MAX_ERRORS = 4
"""A mark counts as present when at most 4 of the 32 service-tag bits differ: a random image matches that closely
with probability about 1e-5."""
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_ASSERTION = "org.dsd-serve.generation"
SERVICE_NAME = "dsd-serve"
SERVICE_VERSION = importlib.metadata.version(SERVICE_NAME)


def tag(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()[:TAG_BYTES]


def _bits(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def _bgr(image: Image.Image) -> np.ndarray:
    """The float32 BGR array the watermark code works on (on uint8 it would truncate its inverse transform)."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1])


class Watermark:
    """Embeds and reads the 64-bit mark of one service."""

    def __init__(self, service_id: str):
        from imwatermark import WatermarkDecoder, WatermarkEncoder

        self.service_tag = tag(service_id)
        self._encoder_class, self._decoder = WatermarkEncoder, WatermarkDecoder("bits", PAYLOAD_BITS)

    def payload(self, provenance_id: str) -> bytes:
        return self.service_tag + tag(provenance_id)

    def embed(self, image: Image.Image, provenance_id: str) -> Image.Image | None:
        """The marked image, or None when the image is smaller than `MIN_WATERMARK_SIDE` on a side."""
        if min(image.size) < MIN_WATERMARK_SIDE:
            return None
        encoder = self._encoder_class()
        encoder.set_watermark("bits", _bits(self.payload(provenance_id)).tolist())
        marked = encoder.encode(_bgr(image), METHOD)
        return Image.fromarray(np.clip(marked[:, :, ::-1], 0, 255).round().astype(np.uint8))

    def read_bits(self, image: Image.Image) -> np.ndarray | None:
        """The 64 payload bits read from `image`, or None when it is too small to carry a mark."""
        if min(image.size) < MIN_WATERMARK_SIDE:
            return None
        return np.asarray(self._decoder.decode(_bgr(image), METHOD), dtype=np.uint8)

    def read(self, image: Image.Image) -> dict:
        """`present` (the service tag matches within `SERVICE_TAG_MAX_ERRORS` bits), `service_tag_errors`, the
        `provenance_tag` (hex) that `provenance_tag(provenance id)` computes, and `read_at` (the side it was read at when that
        is not the image's own). `present` is None, with the `reason`, when no size could be tried."""
        sides = self._read_sides(image)
        if not sides:
            width, height = image.size
            return {"present": None, "reason": f"image of {width}x{height} is larger than any marked output "
                    f"({MAX_MARKED_PIXELS} pixels) and not square, so it cannot be read at the size it was marked at"}
        best = None
        for side in sides:
            candidate = image if side is None else image.resize((side, side), Image.Resampling.BICUBIC)
            bits = self.read_bits(candidate)
            if bits is None:
                continue
            errors = int(np.sum(bits[: TAG_BYTES * 8] != _bits(self.service_tag)))
            if best is None or errors < best["service_tag_errors"]:
                best = {"present": errors <= SERVICE_TAG_MAX_ERRORS, "service_tag_errors": errors,
                        "provenance_tag": np.packbits(bits[TAG_BYTES * 8 :]).tobytes().hex()}
                if side is not None:
                    best["read_at"] = side
            if best["present"]:
                break
        if best is None:
            return {"present": None, "reason": f"image is smaller than {MIN_WATERMARK_SIDE} px on a side"}
        return best

    @staticmethod
    def _read_sides(image: Image.Image) -> list[int | None]:
        """None (the image as it is, unless it is larger than any marked output), then for a square image the sides
        it may have been marked at."""
        width, height = image.size
        own = [None] if width * height <= MAX_MARKED_PIXELS else []
        if width != height:
            return own
        return own + sorted(side for side in {2 * width, *READ_SIDES} - {width} if side <= MAX_SIZE)


def provenance_tag(provenance_id: str) -> str:
    """The provenance tag a mark carries for `provenance_id` (hex), to match a decoded mark against the response or
    the log line that names the id."""
    return tag(provenance_id).hex()


@dataclass
class Claim:
    """Whom one generated image answers, and what its C2PA manifest states."""

    request_id: str
    """The request, for logs only (the client may choose it); never written into the image."""
    provenance_id: str
    """The id the watermark tags and the manifest names, made by the server."""
    model: str
    adapter: str | None
    profile: str
    prompt: str | None = None


class ContentCredentials:
    """Signs C2PA manifests with the configured key and certificate chain; unsigned (logged, `dsd_c2pa_signing_enabled`
    0) when none is configured."""

    def __init__(self, settings: Settings):
        import c2pa

        self._c2pa = c2pa
        self.include_prompt = settings.c2pa_include_prompt
        self._context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        self._signer = None
        if settings.c2pa_cert_chain is None or settings.c2pa_private_key is None:
            logger.warning(
                "C2PA signing is OFF: outputs carry no Content Credentials. Set DSD_C2PA_CERT_CHAIN and "
                "DSD_C2PA_PRIVATE_KEY (PEM files, e.g. from a mounted Secret) to sign them"
            )
        else:
            chain = Path(settings.c2pa_cert_chain).read_bytes()
            key = Path(settings.c2pa_private_key).read_bytes()
            info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg[settings.c2pa_algorithm.upper()], chain, key, None)
            try:
                self._signer = c2pa.Signer.from_info(info)
                self._check_signing()
            except c2pa.C2paError as exc:
                raise ValueError(f"C2PA signing with DSD_C2PA_CERT_CHAIN / DSD_C2PA_PRIVATE_KEY fails: {exc}") from exc
            logger.info("C2PA signing is on (%s, chain %s)", settings.c2pa_algorithm, settings.c2pa_cert_chain)
        metrics.C2PA_SIGNING_ENABLED.set(1 if self.signing else 0)

    def _check_signing(self) -> None:
        """Sign a blank image and validate it, so that a key that does not match its certificate, or a certificate
        C2PA does not accept, stops the start instead of every request."""
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="PNG")
        claim = Claim(request_id="signing-check", provenance_id="signing-check", model="none", adapter=None,
                      profile="none")
        report = read_credentials(self._embed(buffer.getvalue(), "png", claim))
        if report["validation_state"] not in ("Valid", "Trusted"):
            raise ValueError(f"C2PA signing with DSD_C2PA_CERT_CHAIN / DSD_C2PA_PRIVATE_KEY makes manifests that do "
                             f"not validate: {', '.join(report['failures'])}")

    @property
    def signing(self) -> bool:
        return self._signer is not None

    def manifest(self, claim: Claim) -> dict:
        generation = {"provenance_id": claim.provenance_id, "model": claim.model, "adapter": claim.adapter,
                      "profile": claim.profile, "service_version": SERVICE_VERSION}
        if self.include_prompt and claim.prompt is not None:
            generation["prompt"] = claim.prompt
        return {
            "claim_generator_info": [{"name": SERVICE_NAME, "version": SERVICE_VERSION}],
            "title": f"generated image {claim.provenance_id}",
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": {"name": SERVICE_NAME, "version": SERVICE_VERSION},
                }]}},
                {"label": GENERATION_ASSERTION, "data": generation},
            ],
        }

    def sign(self, data: bytes, output_format: str, claim: Claim) -> bytes:
        """`data` (an encoded image) with the manifest embedded; `data` unchanged when signing is off."""
        if self._signer is None:
            metrics.C2PA_MANIFESTS.labels(result="unsigned").inc()
            return data
        signed = self._embed(data, output_format, claim)
        metrics.C2PA_MANIFESTS.labels(result="signed").inc()
        return signed

    def _embed(self, data: bytes, output_format: str, claim: Claim) -> bytes:
        builder = self._c2pa.Builder(self.manifest(claim), context=self._context)
        out = io.BytesIO()
        builder.sign(self._signer, MIME_TYPES[output_format], io.BytesIO(data), out)
        return out.getvalue()


def read_credentials(data: bytes, trust_anchors: Path | None = None) -> dict:
    """The active C2PA manifest of `data` and its validation: `present`, `validation_state` (`Invalid`, `Valid`:
    the signature and hashes check out, or `Trusted`: also chains to one of `trust_anchors`), `failures` (codes),
    and the manifest's `digital_source_type`, `generation` assertion and `signer`."""
    import c2pa

    context = None
    if trust_anchors is not None:
        context = c2pa.Context.from_dict(
            {"verify": {"verify_trust": True}, "trust": {"trust_anchors": Path(trust_anchors).read_text()}}
        )
    try:
        reader = c2pa.Reader(io.BytesIO(data), context=context) if context else c2pa.Reader(io.BytesIO(data))
    except c2pa.C2paError as exc:
        return {"present": False, "reason": str(exc)}
    with reader:
        manifest = reader.get_active_manifest() or {}
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
    failures = [item["code"] for item in results.get("activeManifest", {}).get("failure", [])]
    assertions = {item["label"]: item["data"] for item in manifest.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    created = next((a for a in actions if a.get("action") == "c2pa.created"), {})
    signature = manifest.get("signature_info", {})
    return {
        "present": bool(manifest),
        "validation_state": state,
        "failures": failures,
        "digital_source_type": created.get("digitalSourceType"),
        "generation": assertions.get(GENERATION_ASSERTION),
        "signer": {"issuer": signature.get("issuer"), "common_name": signature.get("common_name")},
    }


def verify(data: bytes, service_id: str, trust_anchors: Path | None = None) -> dict:
    """Both provenance signals of an encoded image: `watermark` (see `Watermark.read`) and `c2pa` (see
    `read_credentials`). Raises `InputError` when `data` is not a decodable image."""
    from ..images import decode_image

    image = decode_image(data, "image")
    return {
        "watermark": Watermark(service_id).read(image),
        "c2pa": read_credentials(data, trust_anchors),
    }


def write_development_chain(directory: Path, days: int = 30) -> tuple[Path, Path, Path]:
    """A throw-away root CA and an ES256 signing certificate with what C2PA requires of a signer (digitalSignature
    key usage, the emailProtection extended key usage, not a CA, key identifiers), written as PEM files
    (chain = signer then root, key, root) for tests, benchmarks and local trials. Production uses a chain from a
    C2PA-conformant CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DSD Serve development")])

    def usage(signing: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=signing, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not signing,
                             crl_sign=not signing, encipher_only=False, decipher_only=False)

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: str, issuer: x509.Name, public_key, ca: bool) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(usage(signing=not ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    root = certificate("DSD Serve development root", name("DSD Serve development root"), root_key.public_key(), True)
    root = root.sign(root_key, hashes.SHA256())
    signer = (
        certificate("DSD Serve development signer", root.subject, key.public_key(), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    chain_path, key_path, root_path = directory / "chain.pem", directory / "signer.key", directory / "root.pem"
    chain_path.write_bytes(signer.public_bytes(pem) + root.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    root_path.write_bytes(root.public_bytes(pem))
    return chain_path, key_path, root_path
