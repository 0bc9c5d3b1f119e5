"""Transformer backbones (SD3 / SD3.5 MMDiT, FLUX.1): depth-removal specs and everything derived from them.

A transformer student keeps some blocks of each block list of its teacher, in order:

* ``SD3Transformer2DModel``: ``transformer_blocks`` (joint blocks; ``num_layers``);
* ``FluxTransformer2DModel``: ``transformer_blocks`` (double-stream, ``num_layers``) and
  ``single_transformer_blocks`` (``num_single_layers``).

Spec file form (YAML or JSON); a list left out keeps all of its blocks::

    name: flux-half
    keep:
      transformer_blocks: [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18]
      single_transformer_blocks: [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 37]

From one spec :func:`derive` gives the student's diffusers config (block counts; SD3.5's ``dual_attention_layers``
renumbered), the module map (student ``L.{j}`` <- teacher ``L.{keep[j]}``, every other top-level module to
itself), the asserted tensor key map (:func:`bksdm.arch.derive.map_keys`) and the feature-KD pairs: segment ends,
each picking the image stream (item 1) of the block's ``(encoder_hidden_states, hidden_states)`` output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from bksdm.arch.derive import Derivation, feature_point, map_keys
from bksdm.errors import UserError

BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
}
"""The block lists of each supported transformer class, in forward order."""
DEPTH_KEYS = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
"""The config key holding each list's length."""
_DEFAULT_DEPTH = {("SD3Transformer2DModel", "num_layers"): 18, ("FluxTransformer2DModel", "num_layers"): 19,
                  ("FluxTransformer2DModel", "num_single_layers"): 38}  # diffusers' constructor defaults
IMAGE_ITEM = 1
"""Blocks of both classes return ``(encoder_hidden_states, hidden_states)``: the image stream is item 1 (SD3's last
block returns ``(None, hidden_states)``)."""


def is_transformer(config: dict[str, Any]) -> bool:
    """Whether ``config`` (a denoiser's ``config.json``) is a transformer this module supports."""
    return config.get("_class_name") in BLOCK_LISTS


def block_counts(config: dict[str, Any]) -> dict[str, int]:
    """Blocks per list of a transformer config, e.g. ``{"transformer_blocks": 19, "single_transformer_blocks": 38}``."""
    cls = config.get("_class_name")
    if cls not in BLOCK_LISTS:
        raise UserError(f"{cls or 'this model'} is not a supported transformer ({', '.join(BLOCK_LISTS)})")
    return {name: int(config.get(DEPTH_KEYS[name], _DEFAULT_DEPTH[(cls, DEPTH_KEYS[name])])) for name in BLOCK_LISTS[cls]}


@dataclass(frozen=True)
class DiTSpec:
    """Which blocks of each block list a transformer student keeps (teacher indices, increasing); a list absent
    from ``keep`` keeps all of its blocks."""

    name: str
    keep: tuple[tuple[str, tuple[int, ...]], ...]  # ((list name, kept indices), ...): hashable, ordered

    def kept(self, config: dict[str, Any]) -> dict[str, list[int]]:
        """Kept indices of every block list of ``config`` (checked: :func:`check_spec`)."""
        return check_spec(self, config)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "keep": {name: list(idx) for name, idx in self.keep}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "DiTSpec":
        """Parse a spec mapping (``name``, ``keep``); indices are checked against a teacher by :func:`check_spec`."""
        if not isinstance(data, dict) or set(data) - {"name", "keep"} or "keep" not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{source}: a transformer spec has keys name and keep (found {keys})")
        keep = data["keep"]
        if not isinstance(keep, dict) or not keep:
            raise UserError(f"{source}: 'keep' must map block-list names to lists of kept block indices")
        out = []
        for name, idx in keep.items():
            if not isinstance(idx, list) or not idx or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise UserError(f"{source}: keep {name} = {idx!r}; write a non-empty list of block indices")
            out.append((str(name), tuple(idx)))
        return cls(str(data.get("name", source)), tuple(out))


