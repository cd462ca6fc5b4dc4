"""LoRA adapters on the DSD transformer, applied per row: rows of different adapters share one forward.

File layout (the official DSD release and ours are the same): safetensors with
`transformer.<module>.lora_A.weight` [r, in] and `transformer.<module>.lora_B.weight` [out, r], no alpha keys
(scale 1, i.e. `W + B @ A`), any rank, per-module ranks allowed. Ours may add `transformer.x_embedder.weight` /
`.bias`: a full replacement of the input embedder (its condition columns are trained with the adapter).

Every key is checked before anything touches the model: an unknown module, a non-linear target, a shape that does
not fit or a key of another layout is an error naming the key and both shapes. Nothing is padded or dropped.

How a forward applies adapters (the S-LoRA / Punica idea; vLLM's punica wrapper is the model): the base weights'
matrix multiplies run once for every row, and each adapter's low-rank delta is added to its own rows only. Which rows
use which adapter is computed once per forward (`AdapterRegistry.rows`) into segments of consecutive rows of one
adapter; a forward hook on every targeted Linear layer adds each segment's delta in place, so the layers stay
ignorant of the batch. The input embedder's replacement is applied to its rows the same way.

Two ways to serve, chosen by `fold_on_activate`:
- unfused (the default): the weights are the base weights; a row of adapter `a` gets `B_a A_a x`.
- folded: a forward whose rows all use one adapter `f` runs on the folded weights `W + B_f A_f` (rebuilt from a kept
  copy of the base weights, so no rounding accumulates) and pays no LoRA at all. In a mixed forward, folding `f`
  saves its rows' LoRA but makes every other row pay `B_a A_a x - B_f A_f x`: cheaper only while `f` holds more
  than half of the rows. So a mixed forward folds its most-used adapter when it has that majority, and otherwise
  runs on the base weights with every row's LoRA on its own segment (`fold_for`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from .errors import WeightsError

LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
EMBEDDER_KEYS = ("transformer.x_embedder.weight", "transformer.x_embedder.bias")
EMBEDDER = "x_embedder"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
BASE_DIGEST_KEY = "base_transformer_digest"
"""Adapter file metadata: `transformer_digest` of the base the adapter was trained on (written by `dsd train` and
`dsd adapters publish`); an adapter that carries one is refused on another base."""
DIGEST_SAMPLES = 4096
"""Values read from each tensor by `transformer_digest`."""


def check_adapter_path(path: Path) -> None:
    """Refuse a path that is not an existing safetensors file (pickle formats are never opened)."""
    if not path.is_file():
        raise WeightsError(f"adapter file {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{str(path)!r}: only .safetensors files are loaded (pickle formats are never opened)")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else (pickles included) is refused."""
    path = Path(path)
    check_adapter_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several error types for a damaged header
        raise WeightsError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc


