"""Feature capture by module name, independent of whatever wraps the model (DDP, accelerate, torch.compile).

Hooks are registered on the *unwrapped* module's submodules, so the names are the bare diffusers names from the
derivation (``down_blocks.2.attentions.0.proj_out``) whatever the wrapper adds (``module.``, ``_orig_mod.``).
The public code keyed name prefixes on GPU count and broke under DDP; this cannot.

A name may carry a tuple pick (:func:`bksdm.arch.derive.feature_point`): ``transformer_blocks.3#1`` captures item 1
of that block's output, the image stream of an MMDiT block's ``(encoder_hidden_states, hidden_states)``. A bare
name keeps the first item of a tuple (U-Net blocks, whose first item is the hidden state).
"""

from __future__ import annotations

import torch

from bksdm.arch.derive import split_feature_point
from bksdm.errors import UserError
from bksdm.training import unwrap


class FeatureHooks:
    """Keeps the latest output of each named submodule: a tuple output contributes its first element, or the item
    a ``module#item`` name picks."""

    def __init__(self, model: torch.nn.Module, names: list[str], role: str = "model"):
        modules = dict(unwrap(model).named_modules())
        parsed = [split_feature_point(n) for n in names]
        missing = [n for n, (m, _) in zip(names, parsed) if m not in modules]
        if missing:
            raise UserError(f"{role} has no module(s) {missing}; its layer pairs do not match this model")
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[m].register_forward_hook(self._hook(n, item)) for n, (m, item) in zip(names, parsed)]
        self.names = list(names)

    def _hook(self, name: str, item: int | None = None):
        def hook(_module, _inputs, output):
            if item is not None:
                picked = output[item] if isinstance(output, (tuple, list)) and len(output) > item else None
                if picked is None:
                    raise RuntimeError(f"feature point {name}: the module's output has no tensor at item {item}")
                output = picked
            elif isinstance(output, (tuple, list)):
                output = output[0]
            elif hasattr(output, "sample"):
                output = output.sample
            self.features[name] = output

        return hook

    def pop(self) -> list[torch.Tensor]:
        """The captured features in ``names`` order, clearing them for the next forward."""
        try:
            out = [self.features[n] for n in self.names]
        except KeyError as exc:
            raise RuntimeError(f"module {exc} did not run in the last forward") from None
        self.features.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
