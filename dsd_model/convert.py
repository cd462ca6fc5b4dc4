"""Checkpoint conversion for the DSD transformer.

The same model comes in three layouts (P packed latent channels, 64 for FLUX.1-dev):

- **fused** (what the pipeline runs): a stock `FluxTransformer2DModel` with `in_channels=2P, out_channels=P`; the
  condition latents are concatenated to the noisy latents on the channel axis.
- **official** (the DSD release): a FLUX transformer with `in_channels=P` plus `c_embedder = Linear(P, hidden)`,
  computing `x_embedder(x) + c_embedder(c)`.
- **plain**: FLUX.1-dev's own transformer, without a condition input.

Fusing is lossless: `x_embedder.weight = cat([x_embedder.weight, c_embedder.weight], dim=1)` and
`x_embedder.bias = x_embedder.bias + c_embedder.bias`. The two original biases are recorded in the safetensors
metadata, so `split_fused` gives back the official tensors bit for bit.

Sources are a `.safetensors` file, a sharded checkpoint (`*.safetensors.index.json`) or a diffusers model directory;
a `config.json` beside the weights is used, otherwise the config is inferred from the shapes. Pickle formats are never
opened. Weights saved from a peft-wrapped model (`.base_layer.` names, `lora_A` / `lora_B` tensors) are unwrapped;
embedded LoRA tensors are folded only on request. Every key and shape is checked against the model its config
describes; a key that does not fit is an error naming the key and the shapes, never dropped or padded.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from .adapters import lora_fingerprint, read_safetensors
from .errors import WeightsError
from .tiny import FLUX_TRANSFORMER_CONFIG, dsd_transformer_config

BIASES_METADATA_KEY = "dsd.official_embedder_biases"
"""Metadata key of the official `x_embedder.bias` and `c_embedder.bias`, recorded when they are fused."""
FOLDED_LORA_METADATA_KEY = "dsd.folded_lora_sha256"
"""Metadata key of the `lora_fingerprint` of a LoRA folded into the weights (see `AdapterRegistry.folded_lora`)."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
OFFICIAL_CLASS_NAME = "FluxTransformer2DConditionalModel"
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9
"""diffusers' default shard size ("10GB"): FLUX.1-dev's 24 GB bf16 transformer is written as 3 files."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SOURCE_KINDS = {"official": "official DSD", "plain": "plain FLUX", "fused": "fused DSD"}

_CONFIG_KEYS = [name for name in inspect.signature(FluxTransformer2DModel.__init__).parameters if name != "self"]
_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_NORM_Q = re.compile(r"^(?:single_)?transformer_blocks\.\d+\.attn\.norm_q\.weight$")


@dataclass
class Checkpoint:
    """Tensors and metadata as stored, with the `config.json` found beside them (None when there is none)."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict | None


