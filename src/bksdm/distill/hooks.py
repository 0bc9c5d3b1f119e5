"""Feature capture by module name, independent of whatever wraps the model (DDP, accelerate, torch.compile).

Hooks are registered on the *unwrapped* module's submodules, so the names are the bare diffusers names from the
derivation (``down_blocks.2.attentions.0.proj_out``) whatever the wrapper adds (``module.``, ``_orig_mod.``).
The public code keyed name prefixes on GPU count and broke under DDP; this cannot.
"""

from __future__ import annotations

import torch

from bksdm.errors import UserError
from bksdm.training import unwrap


class FeatureHooks:
    """Keeps the latest output of each named submodule; a tuple output contributes its first element."""

    def __init__(self, model: torch.nn.Module, names: list[str], role: str = "model"):
        modules = dict(unwrap(model).named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"{role} has no module(s) {missing}; its layer pairs do not match this model")
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]
        self.names = list(names)

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
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
