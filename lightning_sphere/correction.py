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

from dataclasses import dataclass, field
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


@dataclass(eq=False)
class Member:
    """A tracked module inside a :class:`Rewrite`; its groups are ``groups`` among the rewrite's."""

    entry: InvariantGroups
    param_groups: tuple[dict[str, Any], ...]
    groups: slice
    view: StepView = field(default_factory=StepView)


class Rewrite:
    """One kind of correction, applied after each step of one optimizer to all the modules it fits.

    ``kind`` is ``"adam"`` (S, R, T on Adam/AdamW), ``"sgdm"`` (R, T on SGD's momentum buffer) or
    ``"adamg"`` (SGD without momentum as AdamG). The per-row kernels run once per parameter; everything per
    group (means, inner products, coefficients) runs once for all the groups together, so a step costs a
    few kernels per parameter and a handful overall, whatever the number of modules.

    Call :meth:`rewrite` after the optimizer step, then measure the step if wanted (each member's
    :attr:`Member.view` says how), then :meth:`transport`.
    """

    def __init__(
        self,
        kind: str,
        modules: list[tuple[InvariantGroups, tuple[dict[str, Any], ...]]],
        optimizer: torch.optim.Optimizer,
        mode: str,
        kernels: Kernels,
        device: torch.device,
    ) -> None:
        self.kind, self.optimizer, self.mode, self.kernels = kind, optimizer, mode, kernels
        self.members, offset = [], 0
        for entry, param_groups in modules:
            self.members.append(Member(entry, param_groups, slice(offset, offset + entry.num_groups)))
            offset += entry.num_groups
        self.slices = [
            (s, group) for m in self.members for s, group in zip(m.entry.slices, m.param_groups, strict=True)
        ]
        row_group = [
            (torch.arange(m.entry.num_groups) + m.groups.start).repeat_interleave(s.num_channels // m.entry.num_groups)
            for m in self.members
            for s in m.entry.slices
        ]
        self._row_group = torch.cat(row_group).to(device)  # the group of every row of every slice
        self._sizes = [s.num_channels for s, _ in self.slices]
        self._dim = torch.cat([torch.full((m.entry.num_groups,), float(m.entry.dim)) for m in self.members]).to(device)
        self.num_groups = offset
        #: AdamG rewrite: each group's virtual radius; NaN where not known yet (set on the first step).
        self.radius = torch.full((offset,), float("nan"), dtype=torch.float64, device=device)
        self._fresh = True  # a step with unknown radii must still set them
        self._sums: Tensor | None = None

    @property
    def label(self) -> str:
        """The algorithm the modules now follow, for the summary."""
        if self.kind == "adam":
            return {"srt": "AdamSRT", "s": "AdamS", "rt": "Adam+RT"}[self.mode]
        return {"sgdm": "SGDMRT", "adamg": "AdamG (SGD rewrite)"}[self.kind]

    @staticmethod
    def check(kind: str, entry: InvariantGroups, param_groups: tuple[dict[str, Any], ...]) -> str | None:
        """Why a module cannot be corrected, if its groups mix hyper-parameters the rewrite needs equal."""
        keys = {"adam": ("betas", "eps"), "sgdm": ("momentum", "dampening"), "adamg": ("lr", "weight_decay")}[kind]
        if len({tuple(repr(g.get(k)) for k in keys) for g in param_groups}) > 1:
            return f"{entry.module_name}: its parameters sit in param groups with different {', '.join(keys)}"
        return None

    # ------------------------------------------------------------------ per-group arithmetic, batched

    def _group_sums(self, per_row: list[Tensor]) -> Tensor:
        """Per-group sums ``(M, k)`` of the per-row sums ``(C, k)`` of every slice."""
        rows = torch.cat(per_row)
        return rows.new_zeros(self.num_groups, rows.shape[1]).index_add_(0, self._row_group, rows)

    def _per_row(self, per_group: Tensor) -> list[Tensor]:
        """A per-group vector ``(M,)`` as one column ``(C, 1)`` per slice."""
        return list(per_group[self._row_group][:, None].split(self._sizes))

    def _rows(self, s: ParamSlice, *state: str) -> list[Tensor]:
        """Row views of a parameter and of its named state tensors."""
        return [s.rows(s.param.detach()), *(s.rows(self.optimizer.state[s.param][name]) for name in state)]

    # ------------------------------------------------------------------ the step

    def rewrite(self) -> None:
        """Turn the step just taken into the corrected one (S, AdamG), and take the per-group sums that
        :meth:`transport` needs."""
        with torch.no_grad():
            if self.kind == "adam":
                self._rewrite_adam()
            elif self.kind == "sgdm":
                self._sums = self._group_sums(
                    [self.kernels.momentum_products(*self._rows(s, "momentum_buffer"), _scalar(g["lr"]))
                     for s, g in self.slices]
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
            keep, along = self._per_row(torch.where(alive, cross * inv, 1)), self._per_row(along * inv)
            if self.kind == "sgdm":
                for (s, group), k, a in zip(self.slices, keep, along, strict=True):
                    x1, buf = self._rows(s, "momentum_buffer")
                    self.kernels.momentum_transport(x1, buf, _scalar(group["lr"]), k, a)
                    s.write_rows(self.optimizer.state[s.param]["momentum_buffer"], buf)
                return
            ratio = self._per_row(torch.where(alive, sums[:, 1] * inv, 1))
            for args, (s, _), k, a, r in zip(self._adam_args(), self.slices, keep, along, ratio, strict=True):
                self.kernels.adam_transport(*args, k, a, r)
                state = self.optimizer.state[s.param]
                s.write_rows(state["exp_avg"], args[1])
                s.write_rows(state["exp_avg_sq"], args[2])

    def _adam_args(self) -> list[tuple[Any, ...]]:
        """Per slice: x_{k+1}, m, v rows, AdamS's b per row, and the scalars of the step torch took."""
        roots = self._per_row(self._root) if "s" in self.mode else [None] * len(self.slices)
        out = []
        for (s, group), root in zip(self.slices, roots, strict=True):
            b = None if root is None else root + group["eps"]
            x1, m, v = self._rows(s, "exp_avg", "exp_avg_sq")
            _, _, inv_bc1, inv_sqrt_bc2 = adam_state(self.optimizer.state[s.param], group)
            decay = 1 - group["lr"] * group["weight_decay"] if _decoupled(self.optimizer, group) else 1.0
            out.append(
                (x1, m, v, b, _scalar(group["lr"]), inv_bc1, inv_sqrt_bc2, _scalar(group["eps"]), _scalar(decay))
            )
        return out

    def _rewrite_adam(self) -> None:
        if "s" in self.mode:  # AdamS: one denominator per group, from v_G, the group mean of v (§6)
            mean_v = self._group_sums(
                [s.rows(self.optimizer.state[s.param]["exp_avg_sq"]).sum(1, keepdim=True)
                 * adam_state(self.optimizer.state[s.param], group)[3].square()
                 for s, group in self.slices]
            )[:, 0] / self._dim  # fmt: skip
            self._root = mean_v.sqrt()  # b_G = √v̂_G + ε, ε the module's own
            for m in self.members:
                m.view.b = self._root[m.groups] + m.param_groups[0]["eps"]
        args = self._adam_args()
        self._sums = self._group_sums([self.kernels.adam_rewrite(*a) for a in args])
        for (s, _), a in zip(self.slices, args, strict=True):
            s.write_rows(s.param.detach(), a[0])

    def _rewrite_adamg(self) -> None:
        """§4: u_{k+1} = normalize((1−ηλ)u_k + Δ'⊥/r̂_k²), r̂²_{k+1} = (1−ηλ)² r̂_k² + ‖Δ'⊥‖²/r̂_k².

        On the first step (radius unknown), which plain SGD took from x_0: r̂ = ‖x_1‖ and u_1 = x_1/‖x_1‖.
        """
        per_slice = []
        for s, group in self.slices:
            x1 = s.rows(s.param.detach())
            g = torch.zeros_like(x1) if s.param.grad is None else s.rows(s.param.grad)
            per_slice.append((x1, g, _scalar(group["lr"]), _scalar(1 - group["lr"] * group["weight_decay"])))
        xx, uu, du = self._group_sums([self.kernels.adamg_products(*a) for a in per_slice]).unbind(1)
        r0, fresh = self.radius, self.radius.isnan()
        fresh_rows = self._per_row(fresh) if self._fresh else [None] * len(per_slice)
        columns = zip(self._per_row(du / uu), self._per_row(1 / r0.square()), fresh_rows, strict=True)
        per_slice = [(*a, *c) for a, c in zip(per_slice, columns, strict=True)]
        yy, tt = self._group_sums([self.kernels.adamg_direction(*a, None) for a in per_slice]).unbind(1)
        for (s, _), a, norm in zip(self.slices, per_slice, self._per_row(yy.sqrt()), strict=True):
            self.kernels.adamg_direction(*a, norm)
            s.write_rows(s.param.detach(), a[0])
        r1 = (self._decay().square() * r0.square() + tt / r0.square()).sqrt()
        r1 = torch.where(fresh, xx.sqrt(), r1) if self._fresh else r1
        scale0 = torch.where(fresh, 1.0, r0) if self._fresh else r0
        for m in self.members:
            m.view.scale = (scale0[m.groups], r1[m.groups])
        self.radius, self._fresh = r1, False

    def _decay(self) -> Tensor:
        """1 − ηλ of every group, on the device; copied there again only when a learning rate changed."""
        values = tuple(1 - m.param_groups[0]["lr"] * m.param_groups[0]["weight_decay"] for m in self.members)
        if getattr(self, "_decay_key", None) != values:
            sizes = torch.tensor([m.entry.num_groups for m in self.members])
            per_group = torch.tensor(values, dtype=torch.float64).repeat_interleave(sizes)
            self._decay_key, self._decay_value = values, per_group.to(self.radius.device)
        return self._decay_value

    # ------------------------------------------------------------------ state

    def radii(self) -> dict[str, Tensor]:
        """Module name → its groups' virtual radii (AdamG rewrite, once known)."""
        if self.kind != "adamg" or self._fresh:
            return {}
        return {m.entry.module_name: self.radius[m.groups] for m in self.members}

    def load_radii(self, radii: dict[str, Tensor]) -> None:
        """Restore virtual radii saved by :meth:`radii`; modules without one get theirs on the next step."""
        if self.kind != "adamg":
            return
        for m in self.members:
            if m.entry.module_name in radii:
                self.radius[m.groups] = radii[m.entry.module_name].to(self.radius)
        self._fresh = any(m.entry.module_name not in radii for m in self.members)


def _scalar(value: Any) -> Tensor:
    """A hyper-parameter as a 0-dim float64 tensor (where it already is, if a tensor): one compiled graph
    serves every value, and no host sync is needed to use it."""
    return torch.as_tensor(value, dtype=torch.float64)


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