@dataclass
class FusedCheckpoint:
    """A checked fused state dict, its `FluxTransformer2DModel` config, metadata and the layout it came from."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict
    source_kind: Literal["official", "plain", "fused"]

    @property
    def folded_lora(self) -> str | None:
        return self.metadata.get(FOLDED_LORA_METADATA_KEY)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a `.safetensors` file, a `*.safetensors.index.json` sharded checkpoint or a diffusers model directory."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    weights = _weights_in_directory(path) if path.is_dir() else path
    _check_weights_name(weights)
    if weights.name.endswith(".index.json"):
        state, metadata = _read_sharded(weights)
    else:
        state, metadata = read_safetensors(weights)
    config_path = weights.parent / CONFIG_NAME
    config = _read_json(config_path) if config_path.is_file() else None
    return Checkpoint(state, metadata, config)


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise WeightsError(f"{str(path)!r} must hold a JSON object")
    return content


def _weights_in_directory(directory: Path) -> Path:
    for name in (INDEX_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{str(directory)!r} holds only pickle weights ({', '.join(pickles)}); pickle files are never opened "
            "(loading them can run code). Save the model as safetensors first."
        )
    raise WeightsError(f"{str(directory)!r} has neither {INDEX_NAME} nor {WEIGHTS_NAME}")


def _check_weights_name(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{str(path)!r}: pickle checkpoints ({path.suffix}) are never opened (loading them can run code); "
            "save the model as safetensors first"
        )
    if not (path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json")):
        raise WeightsError(
            f"{str(path)!r} is not a .safetensors file, a *.safetensors.index.json index or a diffusers model directory"
        )
    if not path.is_file():
        raise WeightsError(f"checkpoint file {str(path)!r} does not exist")


def _read_sharded(index_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{str(index_path)!r} has no `weight_map` (key -> shard file)")
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise WeightsError(f"{str(index_path)!r}: shard {shard!r} must be a file name in the same directory")
        shard_path = index_path.parent / shard
        _check_weights_name(shard_path)
        tensors, shard_metadata = read_safetensors(shard_path)
        state.update(tensors)
        metadata.update(shard_metadata)
    for key in sorted(set(weight_map) ^ set(state)):
        where = "is listed in the index but stored in no shard" if key in weight_map else "is not listed in the index"
        raise WeightsError(f"{str(index_path)!r}: key {key!r} {where}")
    return state, metadata


def unwrap_peft(
    state: dict[str, torch.Tensor], *, fold_lora: bool = False, lora_scale: float = 1.0
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Turn the state dict of a peft-wrapped transformer into a plain one; return it and the folded LoRA's fingerprint.

    `<module>.base_layer.<param>` becomes `<module>.<param>` (lossless). LoRA tensors
    (`<module>.lora_A[.<adapter>].weight`, `lora_B`) are refused unless `fold_lora`, which computes
    `W + lora_scale * B @ A` in float64 and casts back to W's dtype (`lora_scale=1` is the official no-alpha
    convention). The fingerprint is `lora_fingerprint` over the LoRA in the adapter file layout
    (`transformer.<module>.lora_A.weight`), None when nothing was folded.
    """
    base: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    for key, tensor in state.items():
        match = _LORA_TENSOR.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["kind"]] = tensor
            adapters.add(match["adapter"] or "")
        elif "lora_" in key or key.endswith(".alpha"):
            raise WeightsError(
                f"key {key!r}: only peft LoRA weights (<module>.lora_A[.<adapter>].weight and lora_B) are supported; "
                "alpha, DoRA, bias and embedding LoRA keys are not (the official DSD LoRA has no alpha: scale 1)"
            )
        else:
            name = key.replace(".base_layer.", ".")
            if name in base:
                raise WeightsError(f"keys {key!r} and {name!r} are both in the checkpoint; they name the same tensor")
            base[name] = tensor
    if not pairs:
        return base, None
    if not fold_lora:
        raise WeightsError(
            f"the checkpoint embeds LoRA tensors for {len(pairs)} modules (e.g. {min(pairs)!r}). Either fold them into "
            "the weights with fold_lora=True (CLI: dsd convert --fold-lora), which computes W + lora_scale * B @ A "
            "(lora_scale 1.0 is the official no-alpha convention), or save the base model without them (peft "
            "`unload()`) and load the LoRA as an adapter."
        )
    if len(adapters) > 1:
        raise WeightsError(
            f"the checkpoint embeds several LoRA adapters {sorted(adapters)}; fold one adapter per checkpoint"
        )
    lora: dict[str, torch.Tensor] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise WeightsError(f"LoRA for {module!r} has no lora_{missing} tensor")
        weight_key = f"{module}.weight"
        if weight_key not in base:
            raise WeightsError(f"LoRA tensors target {module!r}, but the checkpoint has no {weight_key!r}")
        a, b, weight = pair["A"], pair["B"], base[weight_key]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != weight.shape:
            raise WeightsError(
                f"LoRA for {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"{weight_key!r} {tuple(weight.shape)} (lora_A must be [rank, in], lora_B [out, rank])"
            )
        base[weight_key] = (weight.double() + lora_scale * (b.double() @ a.double())).to(weight.dtype)
        lora[f"transformer.{module}.lora_A.weight"] = a
        lora[f"transformer.{module}.lora_B.weight"] = b
    return base, lora_fingerprint(lora)


