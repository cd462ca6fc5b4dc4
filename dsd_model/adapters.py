"""Named LoRA adapters on the DSD transformer.

File layout (the official DSD release and ours are the same): safetensors with
`transformer.<module>.lora_A.weight` [r, in] and `transformer.<module>.lora_B.weight` [out, r], no alpha keys
(scale 1, i.e. `W + B @ A`), any rank, per-module ranks allowed. Ours may add `transformer.x_embedder.weight` /
`.bias`: a full replacement of the input embedder (its condition columns are trained with the adapter), swapped in
while the adapter is active.

Every key is checked before anything touches the model: an unknown module, a non-linear target, a shape that does
not fit or a key of another layout is an error naming the key and both shapes. Nothing is padded or dropped.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import WeightsError

LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
EMBEDDER_KEYS = ("transformer.x_embedder.weight", "transformer.x_embedder.bias")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else (pickles included) is refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"adapter file {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{str(path)!r}: only .safetensors files are loaded (pickle formats are never opened)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several error types for a damaged header
        raise WeightsError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc


def lora_fingerprint(lora: dict[str, torch.Tensor]) -> str:
    """Content hash of LoRA tensors (names without the `transformer.` prefix), to detect a LoRA applied twice."""
    digest = hashlib.sha256()
    for key in sorted(lora):
        name = key.removeprefix("transformer.")
        tensor = lora[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def split_adapter_state(
    state: dict[str, torch.Tensor], transformer: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """Check an adapter state dict against `transformer`; return (lora tensors, embedder tensors, rank per module)."""
    lora: dict[str, torch.Tensor] = {}
    embedder: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    modules = dict(transformer.named_modules())
    for key, tensor in state.items():
        if key in EMBEDDER_KEYS:
            embedder[key.removeprefix("transformer.x_embedder.")] = tensor
            continue
        match = LORA_KEY.match(key)
        if match is None:
            raise WeightsError(
                f"adapter key {key!r} is not in the supported layout "
                "(transformer.<module>.lora_A.weight / lora_B.weight, optional transformer.x_embedder.weight/bias)"
            )
        pairs.setdefault(match["module"], {})[match["kind"]] = tensor
        lora[key] = tensor
    if not pairs:
        raise WeightsError("adapter has no LoRA tensors (transformer.<module>.lora_A.weight / lora_B.weight)")
    ranks = {}
    for module_name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise WeightsError(f"adapter key transformer.{module_name}.lora_{missing}.weight is missing")
        module = modules.get(module_name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, torch.nn.Linear):
            kind = "no such module" if module is None else f"a {type(base).__name__}, not a Linear layer"
            raise WeightsError(f"adapter targets transformer.{module_name}: {kind} in this transformer")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        expected_a, expected_b = (rank, base.in_features), (base.out_features, rank)
        if a.ndim != 2 or tuple(a.shape) != expected_a:
            raise WeightsError(
                f"adapter key transformer.{module_name}.lora_A.weight has shape {tuple(a.shape)}, "
                f"the module needs {expected_a}"
            )
        if tuple(b.shape) != expected_b:
            raise WeightsError(
                f"adapter key transformer.{module_name}.lora_B.weight has shape {tuple(b.shape)}, "
                f"the module needs {expected_b}"
            )
        ranks[module_name] = rank
    if embedder:
        x_embedder = modules["x_embedder"]
        x_embedder = x_embedder.get_base_layer() if hasattr(x_embedder, "get_base_layer") else x_embedder
        for part, param in (("weight", x_embedder.weight), ("bias", x_embedder.bias)):
            if part not in embedder:
                raise WeightsError(f"adapter key transformer.x_embedder.{part} is missing (both parts are needed)")
            if tuple(embedder[part].shape) != tuple(param.shape):
                raise WeightsError(
                    f"adapter key transformer.x_embedder.{part} has shape {tuple(embedder[part].shape)}, "
                    f"the model needs {tuple(param.shape)}"
                )
    return lora, embedder, ranks


class AdapterRegistry:
    """The adapters loaded into one transformer and which one is active.

    Switching happens between batches (the engine groups requests by adapter). `fuse` folds one adapter into the
    weights for speed; a fused model serves only that adapter. `fold_on_activate` serves every adapter folded: each
    switch rebuilds the adapted weights from a kept copy of the base weights, so no rounding accumulates.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.ranks: dict[str, dict[str, int]] = {}
        self.active: str | None = None
        self.fused: str | None = None
        self.folded_lora: str | None = None
        """Fingerprint of a LoRA already folded into the base weights by `dsd convert` (refused if loaded again)."""
        self._base_weights: dict[str, torch.Tensor] | None = None
        """Base weights of the LoRA-targeted layers while adapters are folded on activation."""
        self._embedders: dict[str, dict[str, torch.Tensor]] = {}
        self._base_embedder: dict[str, torch.Tensor] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.ranks)

    def load(self, source: str | Path | dict, name: str) -> None:
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise WeightsError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern}")
        if name in self.ranks:
            raise WeightsError(f"an adapter named {name!r} is already loaded")
        if self.fused is not None:
            raise WeightsError(f"adapter {self.fused!r} is fused into the weights; no other adapter can be loaded")
        if self._base_weights is not None:
            raise WeightsError("adapters are folded on activation; load every adapter before `fold_on_activate`")
        state = read_safetensors(source)[0] if not isinstance(source, dict) else source
        lora, embedder, ranks = split_adapter_state(state, self.transformer)
        if self.folded_lora is not None and lora_fingerprint(lora) == self.folded_lora:
            raise WeightsError(
                f"adapter {name!r} is the LoRA already folded into the transformer weights by `dsd convert`; "
                "loading it again would apply it twice"
            )
        dtype = next(self.transformer.parameters()).dtype
        lora = {k: v.to(dtype) for k, v in lora.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # expected: named adapters
            self.transformer.load_lora_adapter(lora, adapter_name=name, prefix="transformer")
        if embedder:
            self._embedders[name] = {k: v.to(dtype) for k, v in embedder.items()}
        self.ranks[name] = ranks
        previous, self.active = self.active, "__loading__"
        self.activate(previous)

    def activate(self, name: str | None) -> None:
        if name is not None and name not in self.ranks:
            raise WeightsError(f"unknown adapter {name!r}; loaded adapters: {self.names or 'none'}")
        if name == self.active:
            return
        if self.fused is not None and name != self.fused:
            raise WeightsError(f"adapter {self.fused!r} is fused into the weights; {name!r} cannot be activated")
        if self._base_weights is not None:
            self._fold(name)
        elif self.ranks:
            if name is None:
                self.transformer.disable_lora()
            else:
                self.transformer.enable_lora()
                self.transformer.set_adapters([name])
        self._swap_embedder(name)
        self.active = name

    def fuse(self, name: str) -> None:
        """Fold adapter `name` into the weights (faster forwards); afterwards only `name` can be active."""
        self.activate(name)
        self.transformer.fuse_lora(adapter_names=[name])
        self.fused = name

    def fold_on_activate(self) -> None:
        """Serve every loaded adapter folded into the weights (no LoRA matmuls per forward); the base weights of the
        adapted layers are kept once. Adapters cannot be loaded afterwards."""
        if self.fused is not None or self._base_weights is not None:
            return
        active, self.active = self.active, "__folding__"
        self._base_weights = {
            name: module.base_layer.weight.detach().clone() for name, module in self._lora_layers()
        }
        self.transformer.disable_lora()
        self.activate(active)

    def _lora_layers(self):
        return [(n, m) for n, m in self.transformer.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]

    def _fold(self, name: str | None) -> None:
        with torch.no_grad():
            for module_name, module in self._lora_layers():
                weight = module.base_layer.weight
                base = self._base_weights[module_name]
                if name is not None and name in module.lora_A:
                    weight.copy_((base.float() + module.get_delta_weight(name).float()).to(weight.dtype))
                else:
                    weight.copy_(base)

    def _swap_embedder(self, name: str | None) -> None:
        layer = self.transformer.x_embedder
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        replacement = self._embedders.get(name)
        if replacement is None and self._base_embedder is None:
            return
        if self._base_embedder is None:
            self._base_embedder = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
        source = replacement or self._base_embedder
        with torch.no_grad():
            layer.weight.copy_(source["weight"])
            layer.bias.copy_(source["bias"])
