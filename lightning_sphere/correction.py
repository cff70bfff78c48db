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
place, so that its checkpoint carries them. Everything runs on the device with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.groups import InvariantGroups

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
    ) -> None:
        self.entry, self.optimizer, self.param_groups, self.mode = entry, optimizer, param_groups, mode
        self.view = StepView()
        #: AdamG rewrite only: the virtual radius of each group, ``None`` before the first step.
        self.radius: Tensor | None = None
        self._previous: list[Tensor] = []  # x_k, rebuilt by rewrite() for transport()

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
        """Turn the step just taken into the corrected one (S, AdamG); note x_k for :meth:`transport`."""
        with torch.no_grad():
            if self.kind == "adam":
                self._rewrite_adam()
            elif self.kind == "sgdm":
                self._previous = [
                    s.param + g["lr"] * self.optimizer.state[s.param]["momentum_buffer"]
                    for s, g in zip(self.entry.slices, self.param_groups, strict=True)
                ]
            else:
                self._rewrite_adamg()

    def transport(self) -> None:
        """R and T on the optimizer's moments, in place: the momentum follows the weights to u_{k+1}."""
        if self.kind == "adamg" or self.mode == "s":
            return
        with torch.no_grad():
            entry, state = self.entry, self.optimizer.state
            x0, x1 = self._previous, [s.param for s in entry.slices]
            momentum = [state[p]["exp_avg" if self.kind == "adam" else "momentum_buffer"] for p in x1]
            n1 = entry.group_sums([p * p for p in x1])
            alive = n1 > 0  # a zero x_{k+1} has no tangent space: leave its moments alone
            inv = torch.where(alive, 1 / n1, 0)
            keep = entry.expand(
                torch.where(alive, entry.group_sums([a * b for a, b in zip(x0, x1, strict=True)]) * inv, 1)
            )
            along = entry.expand(entry.group_sums([m * p for m, p in zip(momentum, x1, strict=True)]) * inv)
            # (⟨p, p'⟩ m − ⟨m, p'⟩ p) / ‖p'‖² = (r_k/r_{k+1}) Γ(m), Γ the transport to u_{k+1} (§6)
            for m, c, a, p in zip(momentum, keep, along, x0, strict=True):
                m.mul_(c).sub_(a * p)
            if self.kind == "adam":
                n0 = entry.group_sums([p * p for p in x0])
                ratio = entry.expand(torch.where(alive, n0 * inv, 1))
                for p, r in zip(x1, ratio, strict=True):
                    state[p]["exp_avg_sq"].mul_(r)  # (r_k / r_{k+1})²
        self._previous = []

    def _rewrite_adam(self) -> None:
        entry, state = self.entry, self.optimizer.state
        beta1, beta2 = self.param_groups[0]["betas"]
        eps = self.param_groups[0]["eps"]
        previous, v_hat = [], []
        for s in entry.slices:
            st = state[s.param]
            t = torch.as_tensor(st["step"], dtype=torch.float64)
            v_hat.append(st["exp_avg_sq"] / (1 - beta2**t).to(st["exp_avg_sq"].dtype))
        if "s" in self.mode:
            mean_v = entry.group_sums(v_hat) / entry.dim  # AdamS: v_G, the group mean of v (§6)
            self.view.b = mean_v.sqrt() + eps
            b_group = entry.expand(self.view.b)
        for i, (s, group) in enumerate(zip(entry.slices, self.param_groups, strict=True)):
            st = state[s.param]
            t = torch.as_tensor(st["step"], dtype=torch.float64)
            m_hat = st["exp_avg"] / (1 - beta1**t).to(st["exp_avg"].dtype)
            taken = group["lr"] * m_hat / (v_hat[i].sqrt() + eps)  # the step torch took, less decoupled decay
            step = taken
            if "s" in self.mode:
                step = group["lr"] * m_hat / b_group[i]
                s.param.add_(taken - step)
            decay = 1 - group["lr"] * group["weight_decay"] if _decoupled(self.optimizer, group) else 1.0
            previous.append((s.param + step) / decay)
        self._previous = previous

    def _rewrite_adamg(self) -> None:
        """§4: u_{k+1} = normalize((1−ηλ)u_k + Δ'⊥/r̂_k²), r̂²_{k+1} = (1−ηλ)² r̂_k² + ‖Δ'⊥‖²/r̂_k²."""
        entry, group = self.entry, self.param_groups[0]
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        x1 = [s.param for s in entry.slices]
        if self.radius is None:  # the first step was plain SGD from x_0: from here on, unit norm
            radius = entry.group_sums([p * p for p in x1]).sqrt()
            for p, r in zip(x1, entry.expand(torch.where(radius > 0, radius, 1)), strict=True):
                p.div_(r)
            self.view.scale = (torch.ones_like(radius), radius)
            self.radius = radius
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in x1]
        u0 = [(p + lr * g) / decay for p, g in zip(x1, grads, strict=True)]
        delta = [p - u for p, u in zip(x1, u0, strict=True)]
        uu = entry.group_sums([u * u for u in u0])
        radial = entry.expand(entry.group_sums([d * u for d, u in zip(delta, u0, strict=True)]) / uu)
        tangent = [d - c * u for d, c, u in zip(delta, radial, u0, strict=True)]
        r0 = self.radius
        scale = entry.expand(1 / r0.square())
        y = [decay * u + t * c for u, t, c in zip(u0, tangent, scale, strict=True)]
        norm = entry.expand(entry.group_sums([v * v for v in y]).sqrt())
        for p, v, n in zip(x1, y, norm, strict=True):
            p.copy_(v / n)
        r1 = (decay**2 * r0.square() + entry.group_sums([t * t for t in tangent]) / r0.square()).sqrt()
        self.view.scale = (r0, r1)
        self.radius = r1


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
