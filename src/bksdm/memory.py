"""Training memory per GPU of a distillation run (frozen teacher + trained student), by part, from the configs.

:func:`train_memory` answers "does a FLUX.1-dev -> Flux-Mini run fit, and on how many GPUs?" without a GPU. Every
part is bytes **per GPU**:

* ``teacher_weights`` (computed): the frozen teacher's parameters and buffers in the compute dtype (bf16);
* ``student_weights`` (computed): the student's fp32 master parameters and buffers;
* ``student_grads`` (computed): fp32 gradients of the trainable parameters;
* ``optimizer_states`` (computed): AdamW's two fp32 moments and a 0-d fp32 ``step`` per tensor, or 8-bit AdamW in
  bitsandbytes' blockwise layout (:func:`optimizer_bytes`);
* ``ema_weights`` (computed): with ``ema``, the fp32 EMA shadow of the student (sharded with it);
* ``fsdp_unsharded_units`` (computed): sharded runs, the all-gathered units alive at once (current + prefetched block
  in the compute dtype, the root unit, one block's fp32 gradients before the reduce-scatter);
* ``autocast_weight_copies`` (computed): unsharded runs under autocast, the bf16 copies of the student's fp32
  weights that autocast caches and the matmuls save for backward (with gradient checkpointing: one block's);
* ``student_activations`` (measured): what autograd saves for one student forward and the KD losses;
* ``teacher_outputs`` (measured): the teacher's output (output-KD target) and the features the KD hooks keep (the
  teacher runs under ``no_grad``: nothing else stays);
* ``feature_hooks_recompute`` (measured size): gradient checkpointing only, recomputing a block in backward fires
  its hook again, so a second set of student features lives through backward.

Sharding (FSDP ``FULL_SHARD`` / FSDP2 ``fully_shard`` / DeepSpeed ZeRO-3) divides weights, gradients and optimiser
states by ``shards``; activations are per process and are not divided.

**Measured** means: the models are built on the meta device (shapes, no memory), one student forward and the KD loss
run there under :func:`torch.autograd.graph.saved_tensors_hooks`, and the bytes are the sum of the *storages* of the
tensors autograd saves (each storage once: views and a tensor saved by two ops count once; parameter storages are
left out, they are weights). The same code on CPU tensors gives what a real CPU forward saves
(``tests/test_memory.py`` checks both are equal on a tiny Flux).

What the meta measurement cannot see:

* **Attention kernels.** On meta (and in PyTorch's math path) scaled-dot-product attention saves the softmax
  probabilities, (B, heads, L, L) per attention call. Flash and memory-efficient attention on a GPU save only q, k,
  v, the output and a float32 log-sum-exp (B, heads, L). ``attention="flash"`` (default) routes every
  ``scaled_dot_product_attention`` call through a stand-in that saves exactly that set (the set PyTorch's CPU flash
  kernel saves, tested); ``attention="math"`` keeps the math path, what an eager run without a fused kernel holds.
* **Autocast.** Autocast does not act on meta tensors, so the student runs in the compute dtype (bf16) outright.
  Under CUDA autocast the ops on its float32 list (``layer_norm``, ``softmax``, ``pow``, ...) save float32 copies of
  their inputs, so a real run saves somewhat more than the bf16 figure and less than the ``mixed_precision="no"``
  (float32) one. The autocast weight cache is computed separately (``autocast_weight_copies``).
* **Transient peaks.** Workspace of kernels, the largest temporaries of the teacher's no-grad forward and of the
  backward (a block's activation gradients), the caching allocator's rounding and fragmentation (often 5-20 %),
  the CUDA context and NCCL buffers (about 0.5-1 GB per process) are not in the parts; leave that headroom.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Sequence

import torch

TEACHER_WEIGHTS = "teacher_weights"
STUDENT_WEIGHTS = "student_weights"
STUDENT_GRADS = "student_grads"
OPTIMIZER_STATES = "optimizer_states"
FSDP_UNSHARDED_UNITS = "fsdp_unsharded_units"
AUTOCAST_WEIGHT_COPIES = "autocast_weight_copies"
STUDENT_ACTIVATIONS = "student_activations"
TEACHER_OUTPUTS = "teacher_outputs"
EMA_WEIGHTS = "ema_weights"
FEATURE_HOOKS_RECOMPUTE = "feature_hooks_recompute"
TOTAL = "total"
PARTS = (TEACHER_WEIGHTS, STUDENT_WEIGHTS, STUDENT_GRADS, OPTIMIZER_STATES, EMA_WEIGHTS, FSDP_UNSHARDED_UNITS,
         AUTOCAST_WEIGHT_COPIES, STUDENT_ACTIVATIONS, TEACHER_OUTPUTS, FEATURE_HOOKS_RECOMPUTE)
"""The keys of :func:`train_memory`'s result, in order (plus ``TOTAL``, their sum)."""

