"""Spherical corrections: rewrite each optimizer step on the tracked groups into its spherical form.

Applied right after a real optimizer step (its post-hook), on the tracked groups only, per module:

- Adam, AdamW (THEORY.md §5–§6): **S** replaces each group's element-wise second moment by its group mean
  (AdamS: the mean of an EMA is the EMA of the mean, so torch's own ``exp_avg_sq`` keeps serving);
  **R** rescales the moments by r_k/r_{k+1} (second moment by its square) and **T** moves the momentum
  into the new tangent space. Modes ``"srt"`` (AdamSRT), ``"s"`` (AdamS), ``"rt"``.
- SGD with momentum: **R** and **T** on the momentum buffer (SGDMRT), modes ``"srt"`` and ``"rt"``.
- SGD without momentum, ``"srt"``: the exact AdamG rewrite of §4. The weights stay at unit norm and the
  norm SGD would have had lives on as a per-group *virtual radius* r̂; the trajectory of directions and
  the losses are plain SGD's.

The step already taken is undone from the optimizer's own quantities (x_k = x_{k+1} + η·step), so no
copy of the weights is kept; moment rescaling and transport act on the optimizer's state tensors in
place, so that its checkpoint carries them. Everything runs on the device with no host sync, in the fused
per-row kernels of :mod:`lightning_sphere.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.groups import InvariantGroups, ParamSlice
from lightning_sphere.kernels import Kernels
from lightning_sphere.schemes import adam_state

#: Correction modes; ``True`` means ``"srt"``.
MODES = ("srt", "s", "rt")
SUPPORTED = (
    "Adam and AdamW: 'srt' (True, AdamSRT), 's' (AdamS), 'rt'; SGD with momentum: 'srt' (True, SGDMRT), 'rt'; "
    "SGD without momentum: 'srt' (True, the AdamG rewrite)"
)


def correction_mode(value: bool | str | None) -> str | None:
    """The mode a ``spherical_correction`` argument asks for, ``None`` for none.

    Raises:
        ValueError: for anything but a bool, ``None`` or one of :data:`MODES`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "srt"
    if value in MODES:
        return value
    raise ValueError(f"spherical_correction must be True, False or one of {MODES}, got {value!r}")


def unsupported(optimizer: torch.optim.Optimizer, mode: str) -> str | None:
    """Why ``mode`` cannot rewrite ``optimizer``'s steps, or ``None`` if it can (every param group)."""
    kind, name = type(optimizer), type(optimizer).__name__
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return f"{name} has no spherical form here; supported: {SUPPORTED}"
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            return f"{name}(maximize=True) is not supported; supported: {SUPPORTED}"
        if kind is torch.optim.SGD:
            if group["nesterov"]:
                return f"SGD(nesterov=True) is not supported; supported: {SUPPORTED}"
            if group["momentum"] == 0 and mode != "srt":
                return f"mode {mode!r} has no meaning for SGD without momentum (no moment to rescale); use 'srt'"
            if group["momentum"] != 0 and mode == "s":
                return "mode 's' has no meaning for SGD with momentum (no second moment); use 'srt' or 'rt'"
        elif group["amsgrad"]:
            return f"{name}(amsgrad=True) is not supported; supported: {SUPPORTED}"
    return None


@dataclass
class StepView:
    """How the measurement of a corrected step must read it (THEORY.md §3 with the corrected update).

    Attributes:
        b: AdamS's per-group denominator √v̂_G + ε, replacing Adam's element-wise b.
        scale: per-group factors (σ_k, σ_{k+1}) mapping the stored weights to the virtual ones of the
            AdamG rewrite, x̃ = σ x (so ``norm`` and ``effective_lr`` report the virtual radius).
    """

    b: Tensor | None = None
    scale: tuple[Tensor, Tensor] | None = None