def check_teacher(config: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``config`` is an SD3 / SD3.5 or FLUX.1 transformer config."""
    block_counts(config)


def check_spec(spec: DiTSpec, config: dict[str, Any]) -> dict[str, list[int]]:
    """The kept indices per block list of ``spec`` on teacher ``config``; a one-line :class:`UserError` for an
    unknown list, indices out of range or not strictly increasing, and (SD3) a last block that is not the
    teacher's last."""
    counts = block_counts(config)
    where = f"spec {spec.name!r}"
    given = dict(spec.keep)
    if unknown := [n for n in given if n not in counts]:
        raise UserError(f"{where}: unknown block list {unknown[0]!r}; a {config['_class_name']} has "
                        f"{', '.join(counts)}")
    kept = {}
    for name, n in counts.items():
        idx = list(given.get(name, range(n)))
        if not idx:
            raise UserError(f"{where}: keep {name} is empty; keep at least one block")
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise UserError(f"{where}: keep {name} = {idx}; list each kept block once, in increasing order")
        if idx[0] < 0 or idx[-1] >= n:
            raise UserError(f"{where}: keep {name} names block {idx[-1] if idx[-1] >= n else idx[0]} but the "
                            f"teacher's {name} are 0..{n - 1}")
        kept[name] = idx
    last = counts["transformer_blocks"] - 1
    if config["_class_name"] == "SD3Transformer2DModel" and kept["transformer_blocks"][-1] != last:
        raise UserError(f"{where}: an SD3 student's last block must be the teacher's last block {last}: diffusers "
                        f"builds the last joint block without a text-stream output (context_pre_only), so no other "
                        f"block has its shapes; end keep transformer_blocks with {last}")
    return kept


def student_config(config: dict[str, Any], kept: dict[str, list[int]]) -> dict[str, Any]:
    """The student's config: block counts from ``kept``; SD3.5's ``dual_attention_layers`` renumbered (student block
    j is dual iff its teacher block was)."""
    out = {k: copy.deepcopy(v) for k, v in config.items() if not k.startswith("_")}
    for name, idx in kept.items():
        out[DEPTH_KEYS[name]] = len(idx)
    if config.get("dual_attention_layers"):
        dual = set(config["dual_attention_layers"])
        out["dual_attention_layers"] = [j for j, k in enumerate(kept["transformer_blocks"]) if k in dual]
    return out


def meta_model(config: dict[str, Any]) -> torch.nn.Module:
    """The transformer of ``config`` on the meta device (shapes, names and MACs without memory)."""
    import diffusers

    from bksdm.errors import short

    check_teacher(config)
    cls = getattr(diffusers, config["_class_name"])
    try:
        with torch.device("meta"):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as exc:
        raise UserError(f"diffusers cannot build a {config['_class_name']} from this config ({short(exc)})") from None


_CACHE: dict[str, tuple[dict[str, torch.Size], int]] = {}


def _shapes_and_params(config: dict[str, Any]) -> tuple[dict[str, torch.Size], int]:
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _CACHE:
        if len(_CACHE) > 32:
            _CACHE.clear()
        model = meta_model(config)
        _CACHE[key] = ({k: v.shape for k, v in model.state_dict().items()}, sum(p.numel() for p in model.parameters()))
    return _CACHE[key]


def tensor_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    """State-dict key -> shape (persistent buffers included, e.g. SD3's ``pos_embed.pos_embed``), on meta."""
    return _shapes_and_params(config)[0]


def param_count(config: dict[str, Any]) -> int:
    """Parameters (buffers excluded) of the transformer of ``config``, counted on the meta device."""
    return _shapes_and_params(config)[1]


def _block_suffixes(shapes: dict[str, torch.Size], block: str) -> set[str]:
    head = block + "."
    return {k[len(head):] for k in shapes if k.startswith(head)}


def derive(teacher_config: dict[str, Any], spec: DiTSpec, with_keys: bool = True) -> Derivation:
    """The student of ``spec`` for a transformer ``teacher_config``: config, module map, feature pairs and (with
    ``with_keys``) the key map, asserted: every student tensor from exactly one teacher tensor of identical shape,
    none used twice, every key under a block list covered by a block entry, each student block with its source
    block's key names, and the unused teacher tensors exactly the removed blocks'."""
    kept = check_spec(spec, teacher_config)
    counts = block_counts(teacher_config)
    s_cfg = student_config(teacher_config, kept)
    t_cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_") or k == "_class_name"}
    t_shapes = tensor_shapes(t_cfg)
    s_shapes = tensor_shapes({**s_cfg, "_class_name": teacher_config["_class_name"]})
    modules = [(f"{name}.{j}", f"{name}.{k}") for name, idx in kept.items() for j, k in enumerate(idx)]
    others = sorted({key.split(".")[0] for key in t_shapes} - set(counts))
    modules += [(m, m) for m in others]
    pairs = []
    for name, idx in kept.items():
        for j in range(len(idx)):
            last = idx[j + 1] - 1 if j + 1 < len(idx) else counts[name] - 1  # the last teacher block j stands in for
            pairs.append((feature_point(f"{name}.{last}", IMAGE_ITEM), feature_point(f"{name}.{j}", IMAGE_ITEM)))
    der = Derivation(spec, copy.deepcopy(teacher_config), s_cfg, modules, pairs)  # type: ignore[arg-type]
    if with_keys:
        for student, teacher in modules[: sum(len(i) for i in kept.values())]:
            s_names, t_names = _block_suffixes(s_shapes, student), _block_suffixes(t_shapes, teacher)
            if s_names != t_names:
                diff = sorted(s_names ^ t_names)[0]
                raise AssertionError(f"student block {student} and its source {teacher} differ in tensor {diff} "
                                     f"(a config the spec did not derive, e.g. dual_attention_layers)")
        der.key_map, der.unused_teacher_keys = map_keys(modules, s_shapes, t_shapes, roots=tuple(counts))
        removed = {f"{n}.{i}." for n, c in counts.items() for i in range(c) if i not in kept[n]}
        expected = sorted(k for k in t_shapes if any(k.startswith(r) for r in removed))
        if der.unused_teacher_keys != expected:
            extra = sorted(set(der.unused_teacher_keys) ^ set(expected))[:3]
            raise AssertionError(f"unused teacher tensors are not exactly the removed blocks' ({extra})")
    return der


def removable_blocks(config: dict[str, Any]) -> list[tuple[str, int]]:
    """(list, index) of every block a student may drop alone (SD3: all but the last joint block), forward order."""
    counts = block_counts(config)
    out = [(name, i) for name, n in counts.items() for i in range(n)]
    if config["_class_name"] == "SD3Transformer2DModel":
        out.remove(("transformer_blocks", counts["transformer_blocks"] - 1))
    return out


def spec_without(config: dict[str, Any], name: str, index: int, spec_name: str | None = None) -> DiTSpec:
    """The spec keeping every block of ``config`` except block ``index`` of list ``name``."""
    keep = tuple((n, tuple(i for i in range(c) if (n, i) != (name, index))) for n, c in block_counts(config).items())
    return DiTSpec(spec_name or f"without-{name}.{index}", keep)


class PassThrough(torch.nn.Module):
    """A block that computes nothing: returns its inputs in a block's output order, ``(encoder_hidden_states,
    hidden_states)`` (keyword or positional calls, as diffusers makes under gradient checkpointing)."""

    def forward(self, hidden_states=None, encoder_hidden_states=None, *args, **kwargs):
        return encoder_hidden_states, hidden_states


@contextlib.contextmanager
def bypass(model: torch.nn.Module, name: str, index: int) -> Iterator[None]:
    """Run ``model`` with block ``index`` of list ``name`` replaced by :class:`PassThrough`; restored on exit."""
    blocks = getattr(model, name)
    original = blocks[index]
    blocks[index] = PassThrough()
    try:
        yield
    finally:
        blocks[index] = original


# ---------------------------------------------------------------- built-in specs
def _middle(n: int) -> range:
    """The middle third of ``n`` blocks, never the first or the last block."""
    return range(max(1, n // 3), min(n - 1, math.ceil(2 * n / 3)))


def _every_second(r: range) -> set[int]:
    """The second, fourth, ... block of a range (its first stays)."""
    return {i for i in r if (i - r.start) % 2 == 1}


def bk_keep(n: int, rule: str) -> list[int]:
    """Kept blocks of one list of ``n`` under a BK-style rule; the first and last block always stay.

    ``bk-base``: drop every second block of the middle third. ``bk-small``: drop the middle third. ``bk-tiny``:
    drop the middle third and every second block of the two outer thirds (without the first and last block).
    """
    mid = _middle(n)
    drop = _every_second(mid) if rule == "bk-base" else set(mid)
    if rule == "bk-tiny":
        drop |= _every_second(range(1, mid.start)) | _every_second(range(mid.stop, n - 1))
    return [i for i in range(n) if i not in drop]


FLUX_MINI = {"transformer_blocks": (0, 1, 2, 10, 18), "single_transformer_blocks": (3, 7, 11, 15, 19, 23, 27, 31, 35, 37)}
"""Flux-Mini (TencentARC, FLUX.1-dev 19 + 38 -> 5 + 10 blocks, 3,179,199,552 parameters): the teacher blocks its
student starts from, as listed by ``distill_slim_double`` / ``distill_slim_single`` in the public training config
``flux-mini/train_configs/distill.yaml`` of github.com/TencentARC/FluxKits (read by its ``pick_up_weights``)."""


def builtin_specs(config: dict[str, Any]) -> dict[str, DiTSpec]:
    """Built-in specs of a transformer teacher, computed from its block counts: ``bk-base``, ``bk-small``,
    ``bk-tiny`` (:func:`bk_keep` on every list; they keep SD3's last block), and ``flux-mini`` for a FLUX.1 teacher
    of 19 double and 38 single blocks."""
    counts = block_counts(config)
    out = {rule: DiTSpec(rule, tuple((name, tuple(bk_keep(n, rule))) for name, n in counts.items()))
           for rule in ("bk-base", "bk-small", "bk-tiny")}
    if counts == {"transformer_blocks": 19, "single_transformer_blocks": 38}:
        out["flux-mini"] = DiTSpec("flux-mini", tuple(FLUX_MINI.items()))
    return out


TRANSFORMER_ONLY_SPECS = ("flux-mini",)
"""Built-in names that exist for transformer teachers only (``bk-*`` exist for both kinds)."""


def derive_backbone(teacher_config: dict[str, Any], spec: Any, with_keys: bool = True) -> Derivation:
    """:func:`derive` for a transformer teacher, :func:`bksdm.arch.derive.derive` for a U-Net; a spec of the other
    kind is a one-line :class:`UserError`."""
    from bksdm.arch.derive import derive as derive_unet

    if is_transformer(teacher_config):
        if not isinstance(spec, DiTSpec):
            raise UserError(f"spec {spec.name!r} is a U-Net spec; the teacher is a {teacher_config['_class_name']}")
        return derive(teacher_config, spec, with_keys)
    if isinstance(spec, DiTSpec):
        raise UserError(f"spec {spec.name!r} is a transformer spec; the teacher is a U-Net")
    return derive_unet(teacher_config, spec, with_keys)


# ---------------------------------------------------------------- calls
def dummy_inputs(config: dict[str, Any], resolution: int, text_tokens: int, batch: int = 1, device: Any = "meta",
                 vae_factor: int = 8, latent_channels: int = 16) -> dict[str, torch.Tensor]:
    """Keyword inputs of one transformer call at ``resolution`` px (zeros; for MAC counts on meta and shape tests).

    SD3: ``hidden_states`` (B, C, h, w) latents, ``encoder_hidden_states`` (B, T, joint_attention_dim),
    ``pooled_projections`` (B, pooled_projection_dim), ``timestep`` (B,) in 0-1000. FLUX: latents packed 2x2 into
    (B, hw/4, in_channels), ``img_ids`` (hw/4, 3), ``txt_ids`` (T, 3), ``timestep`` (B,) in 0-1, and ``guidance``
    (B,) when the config embeds it. h = w = resolution / ``vae_factor``.
    """
    side = resolution // vae_factor
    with torch.device(device):
        common = {"encoder_hidden_states": torch.zeros(batch, text_tokens, config["joint_attention_dim"]),
                  "pooled_projections": torch.zeros(batch, config["pooled_projection_dim"])}
        if config["_class_name"] == "SD3Transformer2DModel":
            return {"hidden_states": torch.zeros(batch, config.get("in_channels", latent_channels), side, side),
                    "timestep": torch.full((batch,), 500.0), **common}
        tokens = (side // 2) ** 2
        out = {"hidden_states": torch.zeros(batch, tokens, config.get("in_channels", 64)), "timestep": torch.full((batch,), 0.5),
               "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text_tokens, 3), **common}
        if config.get("guidance_embeds"):
            out["guidance"] = torch.full((batch,), 3.5)
        return out