OPTIMIZERS = ("adamw", "adamw8bit")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements (``Optimizer8bit`` ``min_8bit_size``)."""
BNB_BLOCK = 256
"""bitsandbytes' blockwise quantisation: one float32 absmax per 256 values per state."""


# ---------------------------------------------------------------- measuring saved tensors
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: shared by views, unique while alive (meta tensors too)


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages of ``tensors`` (each once), leaving out the storages of ``exclude``."""
    skip = {_storage_key(t) for t in exclude}
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _FlashSDPA(torch.autograd.Function):
    """Stand-in for a fused attention kernel: the output, saving (q, k, v, out, float32 logsumexp (B, H, L)) as
    flash / memory-efficient attention do. Values are not computed (zeros): for measuring on meta only."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        lse = q.new_zeros(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class FusedAttention(torch.overrides.TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` through :class:`_FlashSDPA` (what a GPU's fused kernels save)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            kwargs = dict(kwargs or {})
            q, k, v = [*args[:3], *(kwargs.pop(n) for n in ("query", "key", "value")[len(args[:3]):])]
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention: the kernels broadcast, nothing more is saved
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
                v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
            return _FlashSDPA.apply(q, k, v)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_saved() -> Any:
    """Within the block, every tensor autograd saves is appended to the yielded list (and kept alive, so storages
    are never reused while counting)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _pick(output: Any, item: int | None) -> torch.Tensor:
    if item is not None:
        return output[item]
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


def _capture(model: torch.nn.Module, names: Sequence[str], store: dict[str, torch.Tensor]) -> list[Any]:
    from bksdm.arch.derive import split_feature_point

    modules = dict(model.named_modules())
    handles = []
    for name in names:
        module, item = split_feature_point(name)

        def hook(_m, _i, out, name=name, item=item):
            store[name] = _pick(out, item)

        handles.append(modules[module].register_forward_hook(hook))
    return handles


def block_lists(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a transformer (``transformer_blocks``, ``single_transformer_blocks``) or a U-Net's
    down / mid / up blocks: the units FSDP wraps and gradient checkpointing re-runs."""
    blocks: list[torch.nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks"):
        blocks += list(getattr(model, name, None) or [])
    if getattr(model, "mid_block", None) is not None:
        blocks.append(model.mid_block)
    return blocks


def measure_step(teacher: torch.nn.Module, student: torch.nn.Module, call: dict[str, Any],
                 feature_points: Sequence[tuple[str, str]] = (), attention: str = "flash",
                 gradient_checkpointing: bool = False) -> dict[str, int]:
    """Measured parts of one KD step (meta or real tensors): ``student_activations``, ``teacher_outputs`` and
    ``feature_hooks_recompute``.

    The teacher runs under ``no_grad``; the student forward and the loss (MSE to the teacher's output + one MSE per
    feature pair, in float32 as the recipe computes them) run under :func:`recording_saved`. With
    ``gradient_checkpointing`` the blocks' internals are not kept: what stays is everything saved outside the blocks,
    the blocks' inputs, the features the hooks hold, and during backward one block's recomputed internals (the
    largest block's, measured in the same pass). ``attention="flash"`` routes attention through the fused-kernel
    stand-in; ``"math"`` leaves it alone: the device's own kernel runs (on meta the math path; on CPU whatever
    :func:`torch.nn.attention.sdpa_kernel` selects, which is how the tests compare with real kernels).
    """
    if attention not in ("flash", "math"):
        raise ValueError(f"attention must be 'flash' or 'math', not {attention!r}")
    mode = FusedAttention() if attention == "flash" else contextlib.nullcontext()
    t_feats: dict[str, torch.Tensor] = {}
    s_feats: dict[str, torch.Tensor] = {}
    handles = _capture(teacher, [t for t, _ in feature_points], t_feats)
    handles += _capture(student, [s for _, s in feature_points], s_feats)
    blocks = block_lists(student)
    inside: list[set[int]] = [set() for _ in blocks]
    block_inputs: list[torch.Tensor] = []
    state = {"block": None}

    def pre(i):
        def hook(_m, args, kwargs):
            state["block"] = i
            block_inputs.extend(_tensors((args, kwargs)))
        return hook

    def post(_m, _i, _kw, _o):
        state["block"] = None

    try:
        with mode:
            with torch.no_grad():
                t_out = _pick(teacher(**call), None)
            handles += [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
            handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
            saved_in: dict[int, int | None] = {}
            with recording_saved() as saved:
                n = 0

                def note():
                    nonlocal n
                    for t in saved[n:]:
                        saved_in.setdefault(_storage_key(t), state["block"])
                    n = len(saved)

                for b in blocks:  # attribute each new saved tensor to the block running when it was saved
                    handles.append(b.register_forward_hook(lambda *_: note(), prepend=True))
                    handles.append(b.register_forward_pre_hook(lambda *_: note(), prepend=True))
                s_out = _pick(student(**call), None)
                note()
                loss = torch.nn.functional.mse_loss(s_out.float(), t_out.float())
                for t_name, s_name in feature_points:
                    loss = loss + torch.nn.functional.mse_loss(s_feats[s_name].float(), t_feats[t_name].float())
    finally:
        for h in handles:
            h.remove()
    params = [*student.parameters(), *student.buffers()]
    teacher_kept = [t_out, *t_feats.values()]
    out = {TEACHER_OUTPUTS: storage_bytes(teacher_kept), FEATURE_HOOKS_RECOMPUTE: 0}
    if not gradient_checkpointing:
        out[STUDENT_ACTIVATIONS] = storage_bytes(saved, exclude=[*params, *teacher_kept])
        return out
    for t in saved:
        key = _storage_key(t)
        if saved_in.get(key) is not None:
            inside[saved_in[key]].add(key)
    inner = set().union(*inside) if inside else set()
    kept = [t for t in saved if _storage_key(t) not in inner] + block_inputs + list(s_feats.values())
    by_key = {_storage_key(t): t for t in saved}
    recompute = max((storage_bytes([by_key[k] for k in keys], exclude=[*params, *block_inputs]) for keys in inside),
                    default=0)
    out[STUDENT_ACTIVATIONS] = storage_bytes(kept, exclude=[*params, *teacher_kept]) + recompute
    out[FEATURE_HOOKS_RECOMPUTE] = storage_bytes(s_feats.values(), exclude=params)
    return out


# ---------------------------------------------------------------- computed parts
def optimizer_bytes(param_sizes: Sequence[int], optimizer: str = "adamw") -> int:
    """Optimiser state bytes for trainable tensors of ``param_sizes`` elements: ``torch.optim.AdamW`` keeps
    ``exp_avg`` and ``exp_avg_sq`` in float32 and a 0-d float32 ``step`` per tensor; bitsandbytes' ``AdamW8bit``
    keeps two uint8 states with a float32 absmax per 256 values and a 256-entry float32 quantisation map per state
    for tensors of >= 4096 elements, and float32 states below that."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    if optimizer == "adamw":
        return sum(2 * 4 * n + 4 for n in param_sizes)
    total = 0
    for n in param_sizes:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK) + 4 * 256)
    return total


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _units(model: torch.nn.Module) -> tuple[int, int]:
    """(largest block's parameters, root unit's parameters: everything outside the blocks)."""
    blocks = block_lists(model)
    largest = max((_numel(b) for b in blocks), default=0)
    return largest, _numel(model) - sum(_numel(b) for b in blocks)


def _weights(model: torch.nn.Module, elsize: int) -> int:
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * elsize


@contextlib.contextmanager
def _quiet_diffusers() -> Any:
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def train_memory(teacher_config: dict[str, Any], student_config: dict[str, Any], resolution: int, text_tokens: int,
                 batch: int, shards: int = 1, optimizer: str = "adamw", mixed_precision: str = "bf16",
                 gradient_checkpointing: bool = False, feature_points: Sequence[tuple[str, str]] | None = None,
                 attention: str = "flash", shard_teacher: bool = True, ema: bool = False) -> dict[str, int]:
    """Bytes per GPU of one distillation step, by part (:data:`PARTS`) and ``total``.

    ``teacher_config`` / ``student_config``: transformer configs (``_class_name`` ``FluxTransformer2DModel`` or
    ``SD3Transformer2DModel``; the student's class is the teacher's when absent), built on the meta device.
    ``resolution`` px, ``text_tokens`` (Flux-dev 512, SD3 77 + 256), ``batch`` per GPU. ``shards``: processes the
    weights, gradients and optimiser states are sharded over (FSDP ``FULL_SHARD`` / ZeRO-3; 1 = one GPU or DDP).
    ``shard_teacher``: the frozen teacher is sharded too (False: replicated on every GPU). ``feature_points``: the
    derivation's ``layer_pairs`` ``(teacher, student)`` for feature KD, None for output KD only.
    ``ema``: an fp32 EMA of the student (``DistillConfig.ema``).
    ``attention``: ``"flash"`` (what fused kernels save) or ``"math"`` (the probabilities too). See the module doc
    for what is measured, what is computed, and what neither sees.
    """
    from bksdm.arch import dit

    if mixed_precision not in COMPUTE_DTYPES:
        raise ValueError(f"mixed_precision must be one of {tuple(COMPUTE_DTYPES)}, not {mixed_precision!r}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    dtype = COMPUTE_DTYPES[mixed_precision]
    el = torch.empty((), dtype=dtype).element_size()
    s_cfg = {"_class_name": teacher_config["_class_name"], **student_config}
    with _quiet_diffusers():  # its warning about casting with .to() concerns loading real weights
        teacher = dit.meta_model(teacher_config).to(dtype).eval().requires_grad_(False)
        student = dit.meta_model(s_cfg).to(dtype).train()
    call = {k: (v.to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v)
            for k, v in dit.dummy_inputs(teacher_config, resolution, text_tokens, batch).items()}
    measured = measure_step(teacher, student, call, list(feature_points or ()), attention, gradient_checkpointing)

    sizes = [p.numel() for p in student.parameters()]
    n_student = sum(sizes)
    t_div = shards if shard_teacher else 1
    parts = {
        TEACHER_WEIGHTS: math.ceil(_weights(teacher, el) / t_div),
        STUDENT_WEIGHTS: math.ceil(_weights(student, 4) / shards),
        STUDENT_GRADS: math.ceil(n_student * 4 / shards),
        OPTIMIZER_STATES: math.ceil(optimizer_bytes(sizes, optimizer) / shards),
        EMA_WEIGHTS: math.ceil(n_student * 4 / shards) if ema else 0,
        FSDP_UNSHARDED_UNITS: 0,
        AUTOCAST_WEIGHT_COPIES: 0,
        **measured,
    }
    if shards > 1:
        s_block, s_root = _units(student)
        t_block, t_root = _units(teacher) if shard_teacher else (0, 0)
        # current + prefetched block all-gathered in the compute dtype, the root unit (FSDP keeps it gathered
        # between forward and backward), one block's unsharded fp32 gradients before the reduce-scatter
        parts[FSDP_UNSHARDED_UNITS] = (2 * max(s_block, t_block) + max(s_root, t_root)) * el + s_block * 4
    elif dtype != torch.float32:  # with checkpointing only the recomputed block's copies outlive its forward
        parts[AUTOCAST_WEIGHT_COPIES] = (_units(student)[0] if gradient_checkpointing else n_student) * el
    parts[TOTAL] = sum(parts[k] for k in PARTS)
    return parts


def gib(n: int) -> float:
    """Bytes in GiB (2**30)."""
    return n / 2**30


def table(rows: Sequence[tuple[str, dict[str, int]]], unit: Callable[[int], float] = gib) -> str:
    """A markdown table, one column per labelled :func:`train_memory` result, GiB per GPU."""
    head = "| part (GiB per GPU) | " + " | ".join(label for label, _ in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for key in (*PARTS, TOTAL):
        cells = " | ".join(f"{unit(r[key]):.2f}" for _, r in rows)
        lines.append(f"| {'**total**' if key == TOTAL else key} | {cells} |")
    return "\n".join(lines)