class ModuleCorrection:
    """The correction of one tracked module, stepped by one optimizer.

    Call :meth:`rewrite` after the optimizer step, then (optionally) measure the step through
    :attr:`view`, then :meth:`transport`.
    """

    def __init__(
        self,
        entry: InvariantGroups,
        optimizer: torch.optim.Optimizer,
        param_groups: tuple[dict[str, Any], ...],
        mode: str,
        kernels: Kernels,
    ) -> None:
        self.entry, self.optimizer, self.param_groups, self.mode = entry, optimizer, param_groups, mode
        self.kernels = kernels
        self.view = StepView()
        #: AdamG rewrite only: the virtual radius of each group, ``None`` before the first step.
        self.radius: Tensor | None = None
        self._sums: Tensor | None = None  # per-group sums of this step, from rewrite() for transport()

    @property
    def kind(self) -> str:
        if type(self.optimizer) is torch.optim.SGD:
            return "sgdm" if self.param_groups[0]["momentum"] else "adamg"
        return "adam"

    @property
    def label(self) -> str:
        """The algorithm the module now follows, for the summary."""
        if self.kind == "adam":
            return {"srt": "AdamSRT", "s": "AdamS", "rt": "Adam+RT"}[self.mode]
        return {"sgdm": "SGDMRT", "adamg": "AdamG (SGD rewrite)"}[self.kind]

    def check(self) -> str | None:
        """Why this module cannot be corrected, if its groups mix hyper-parameters the rewrite needs equal."""
        keys = ("betas", "eps") if self.kind == "adam" else ("momentum", "dampening")
        if self.kind == "adamg":
            keys = ("lr", "weight_decay")
        values = {tuple(repr(g.get(k)) for k in keys) for g in self.param_groups}
        if len(values) > 1:
            return f"{self.entry.module_name}: its parameters sit in param groups with different {', '.join(keys)}"
        return None

    # ------------------------------------------------------------------ the step

    def rewrite(self) -> None:
        """Turn the step just taken into the corrected one (S, AdamG), and take the per-group sums that
        :meth:`transport` needs."""
        with torch.no_grad():
            if self.kind == "adam":
                self._rewrite_adam()
            elif self.kind == "sgdm":
                self._sums = self.entry.row_sums(
                    [self.kernels.momentum_products(*self._rows(s, "momentum_buffer"), _scalar(g["lr"]))
                     for s, g in zip(self.entry.slices, self.param_groups, strict=True)]
                )  # fmt: skip
            else:
                self._rewrite_adamg()

    def transport(self) -> None:
        """R and T on the optimizer's moments, in place: the momentum follows the weights to u_{k+1}.

        (⟨x_k, x_{k+1}⟩ m − ⟨m, x_{k+1}⟩ x_k) / ‖x_{k+1}‖² = (r_k/r_{k+1}) Γ(m), Γ the transport to u_{k+1};
        Adam's second moment is rescaled by (r_k/r_{k+1})² (§6).
        """
        if self.kind == "adamg" or self.mode == "s":
            return
        with torch.no_grad():
            sums = self._sums
            n1 = sums[:, 0]
            alive = n1 > 0  # a zero x_{k+1} has no tangent space: leave its moments alone
            inv = torch.where(alive, 1 / n1, 0)
            cross, along = (sums[:, 2], sums[:, 3]) if self.kind == "adam" else (sums[:, 1], sums[:, 2])
            keep = self.entry.row_columns(torch.where(alive, cross * inv, 1))
            along = self.entry.row_columns(along * inv)
            if self.kind == "sgdm":
                for s, group, k, a in zip(self.entry.slices, self.param_groups, keep, along, strict=True):
                    x1, buf = self._rows(s, "momentum_buffer")
                    self.kernels.momentum_transport(x1, buf, _scalar(group["lr"]), k, a)
                    s.write_rows(self.optimizer.state[s.param]["momentum_buffer"], buf)
                return
            ratio = self.entry.row_columns(torch.where(alive, sums[:, 1] * inv, 1))
            for args, s, k, a, r in zip(self._adam_args(), self.entry.slices, keep, along, ratio, strict=True):
                self.kernels.adam_transport(*args, k, a, r)
                state = self.optimizer.state[s.param]
                s.write_rows(state["exp_avg"], args[1])
                s.write_rows(state["exp_avg_sq"], args[2])

    def _rows(self, s: ParamSlice, *state: str) -> list[Tensor]:
        """Row views of the parameter and of the named state tensors."""
        return [s.rows(s.param.detach()), *(s.rows(self.optimizer.state[s.param][name]) for name in state)]

    def _adam_args(self) -> list[tuple[Any, ...]]:
        """Per slice: x_{k+1}, m, v rows, AdamS's b (per row) and the scalars of the step torch took."""
        out = []
        b_rows = self.entry.row_columns(self.view.b) if self.view.b is not None else [None] * len(self.entry.slices)
        for s, group, b in zip(self.entry.slices, self.param_groups, b_rows, strict=True):
            x1, m, v = self._rows(s, "exp_avg", "exp_avg_sq")
            _, _, inv_bc1, inv_sqrt_bc2 = adam_state(self.optimizer.state[s.param], group)
            decay = 1 - group["lr"] * group["weight_decay"] if _decoupled(self.optimizer, group) else 1.0
            out.append(
                (x1, m, v, b, _scalar(group["lr"]), inv_bc1, inv_sqrt_bc2, _scalar(group["eps"]), _scalar(decay))
            )
        return out

    def _rewrite_adam(self) -> None:
        entry = self.entry
        if "s" in self.mode:  # AdamS: one denominator per group, from v_G, the group mean of v (§6)
            mean_v = entry.row_sums(
                [s.rows(self.optimizer.state[s.param]["exp_avg_sq"]).sum(1, keepdim=True)
                 * adam_state(self.optimizer.state[s.param], g)[3] ** 2
                 for s, g in zip(entry.slices, self.param_groups, strict=True)]
            )[:, 0] / entry.dim  # fmt: skip
            self.view.b = mean_v.sqrt() + self.param_groups[0]["eps"]
        args = self._adam_args()
        self._sums = entry.row_sums([self.kernels.adam_rewrite(*a) for a in args])
        for s, a in zip(entry.slices, args, strict=True):
            s.write_rows(s.param.detach(), a[0])

    def _rewrite_adamg(self) -> None:
        """§4: u_{k+1} = normalize((1−ηλ)u_k + Δ'⊥/r̂_k²), r̂²_{k+1} = (1−ηλ)² r̂_k² + ‖Δ'⊥‖²/r̂_k²."""
        entry, group = self.entry, self.param_groups[0]
        lr, decay = _scalar(group["lr"]), _scalar(1 - group["lr"] * group["weight_decay"])
        x1 = [s.rows(s.param.detach()) for s in entry.slices]
        if self.radius is None:  # the first step was plain SGD from x_0: from here on, unit norm
            radius = entry.row_sums([(r * r).sum(1, keepdim=True) for r in x1])[:, 0].sqrt()
            for s, r, c in zip(entry.slices, x1, entry.row_columns(torch.where(radius > 0, radius, 1)), strict=True):
                r.div_(c)
                s.write_rows(s.param.detach(), r)
            self.view.scale = (torch.ones_like(radius), radius)
            self.radius = radius
            return
        grads = [
            torch.zeros_like(r) if s.param.grad is None else s.rows(s.param.grad)
            for s, r in zip(entry.slices, x1, strict=True)
        ]
        uu, du = entry.row_sums(
            [self.kernels.adamg_products(r, g, lr, decay) for r, g in zip(x1, grads, strict=True)]
        ).unbind(1)
        r0 = self.radius
        radial, inv_r0_sq = entry.row_columns(du / uu), entry.row_columns(1 / r0.square())
        yy, tt = entry.row_sums(
            [self.kernels.adamg_direction(r, g, lr, decay, c, i, None)
             for r, g, c, i in zip(x1, grads, radial, inv_r0_sq, strict=True)]
        ).unbind(1)  # fmt: skip
        norm = entry.row_columns(yy.sqrt())
        for s, r, g, c, i, n in zip(entry.slices, x1, grads, radial, inv_r0_sq, norm, strict=True):
            self.kernels.adamg_direction(r, g, lr, decay, c, i, n)
            s.write_rows(s.param.detach(), r)
        r1 = ((1 - group["lr"] * group["weight_decay"]) ** 2 * r0.square() + tt / r0.square()).sqrt()
        self.view.scale = (r0, r1)
        self.radius = r1


def _scalar(value: Any) -> Tensor:
    """A hyper-parameter as a 0-dim float64 tensor (where it already is, if a tensor): one compiled graph
    serves every value, and no host sync is needed to use it."""
    return torch.as_tensor(value, dtype=torch.float64)


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
