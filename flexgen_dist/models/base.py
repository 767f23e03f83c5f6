"""What every model family provides (`Family`): a spec, per-layer weight specs, plain layer math and
the explicit map from its weights to the keys of a Hugging Face checkpoint.

A family never sees tiers, files or ranks. The executor hands each layer a dict of weight tensors
already on the compute device, the hidden states, and (for attention layers) a KV buffer to append to.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import FlexGenError

EMBED, BLOCK, HEAD = "embed", "block", "head"


class ModelError(FlexGenError):
    """A model name, path or config the engine cannot use."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The architecture facts the engine outside `models/` may use; each family subclasses it.

    `eos_token_id` is the first end-of-sequence id (`eos_token_ids` all of them: Llama 3 has
    several); `pad_token_id` is the config's own and may be None (Llama has none); use `pad_id`."""

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int = 0  # 0: as many as query heads (multi-head attention)
    head_size: int = 0  # 0: hidden_size // num_heads
    max_positions: int = 2048
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def pad_id(self) -> int:
        """The id that fills padding: the config's pad token, else its EOS, as transformers'
        `generate` does when told `pad_token_id=eos_token_id`; padded positions are never attended."""
        for candidate in (self.pad_token_id, self.eos_token_id):
            if candidate is not None:
                return candidate
        return 0