def parse_safetensors(data: bytes, origin: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the bytes of a safetensors file read once (so its digest and its tensors agree)."""
    try:
        tensors = load_safetensors(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    except Exception as exc:  # a damaged or partly written file
        raise WeightsError(f"{origin} is not a readable safetensors file: {exc}") from exc
    return tensors, dict(metadata)


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


@torch.no_grad()
def transformer_digest(transformer: torch.nn.Module) -> str:
    """Which base transformer this is: a sha256 of its config, every parameter's name and shape, and
    `DIGEST_SAMPLES` evenly spaced values of each, rounded to bfloat16 so that the same weights in float32 and in
    bfloat16 have the same digest. Reads a few MB, not the 24 GB of FLUX.1-dev: compute it at load."""
    digest = hashlib.sha256()
    config = {k: v for k, v in getattr(transformer, "config", {}).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(transformer.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(DIGEST_SAMPLES, flat.numel())
        index = torch.arange(count, device=flat.device) * max(flat.numel() - 1, 0) // max(count - 1, 1)
        sample = flat[index].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter's tensors on the transformer's device and dtype, ready to apply to rows."""

    name: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name → (A [r, in], B [out, r])."""
    embedder: tuple[torch.Tensor, torch.Tensor] | None = None
    """The input embedder's replacement (weight, bias), or None."""
    metadata: dict[str, str] = field(default_factory=dict)
    digest: str = ""
    """sha256 of the file's bytes (of the tensors for a state dict): two loads of the same content are one adapter."""

    @property
    def ranks(self) -> dict[str, int]:
        return {module: a.shape[0] for module, (a, _) in self.lora.items()}

    @property
    def rank(self) -> int:
        return max(self.ranks.values())

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.lora.values() for t in pair] + list(self.embedder or ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def delta(self, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """`B A x` of `module` for rows `x`; None when this adapter does not target `module`."""
        pair = self.lora.get(module)
        if pair is None:
            return None
        a, b = pair
        return (x @ a.T) @ b.T


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
        if not isinstance(module, torch.nn.Linear) or module_name == EMBEDDER:
            kind = "no such module" if module is None else f"a {type(module).__name__}, not a Linear layer"
            if module_name == EMBEDDER:
                kind = "the input embedder, which adapters replace whole (transformer.x_embedder.weight/bias)"
            raise WeightsError(f"adapter targets transformer.{module_name}: {kind} in this transformer")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        expected_a, expected_b = (rank, module.in_features), (module.out_features, rank)
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
        x_embedder = modules[EMBEDDER]
        for part, param in (("weight", x_embedder.weight), ("bias", x_embedder.bias)):
            if part not in embedder:
                raise WeightsError(f"adapter key transformer.x_embedder.{part} is missing (both parts are needed)")
            if tuple(embedder[part].shape) != tuple(param.shape):
                raise WeightsError(
                    f"adapter key transformer.x_embedder.{part} has shape {tuple(embedder[part].shape)}, "
                    f"the model needs {tuple(param.shape)}"
                )
    return lora, embedder, ranks


@dataclass(frozen=True)
class RowPlan:
    """Which adapter each row of one forward uses, as segments `(start, end, adapter)` of consecutive rows, and the
    adapter folded into the weights meanwhile (`folded`, None when the weights are the base weights)."""

    segments: tuple[tuple[int, int, LoadedAdapter | None], ...]
    folded: LoadedAdapter | None

    @classmethod
    def of(cls, rows: Sequence[LoadedAdapter | None], folded: LoadedAdapter | None) -> "RowPlan":
        segments: list[list] = []
        for row, adapter in enumerate(rows):
            if segments and segments[-1][2] is adapter:
                segments[-1][1] = row + 1
            else:
                segments.append([row, row + 1, adapter])
        return cls(tuple(tuple(segment) for segment in segments), folded)

    def row_adapters(self) -> list[LoadedAdapter | None]:
        return [adapter for start, end, adapter in self.segments for _ in range(start, end)]


class AdapterRegistry:
    """The adapters of one transformer: named adapters loaded with `load`, and the per-row application of any
    `LoadedAdapter` (named or not, e.g. from an adapter store) during a forward.

    Thread use: `read` (validate a file and build its tensors) may run on any thread; forwards, `rows`, `activate`
    and the folding they do run on the thread that runs forwards. Hooks are installed on that thread too, between
    forwards, so a module's hooks never change while it runs.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.adapters: dict[str, LoadedAdapter] = {}
        """Named adapters (settings, the tiny profile's, `DSDPipeline.load_adapter`)."""
        self.active: str | None = None
        """The named adapter every row uses outside `rows` (set by `activate`)."""
        self.fused: str | None = None
        self.folded_lora: str | None = None
        """Fingerprint of a LoRA already folded into the base weights by `dsd convert` (refused if loaded again)."""
        self.base_digest = transformer_digest(transformer)
        """`transformer_digest` of the base (before any adapter is fused): adapters trained on another base are
        refused."""
        self._plan: RowPlan | None = None
        self._folded: LoadedAdapter | None = None
        self._base_weights: dict[str, torch.Tensor] | None = None
        """Base weights of the adapted layers while adapters are folded; None: unfused."""
        self._hooked: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._hooks: dict[str, Callable] = {}
        transformer.register_forward_pre_hook(self._before_forward)
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def ranks(self) -> dict[str, dict[str, int]]:
        return {name: adapter.ranks for name, adapter in self.adapters.items()}

    @property
    def folding(self) -> bool:
        return self._base_weights is not None

    def is_folded(self, adapter: LoadedAdapter) -> bool:
        """Whether `adapter` is folded into the weights now (its tensors are needed to unfold it)."""
        return adapter is self._folded

    # ------------------------------------------------------------------ loading

    def read(self, source: str | Path | bytes | dict, name: str, origin: str | None = None) -> LoadedAdapter:
        """Validate an adapter (a file path, a file's bytes, or a state dict) against the transformer and return its
        tensors on the transformer's device and dtype; registers nothing. `origin` names it in errors."""
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise WeightsError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern}")
        if isinstance(source, dict):
            state, metadata = source, {}
            digest = lora_fingerprint(state)
        else:
            if not isinstance(source, bytes):
                check_adapter_path(Path(source))
                origin, source = origin or repr(str(source)), Path(source).read_bytes()
            state, metadata = parse_safetensors(source, origin or f"adapter {name!r}")
            digest = hashlib.sha256(source).hexdigest()
        lora, embedder, _ = split_adapter_state(state, self.transformer)
        trained_on = metadata.get(BASE_DIGEST_KEY)
        if trained_on and trained_on != self.base_digest:
            raise WeightsError(
                f"adapter {name!r} was trained on base transformer {trained_on}, but this server runs base "
                f"transformer {self.base_digest}; train or publish it for this base"
            )
        if self.folded_lora is not None and lora_fingerprint(lora) == self.folded_lora:
            raise WeightsError(
                f"adapter {name!r} is the LoRA already folded into the transformer weights by `dsd convert`; "
                "loading it again would apply it twice"
            )
        to_model = self._to_model()
        pairs = {}
        for key in lora:
            module = LORA_KEY.match(key)["module"]
            pairs.setdefault(module, [None, None])["AB".index(LORA_KEY.match(key)["kind"])] = to_model(lora[key])
        return LoadedAdapter(
            name=name,
            lora={module: (a, b) for module, (a, b) in sorted(pairs.items())},
            embedder=(to_model(embedder["weight"]), to_model(embedder["bias"])) if embedder else None,
            metadata=metadata,
            digest=digest,
        )

    def _to_model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A tensor on the transformer's device and in its dtype."""
        parameter = next(self.transformer.parameters())
        dtype = parameter.dtype if parameter.is_floating_point() else torch.bfloat16
        device = self.transformer.device
        return lambda tensor: tensor.to(device=device, dtype=dtype).contiguous()

    def follow_transformer(self) -> None:
        """Move the named adapters (and the kept base weights) to the transformer's device and dtype, after the
        transformer moved (`DSDPipeline.to`)."""
        to_model = self._to_model()
        with self._lock:
            for adapter in self.adapters.values():
                adapter.lora = {module: (to_model(a), to_model(b)) for module, (a, b) in adapter.lora.items()}
                if adapter.embedder is not None:
                    adapter.embedder = (to_model(adapter.embedder[0]), to_model(adapter.embedder[1]))
            if self._base_weights:
                modules = dict(self.transformer.named_modules())
                self._base_weights = {name: weight.to(modules[name].weight)
                                      for name, weight in self._base_weights.items()}

    def load(self, source: str | Path | dict, name: str) -> LoadedAdapter:
        """Load a named adapter (file or state dict); `activate(name)` or a request naming it then uses it."""
        if name in self.adapters:
            raise WeightsError(f"an adapter named {name!r} is already loaded")
        if self.fused is not None:
            raise WeightsError(f"adapter {self.fused!r} is fused into the weights; no other adapter can be loaded")
        adapter = self.read(source, name)
        with self._lock:
            self.adapters[name] = adapter
        return adapter

    def get(self, name: str | None) -> LoadedAdapter | None:
        if name is None:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise WeightsError(f"unknown adapter {name!r}; loaded adapters: {self.names or 'none'}")
        return adapter

    # ------------------------------------------------------------------ which adapter each row uses

    def activate(self, name: str | None) -> None:
        """Use named adapter `name` (None: the base model) for every row of the forwards outside `rows`."""
        adapter = self.get(name)
        if self.fused is not None and name != self.fused:
            raise WeightsError(f"adapter {self.fused!r} is fused into the weights; {name!r} cannot be activated")
        if self.folding:
            self._fold(adapter)
        self.active = name
        self._set_hooks(RowPlan(((0, 1, adapter),), self._folded))

    @contextmanager
    def rows(self, adapters: Sequence[LoadedAdapter | None]) -> Iterator[RowPlan]:
        """Apply `adapters[i]` to row i of the forwards run inside; rows of one adapter should be consecutive (each
        run of rows is one segment). Folding, when on, folds the most-used adapter first."""
        if self.fused is not None:
            fused = self.adapters[self.fused]
            stray = {a.name if a is not None else None for a in adapters if a is not fused}
            if stray:
                raise WeightsError(f"adapter {self.fused!r} is fused into the weights; {sorted(map(str, stray))} "
                                   "cannot be served by this transformer")
        if self.folding:
            self._fold(self.fold_for(adapters))
        plan = RowPlan.of(adapters, self._folded)
        self._set_hooks(plan)
        self._plan = plan
        try:
            yield plan
        finally:
            self._plan = None

    @contextmanager
    def subset(self, index: Sequence[int]) -> Iterator[None]:
        """Inside, forwards run on rows `index` of the forward planned by `rows` (a step cache that computes only some
        rows), so each of them keeps its adapter."""
        plan = self._plan
        if plan is None:
            yield
            return
        rows = plan.row_adapters()
        self._plan = RowPlan.of([rows[i] for i in index], plan.folded)
        try:
            yield
        finally:
            self._plan = plan

    def fold_for(self, adapters: Sequence[LoadedAdapter | None]) -> LoadedAdapter | None:
        """The adapter to fold for a forward over rows of `adapters` (folding on): the most-used one when it holds
        more than half of the rows (or exactly half and is folded already, so a balanced mix does not refold), else
        none. Folded, `f`'s rows pay no LoRA and each other row pays its own and `f`'s; unfolded, every row pays its
        own: with `n` of `R` rows of rank r, folding saves r n and costs r (R - n)."""
        best = most_used(adapters, self._folded)
        share = 2 * sum(1 for adapter in adapters if adapter is best)
        if share > len(adapters) or (share == len(adapters) and best is self._folded):
            return best
        return None

    def _current_plan(self, rows: int) -> RowPlan:
        if self._plan is not None:
            return self._plan
        active = self.adapters.get(self.active) if self.active is not None else None
        return RowPlan(((0, rows, active),), self._folded)

    # ------------------------------------------------------------------ hooks

    @property
    def lora_hooked(self) -> bool:
        """Whether forwards now apply some LoRA per row beside the weights (a mixed forward, or an adapter unfused):
        compiled blocks would specialise on the rows' layout, so such forwards run eagerly (`DSDPipeline._forward`)."""
        return any(name != EMBEDDER for name in self._hooked)

    def _before_forward(self, module, args) -> None:
        """Every forward runs with the hooks its plan needs (set before any block runs, never during a forward)."""
        self._set_hooks(self._current_plan(1))

    def _set_hooks(self, plan: RowPlan) -> None:
        """Hook exactly the modules `plan` needs: those whose LoRA some row applies beside the weights (its own
        adapter's, and the folded adapter's difference), and the embedder for adapters that replace it. A forward of
        folded rows alone runs on bare modules, the path compiled blocks are compiled for."""
        needed = set()
        for _, _, adapter in plan.segments:
            if adapter is not None and adapter.embedder is not None:
                needed.add(EMBEDDER)
            if adapter is not plan.folded:
                for source in (adapter, plan.folded):
                    needed.update(source.lora if source is not None else ())
        for module_name in [name for name in self._hooked if name not in needed]:
            self._hooked.pop(module_name).remove()
        modules = None
        for module_name in needed - self._hooked.keys():
            modules = modules or dict(self.transformer.named_modules())
            hook = self._hooks.get(module_name)
            if hook is None:  # one function per module, so a module hooked again looks the same to torch.compile
                hook = self._hooks[module_name] = (self._embedder_hook if module_name == EMBEDDER
                                                   else self._lora_hook(module_name))
            self._hooked[module_name] = modules[module_name].register_forward_hook(hook)

    def _lora_hook(self, module_name: str):
        def hook(module, args, output):
            plan = self._current_plan(output.shape[0])
            x = args[0]
            folded = plan.folded
            for start, end, adapter in plan.segments:
                if adapter is folded:
                    continue
                rows = x[start:end]
                for source, sign in ((adapter, 1), (folded, -1)):
                    delta = source.delta(module_name, rows) if source is not None else None
                    if delta is not None:
                        if sign > 0:
                            output[start:end] += delta
                        else:
                            output[start:end] -= delta
            return output

        return hook

    def _embedder_hook(self, module, args, output):
        x = args[0]
        for start, end, adapter in self._current_plan(output.shape[0]).segments:
            if adapter is not None and adapter.embedder is not None:
                output[start:end] = torch.nn.functional.linear(x[start:end], *adapter.embedder)
        return output

    # ------------------------------------------------------------------ folding

    def fuse(self, name: str) -> None:
        """Fold named adapter `name` into the weights for good (faster forwards); afterwards only `name` is served."""
        adapter = self.get(name)
        with torch.no_grad():
            modules = dict(self.transformer.named_modules())
            for module_name, (a, b) in adapter.lora.items():
                weight = modules[module_name].weight
                weight.copy_((weight.float() + b.float() @ a.float()).to(weight.dtype))
        self._folded = adapter
        self.fused = name
        self.active = name
        self._set_hooks(RowPlan(((0, 1, adapter),), adapter))

    def fold_on_activate(self) -> None:
        """Serve adapters folded into the weights: each forward folds its most-used adapter (rebuilt from a kept copy
        of the base weights of every layer an adapter targets) and applies the others as differences."""
        if self.fused is not None or self.folding:
            return
        self._base_weights = {}
        active, self.active = self.active, None
        self.activate(active)

    def stop_folding(self) -> None:
        """Serve unfused again: the base weights are restored and every adapter's LoRA runs beside them."""
        if not self.folding:
            return
        self._fold(None)
        self._base_weights = None
        self._set_hooks(self._current_plan(1))

    def _fold(self, adapter: LoadedAdapter | None) -> None:
        if adapter is self._folded:
            return
        modules = dict(self.transformer.named_modules())
        with torch.no_grad():
            for source in (self._folded, adapter):
                for module_name in source.lora if source is not None else ():
                    if module_name not in self._base_weights:
                        self._base_weights[module_name] = modules[module_name].weight.detach().clone()
            if self._folded is not None:
                for module_name in self._folded.lora:
                    modules[module_name].weight.copy_(self._base_weights[module_name])
            if adapter is not None:
                for module_name, (a, b) in adapter.lora.items():
                    weight = modules[module_name].weight
                    base = self._base_weights[module_name]
                    weight.copy_((base.float() + b.float() @ a.float()).to(weight.dtype))
        self._folded = adapter


def most_used(adapters: Sequence[LoadedAdapter | None], current: LoadedAdapter | None) -> LoadedAdapter | None:
    """The adapter of the most rows; `current` (the folded one) wins ties, so a balanced mix does not refold."""
    counts = Counter(adapters)
    best = max(counts.values())
    if counts.get(current, 0) == best:
        return current
    return next(adapter for adapter in adapters if counts[adapter] == best)