def detect_kind(state: dict[str, torch.Tensor]) -> Literal["official", "plain", "fused"]:
    """The layout of a (peft-unwrapped) diffusers FLUX state dict, from its keys and embedder shapes."""
    if "img_in.weight" in state:
        raise WeightsError(
            "this is the original Black Forest Labs layout (img_in, double_blocks, ...); only the diffusers "
            "FluxTransformer2DModel layout is supported"
        )
    for key in ("x_embedder.weight", "proj_out.weight"):
        if key not in state:
            raise WeightsError(f"key {key!r} is missing: this is not a diffusers FLUX transformer checkpoint")
    if "c_embedder.weight" in state:
        return "official"
    in_channels = state["x_embedder.weight"].shape[1]
    out_channels = state["proj_out.weight"].shape[0]
    if in_channels == 2 * out_channels:
        return "fused"
    if in_channels == out_channels:
        return "plain"
    raise WeightsError(
        f"x_embedder.weight has shape {tuple(state['x_embedder.weight'].shape)} and proj_out.weight "
        f"{tuple(state['proj_out.weight'].shape)}: {in_channels} input channels are neither the {out_channels} output "
        "channels (plain FLUX / official DSD) nor twice them (fused DSD)"
    )


def fuse_official(
    state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Official DSD (FLUX keys + `c_embedder.{weight,bias}`) to fused; the original biases go into the metadata."""
    keys = ("x_embedder.weight", "x_embedder.bias", "c_embedder.weight", "c_embedder.bias")
    tensors = {key: _require(state, key) for key in keys}
    for part in ("weight", "bias"):
        x, c = tensors[f"x_embedder.{part}"], tensors[f"c_embedder.{part}"]
        if c.shape != x.shape:
            raise WeightsError(
                f"c_embedder.{part} has shape {tuple(c.shape)} but x_embedder.{part} has {tuple(x.shape)}; "
                "the official DSD embedders have equal shapes"
            )
    dtypes = {key: tensor.dtype for key, tensor in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise WeightsError(f"the embedder tensors have different dtypes {dtypes}; they cannot be fused exactly")
    fused = {key: tensor for key, tensor in state.items() if key not in ("c_embedder.weight", "c_embedder.bias")}
    fused["x_embedder.weight"] = torch.cat([tensors["x_embedder.weight"], tensors["c_embedder.weight"]], dim=1)
    fused["x_embedder.bias"] = tensors["x_embedder.bias"] + tensors["c_embedder.bias"]
    record = {key: _encode_tensor(tensors[key]) for key in ("x_embedder.bias", "c_embedder.bias")}
    return fused, {**metadata, BIASES_METADATA_KEY: json.dumps(record)}


def split_fused(
    state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fused to official DSD, the inverse of `fuse_official`.

    The weight splits exactly. The biases come from the metadata record written by `fuse_official` when it still
    adds up to the fused bias; otherwise (no record, or weights changed since) the whole bias goes to
    `x_embedder.bias` and `c_embedder.bias` is zero, which computes the same function.
    """
    weight, bias = _require(state, "x_embedder.weight"), _require(state, "x_embedder.bias")
    packed = _require(state, "proj_out.weight").shape[0]
    if weight.shape[1] != 2 * packed:
        raise WeightsError(
            f"x_embedder.weight has shape {tuple(weight.shape)}: a fused DSD transformer with {packed} output channels "
            f"has {2 * packed} input channels"
        )
    official = dict(state)
    official["x_embedder.weight"] = weight[:, :packed].clone()
    official["x_embedder.bias"], official["c_embedder.bias"] = _split_bias(bias, metadata.get(BIASES_METADATA_KEY))
    official["c_embedder.weight"] = weight[:, packed:].clone()
    return official, {key: value for key, value in metadata.items() if key != BIASES_METADATA_KEY}


def fuse_plain_flux(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain FLUX to fused, with zero condition columns: the output does not depend on the condition."""
    weight = _require(state, "x_embedder.weight")
    return {**state, "x_embedder.weight": torch.cat([weight, torch.zeros_like(weight)], dim=1)}


def _split_bias(bias: torch.Tensor, record: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    if record is not None:
        try:
            recorded = json.loads(record)
            x_bias, c_bias = (_decode_tensor(recorded[key]) for key in ("x_embedder.bias", "c_embedder.bias"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"metadata {BIASES_METADATA_KEY!r} is malformed: {exc}") from exc
        if x_bias.dtype == bias.dtype and x_bias.shape == bias.shape and torch.equal(x_bias + c_bias, bias):
            return x_bias, c_bias
    return bias.clone(), torch.zeros_like(bias)


def _encode_tensor(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach().to("cpu").contiguous()
    raw = tensor.view(torch.uint8).numpy().tobytes()
    dtype = str(tensor.dtype).removeprefix("torch.")
    return {"dtype": dtype, "shape": list(tensor.shape), "base64": base64.b64encode(raw).decode()}


def _decode_tensor(record: dict) -> torch.Tensor:
    dtype = getattr(torch, record["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {record['dtype']!r}")
    raw = bytearray(base64.b64decode(record["base64"], validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(record["shape"])


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise WeightsError(f"key {key!r} is missing")
    return state[key]


def infer_config(state: dict[str, torch.Tensor]) -> dict:
    """The `FluxTransformer2DModel` config implied by a state dict's shapes (for sources without a config.json).

    Assumes FLUX's patch size 1 and rotary axes (16, 56, 56), which need 128-channel attention heads.
    """
    hidden, in_channels = _require(state, "x_embedder.weight").shape
    head_dims = [tensor.shape[0] for key, tensor in state.items() if _NORM_Q.match(key)]
    if not head_dims:
        raise WeightsError("cannot infer the config: no attention block (...attn.norm_q.weight); add a config.json")
    head_dim = head_dims[0]
    axes_dims_rope = tuple(FLUX_TRANSFORMER_CONFIG["axes_dims_rope"])
    if sum(axes_dims_rope) != head_dim:
        raise WeightsError(
            f"cannot infer axes_dims_rope for {head_dim}-channel attention heads (FLUX uses {axes_dims_rope} for 128); "
            f"put the model's {CONFIG_NAME} next to the weights"
        )
    return dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=_require(state, "proj_out.weight").shape[0],
        num_layers=_count_blocks(state, "transformer_blocks"),
        num_single_layers=_count_blocks(state, "single_transformer_blocks"),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=_require(state, "context_embedder.weight").shape[1],
        pooled_projection_dim=_require(state, "time_text_embed.text_embedder.linear_1.weight").shape[1],
        guidance_embeds=any(key.startswith("time_text_embed.guidance_embedder.") for key in state),
        axes_dims_rope=axes_dims_rope,
    )


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return len({match[1] for key in state if (match := pattern.match(key))})


def _fused_config(source_config: dict | None, source_kind: str, fused_state: dict[str, torch.Tensor]) -> dict:
    if source_config is None:
        return infer_config(fused_state)
    config = {key: value for key, value in source_config.items() if not key.startswith("_")}
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise WeightsError(f"{CONFIG_NAME} has entries {unknown} that FluxTransformer2DModel does not take")
    return config if source_kind == "fused" else dsd_transformer_config(config)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of `FluxTransformer2DModel(**config)` and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], config: dict, max_listed: int = 20) -> None:
    """Raise `WeightsError` listing every missing, unexpected and mis-shaped key (up to `max_listed`)."""
    expected = expected_shapes(config)
    problems = [
        f"missing key {key!r} (the model needs shape {expected[key]})" for key in sorted(expected.keys() - state.keys())
    ]
    problems += [
        f"unexpected key {key!r} with shape {tuple(state[key].shape)} (not a parameter of the model)"
        for key in sorted(state.keys() - expected.keys())
    ]
    problems += [
        f"key {key!r} has shape {tuple(state[key].shape)}, the model needs {expected[key]}"
        for key in sorted(expected.keys() & state.keys())
        if tuple(state[key].shape) != expected[key]
    ]
    if problems:
        more = f"; and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise WeightsError(
            f"the weights do not fit FluxTransformer2DModel({config}): " + "; ".join(problems[:max_listed]) + more
        )


def read_fused(source: str | Path, *, fold_lora: bool = False, lora_scale: float = 1.0) -> FusedCheckpoint:
    """Read any supported source (official, plain FLUX or fused; peft-wrapped or not), convert and check it."""
    checkpoint = read_checkpoint(source)
    state, fingerprint = unwrap_peft(checkpoint.state, fold_lora=fold_lora, lora_scale=lora_scale)
    metadata = dict(checkpoint.metadata)
    if fingerprint is not None:
        if FOLDED_LORA_METADATA_KEY in metadata:
            raise WeightsError(
                f"{str(source)!r} already has a folded LoRA recorded ({FOLDED_LORA_METADATA_KEY}); "
                "folding a second one is not supported"
            )
        metadata[FOLDED_LORA_METADATA_KEY] = fingerprint
    kind = detect_kind(state)
    if kind == "official":
        state, metadata = fuse_official(state, metadata)
    elif kind == "plain":
        state = fuse_plain_flux(state)
    config = _fused_config(checkpoint.config, kind, state)
    check_state_dict(state, config)
    return FusedCheckpoint(state, metadata, config, kind)


def load_dsd_transformer(
    path: str | Path, dtype: torch.dtype = torch.float32, *, fold_lora: bool = False, lora_scale: float = 1.0
) -> tuple[FluxTransformer2DModel, str | None]:
    """The fused DSD transformer (eval mode, CPU) from any source `read_fused` takes, converted in memory.

    Returns `(transformer, folded_lora)`: `folded_lora` is the fingerprint of a LoRA folded into the weights (by
    `dsd convert --fold-lora` or `fold_lora` here), None if none; set it as `AdapterRegistry.folded_lora` so that
    loading the same LoRA as an adapter is refused.
    """
    fused = read_fused(path, fold_lora=fold_lora, lora_scale=lora_scale)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**fused.config)
    transformer.load_state_dict({key: value.to(dtype) for key, value in fused.state.items()}, strict=True, assign=True)
    return transformer.eval(), fused.folded_lora


def official_config(fused_config: dict) -> dict:
    """The official DSD transformer config (`in_channels=P`, no out_channels) of a fused config."""
    config = {key: value for key, value in fused_config.items() if key != "out_channels"}
    config["in_channels"] = fused_config["out_channels"]
    return config


def write_model_directory(
    destination: str | Path,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    config: dict,
    class_name: str = "FluxTransformer2DModel",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write config.json and the weights in diffusers layout, sharded past `max_shard_bytes`; return the file names."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    metadata = {**metadata, "format": "pt"}
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(destination / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": _nbytes(state)}, "weight_map": weight_map}
        (destination / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}
    (destination / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return names


def _shard(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def _format_bytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB"


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    to: Literal["fused", "official"] = "fused",
    fold_lora: bool = False,
    lora_scale: float = 1.0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Convert `source` (any layout `read_fused` takes) into a new diffusers model directory; return a summary line.

    `to="fused"` writes the DSD transformer that `FluxTransformer2DModel.from_pretrained` and the pipeline load;
    `to="official"` writes the official DSD layout (`c_embedder` separate, class FluxTransformer2DConditionalModel).
    """
    if to not in ("fused", "official"):
        raise ValueError(f"to must be 'fused' or 'official', got {to!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be at least 1, got {max_shard_bytes}")
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"destination {str(destination)!r} exists and is not an empty directory")
    fused = read_fused(source, fold_lora=fold_lora, lora_scale=lora_scale)
    if to == "fused":
        state, metadata, config, class_name = fused.state, fused.metadata, fused.config, "FluxTransformer2DModel"
    else:
        state, metadata = split_fused(fused.state, fused.metadata)
        config, class_name = official_config(fused.config), OFFICIAL_CLASS_NAME
    files = write_model_directory(destination, state, metadata, config, class_name, max_shard_bytes)
    summary = (
        f"{SOURCE_KINDS[fused.source_kind]} {source} -> {to} DSD transformer {destination}: {len(state)} tensors, "
        f"{_format_bytes(_nbytes(state))} in {len(files)} file(s)"
    )
    if fused.folded_lora is not None:
        summary += f"; folded LoRA sha256 {fused.folded_lora}"
    return summary