def eos_ids(value) -> tuple[int, ...]:
    """A config's `eos_token_id` (None, an int or a list) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclass(frozen=True)
class WeightSpec:
    """One stored tensor: `key` is the layer-local name the math uses, `name` the store-wide name.

    `init` is how seeded dummy weights fill it: "normal" (N(0, 0.02^2)), "ones" (norm scales) or
    "zeros" (biases and norm shifts), so a dummy model computes with sane magnitudes."""

    key: str
    name: str
    shape: tuple[int, ...]
    compressible: bool | str = False  # matmul weights (True) and vocabulary tables (TABLE); never norms or biases
    linear: bool = False  # used as a `kernels.linear` weight (may be packed for the device)
    init: str = "normal"
    expert: int | None = None  # the routed expert it belongs to: read only when a token routes to it


@dataclass(frozen=True)
class Derived:
    """A stored weight cut out of checkpoint tensors that hold more than it (gpt-oss keeps all of a
    layer's experts in one tensor): `cut(*slabs)` of slab `index` (along the first dimension) of
    each of `keys`. A reader fetches only those slabs, not the whole tensors."""

    keys: tuple[str, ...]
    index: int
    cut: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class StepInputs:
    """Per (token step, batch) tensors shared by every layer of the step.

    `extra` is scratch space a family fills lazily at its first layer of the step and its other
    layers reuse (e.g. rotary cos/sin tables); the engine never reads it."""

    positions: torch.Tensor  # (b, s) position ids of the new tokens
    attn_bias: torch.Tensor | None  # (b, 1, s, start + s) additive mask: 0 where visible, dtype-min elsewhere
    start: int  # index in the KV buffer of the first new token
    targets: torch.Tensor | None = None  # (b, w) scoring: the tokens the last w positions should predict, -1 none
    is_token: torch.Tensor | None = None  # (b, s) bool: False where a new position is padding (None: none is)
    extra: dict = field(default_factory=dict, compare=False)


def over_tokens(fn: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """`fn` (rows -> rows of the same shape) applied to the rows of `flat` ((b * s, d), the step's
    positions in order) that hold tokens; padding rows get zeros. For per-token work that is worth
    skipping where a batch is padded (a MoE layer's routed experts: padding would route to experts
    and have them read and multiplied): nothing reads a padding position's output (no query sees
    it as a key, no target follows it)."""
    if inputs.is_token is None:
        return fn(flat)
    rows = inputs.is_token.reshape(-1).nonzero()[:, 0]
    out = torch.zeros_like(flat)
    return out.index_copy_(0, rows, fn(flat[rows])) if len(rows) else out


TOP_LOGPROBS = 5  # alternatives a scored position reports (OpenAI's completions API allows up to 5)
SCORE_WIDTH = 2 + 2 * TOP_LOGPROBS  # per scored position: see `token_scores`


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(b, w, vocab) float logits and (b, w) target ids (-1: no target) -> (b, w, SCORE_WIDTH): each
    target's log-probability, whether it is the most likely token (1.0 or 0.0), then the
    `TOP_LOGPROBS` largest log-probabilities (descending) and their token ids (as floats, exact
    below 2**24); zeros where no target. Log-softmax in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    wanted = targets.clamp(min=0)
    picked = logp.gather(-1, wanted[..., None])[..., 0]
    greedy = (logp.argmax(dim=-1) == wanted).float()
    k = min(TOP_LOGPROBS, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)
    pad = torch.zeros(*top.shape[:-1], TOP_LOGPROBS - k, dtype=top.dtype, device=top.device)
    scores = torch.cat([picked[..., None], greedy[..., None], top, pad, ids.float(), pad], dim=-1)
    return scores.masked_fill((targets < 0)[..., None], 0.0)


SCORE_CHUNK = 1 << 24  # logits (float32 elements) the output head makes at once when scoring


def score_positions(h: torch.Tensor, targets: torch.Tensor, logits_of: Callable, vocab: int) -> torch.Tensor:
    """`token_scores` of the positions of `h` (b, w, hidden) that predict `targets` (b, w): only
    positions with a target (>= 0) go through `logits_of` (the family's final norm and projection),
    a few at a time, so that at most `SCORE_CHUNK` logits exist at once (a long window's full
    logits would not fit); zeros elsewhere."""
    wanted = (targets >= 0).nonzero(as_tuple=True)
    picked, ids = h[wanted], targets[wanted]
    out = torch.zeros(*targets.shape, SCORE_WIDTH, dtype=torch.float32, device=h.device)
    step = max(1, SCORE_CHUNK // max(1, vocab))
    if len(ids):
        out[wanted] = torch.cat([token_scores(logits_of(picked[None, a:a + step])[0], ids[a:a + step])
                                 for a in range(0, len(ids), step)])
    return out


@dataclass
class Layer:
    """One schedule layer: its weights and its math.

    `forward(weights, x, inputs, kv)` returns the new hidden states. Layers with `kv_heads` set
    receive `kv = (k_buf, v_buf)`, each `(b, kv_heads, capacity, head_dim)`; they write the new
    tokens' keys/values at `[:, :, start:start+s]` and attend over `[:, :, :start+s]`.
    `part` says what the layer is for stage partitioning: the embedding (before every block),
    transformer block `block` (attention and MLP are two layers of one block), or the output head.
    """

    name: str
    weights: list[WeightSpec]
    forward: Callable
    kv_heads: int = 0
    head_dim: int = 0
    parts: list[Layer] = field(default_factory=list)
    part: str = BLOCK
    block: int = -1
    top_k: int = 0  # routed experts per token (a mixture-of-experts layer; 0: none)
    # its math treats every position on its own (no attention, no cache, no order): several
    # batches' positions may go through it as one (`positions_as_one`)
    per_position: bool = False

    @property
    def has_cache(self) -> bool:
        return self.kv_heads > 0

    @property
    def num_experts(self) -> int:
        return len({w.expert for w in self.weights if w.expert is not None})


def positions_as_one(xs: Sequence[torch.Tensor], inputs: Sequence[StepInputs]) -> tuple[torch.Tensor, StepInputs]:
    """Several batches' hidden states ((b, s, d) each) as one row of all their positions
    (1, sum of b * s, d), with their padding marks, for a `Layer.per_position` layer to compute in
    one call. The inputs made carry no mask (`attn_bias` None) and no cache place: such a layer
    reads neither. `split_positions` gives each batch its part of the output."""
    flat = torch.cat([x.reshape(1, -1, x.shape[-1]) for x in xs], dim=1)
    marks = None
    if any(i.is_token is not None for i in inputs):
        marks = torch.cat([_token_marks(x, i).reshape(1, -1) for x, i in zip(xs, inputs)], dim=1)
    positions = torch.cat([i.positions.reshape(1, -1) for i in inputs], dim=1)
    return flat, StepInputs(positions=positions, attn_bias=None, start=0, is_token=marks)


def _token_marks(x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """(b, s) bool: which positions of `x` hold tokens (all, where `inputs` marks no padding)."""
    if inputs.is_token is not None:
        return inputs.is_token
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def split_positions(y: torch.Tensor, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`y` (1, sum of b * s, d) from `positions_as_one(xs, ...)` cut back into the batches' shapes."""
    return [part.reshape(x.shape[:2] + part.shape[-1:])
            for part, x in zip(y[0].split([x.shape[0] * x.shape[1] for x in xs]), xs)]


def take(weights: Mapping, keys: list[str]) -> Iterator:
    """`weights[k]` for every key, in order, each looked up only when the iterator reaches it. A
    mapping that loads on demand (the executor's view of a layer whose routed experts are read only
    when used) gets all of `keys` requested at once first, so later keys load while the caller
    works on the first ones."""
    prefetch = getattr(weights, "prefetch", None)
    if prefetch is not None:
        prefetch(keys)
    return (weights[k] for k in keys)


class PartWeights(Mapping):
    """The weights of part `i` of a merged layer, keyed without the `i.` prefix; nothing is read
    from the parent mapping until asked for."""

    def __init__(self, parent: Mapping, i: int):
        self.parent, self.prefix = parent, f"{i}."

    def __getitem__(self, key: str):
        return self.parent[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        return (k[len(self.prefix):] for k in self.parent if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def prefetch(self, keys: list[str]) -> None:
        prefetch = getattr(self.parent, "prefetch", None)
        if prefetch is not None:
            prefetch([self.prefix + k for k in keys])


def merge_layers(name: str, parts: list[Layer]) -> Layer:
    """Run several layers of one block as one schedule layer (FlexGen's `--sep-layer 0`)."""
    weights = [dataclasses.replace(w, key=f"{i}.{w.key}") for i, p in enumerate(parts) for w in p.weights]
    cached = [p for p in parts if p.has_cache]
    assert len(cached) <= 1, "a merged layer holds at most one KV cache"

    def forward(weights, x, inputs, kv=None):
        for i, part in enumerate(parts):
            mine = PartWeights(weights, i)
            x = part.forward(mine, x, inputs, kv) if part.has_cache else part.forward(mine, x, inputs)
        return x

    return Layer(name, weights, forward, kv_heads=cached[0].kv_heads if cached else 0,
                 head_dim=cached[0].head_dim if cached else 0, parts=parts, part=parts[0].part,
                 block=parts[0].block, top_k=max(p.top_k for p in parts))


def weight_elements(layer: Layer) -> int:
    return sum(torch.Size(w.shape).numel() for w in layer.weights)


def stage_costs(layers: list[Layer], num_blocks: int) -> tuple[list[int], int, int]:
    """(elements per transformer block, embedding elements, head elements) of a whole model's
    layers: what the pipeline partition balances. A tied embedding counts on both ends, as both
    the first and the last stage hold it."""
    blocks, embed, head = [0] * num_blocks, 0, 0
    for layer in layers:
        n = weight_elements(layer)
        if layer.part == EMBED:
            embed += n
        elif layer.part == HEAD:
            head += n
        else:
            blocks[layer.block] += n
    return blocks, embed, head


def specs(prefix: str, entries: list[tuple]) -> list[WeightSpec]:
    """(key, name, shape, compressible[, linear[, init]]) tuples -> WeightSpecs named `prefix + name`."""
    return [WeightSpec(key, f"{prefix}{name}", tuple(shape), *e) for key, name, shape, *e in entries]


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family, as the engine outside `models/` sees it (each family folder's `FAMILY`).

    - `spec_type`: its ModelSpec subclass; `model_types`: the Hugging Face `model_type`s it reads;
      `builtin`: named specs for `--dummy-weights`;
    - `spec_from_config(config, name)`: a `config.json` dict -> spec (ModelError on what it cannot run);
    - `build_layers(spec, first=0, last=None, with_embed=True, with_head=True, sep_layer=True)`: the
      schedule layers of transformer blocks [first, last);
    - `checkpoint_keys(spec)`: every stored weight's name -> the checkpoint keys it may be read from
      (the first one present wins; a `Derived` one is cut from the tensors it names, all present);
      a checkpoint lacking one is refused when the model is resolved;
    - `flops_per_token(spec, context)`: (block FLOPs, head FLOPs) of one new token attending to
      `context` tokens."""

    name: str
    spec_type: type
    model_types: tuple[str, ...]
    builtin: Sequence[ModelSpec]
    spec_from_config: Callable[[dict, str], ModelSpec]
    build_layers: Callable[..., list[Layer]]
    checkpoint_keys: Callable[[ModelSpec], dict[str, tuple[str | Derived, ...]]]
    flops_per_token: Callable[[ModelSpec, int], tuple[float, float]]


def only_multiplied(layers: list[Layer]) -> dict[str, bool]:
    """Weight name -> whether every use of it is as a matmul weight (`WeightSpec.linear`); a tied
    embedding is also looked up by rows, so it is not."""
    out: dict[str, bool] = {}
    for w in (w for layer in layers for w in layer.weights):
        out[w.name] = out.get(w.name, True) and w.linear
    return out


def stored_names(layers: list[Layer]) -> list[str]:
    """The store names of `layers`' weights, each once (a tied weight serves two layers), in order."""
    return list(dict.fromkeys(w.name for layer in layers for w in layer.weights))
