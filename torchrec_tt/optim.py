"""Optimizers fused into the backward of TT tables, configured the TorchRec/FBGEMM way.

``TTEmbeddingBagCollection(tables, fused_params={"optimizer": EmbOptimType.EXACT_SGD,
"learning_rate": 0.05})`` updates the cores during ``loss.backward()``: a post-accumulate-grad
hook on each core applies the update to the dense core gradient (small: the size of the core)
and frees it, so no ``optimizer.step()`` is needed and no gradient outlives the backward. The
state (``momentum1`` / ``momentum2`` / step, FBGEMM's names) lives in the module's state_dict;
:class:`TTFusedOptimizer` exposes it as a TorchRec ``KeyedOptimizer`` (``.fused_optimizer``).

Semantics per core ``G`` with gradient ``g`` (after ``g += weight_decay * G``):

* EXACT_SGD: ``G -= lr * g``.
* EXACT_ADAGRAD: ``m1 += g²; G -= lr * g / (sqrt(m1) + eps)`` (``torch.optim.Adagrad``).
* EXACT_ROWWISE_ADAGRAD: one ``m1`` per core slice (row of the 2-D core):
  ``m1 += mean(g_row²); G_row -= lr * g_row / (sqrt(m1) + eps)`` (FBGEMM's row-wise Adagrad).
* ADAM: ``torch.optim.Adam`` with bias correction, applied to every slice (dense: the cores are
  small, so there is no reason for FBGEMM's lazy per-row variant).

Safety options (``fused_params`` keys, all off by default):

* ``gradient_clipping`` / ``max_gradient`` (FBGEMM's): every gradient entry is clamped to
  ``[-max_gradient, max_gradient]`` before weight decay and the update (``±inf`` becomes
  ``±max_gradient``; NaN stays NaN).
* ``skip_non_finite``: a table whose gradient holds a NaN or inf in any core is not updated that
  step (cores and state untouched) and the step is counted in ``skipped_steps[table]`` of the
  fused optimizer. No host synchronisation: the finiteness check stays a device tensor; SGD,
  Adagrad and row-wise Adagrad without weight decay then update with the gradient zeroed where
  it is false (exactly no change), Adam and weight decay compute the update and keep it only
  where it is true (one extra copy of the table's cores and state per step); the count is read
  back only when ``skipped_steps`` is read.

Hyper-parameters are checked when the config is built (finite, in range, numbers) and the
learning rate again at every update, when it is read from ``param_groups``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_tt.ops import TTKernelOptions
from torchrec_tt.validation import check_number

__all__ = [
    "FusedOptimConfig",
    "SUPPORTED_FUSED_OPTIMIZERS",
    "TTFusedOptimizer",
    "ValidatedLoadMixin",
    "apply_if",
    "count_if_not",
    "finite_flag",
    "finite_flags",
    "zero_grad_is_no_op",
    "zeroed_unless",
    "effective_grad",
    "fused_update_many",
    "read_lr",
]

SUPPORTED_FUSED_OPTIMIZERS = (
    EmbOptimType.EXACT_SGD,
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    EmbOptimType.ADAM,
)
@dataclass(frozen=True)
class FusedOptimConfig:
    """The fused optimizer of a TT collection (FBGEMM's ``fused_params`` keys).

    Args:
        optimizer: an ``EmbOptimType`` (or its string value) from SUPPORTED_FUSED_OPTIMIZERS.
        learning_rate: step size.
        eps: added to the denominator (Adagrad, Adam).
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        weight_decay: L2 penalty added to the gradient.
    """

    optimizer: EmbOptimType
    learning_rate: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    gradient_clipping: bool = False
    max_gradient: float = 1.0
    skip_non_finite: bool = False

    def __post_init__(self) -> None:
        # Every construction path (fused_params, apply_optimizer_in_backward, sharders) ends
        # here: non-finite, out-of-range or non-numeric values never reach an update.
        where = "fused optimizer"
        ranges = {
            "learning_rate": {"low": 0.0},
            "eps": {"low": 0.0, "low_open": True},
            "beta1": {"low": 0.0, "high": 1.0, "high_open": True},
            "beta2": {"low": 0.0, "high": 1.0, "high_open": True},
            "weight_decay": {"low": 0.0},
            "max_gradient": {"low": 0.0, "low_open": True},
        }
        for name, limits in ranges.items():
            value = check_number(name, getattr(self, name), where=where, **limits)  # type: ignore[arg-type]
            object.__setattr__(self, name, value)
        for name in ("gradient_clipping", "skip_non_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}: {name} must be a bool, got {getattr(self, name)!r}")

    @staticmethod
    def from_fused_params(fused_params: Mapping[str, Any]) -> FusedOptimConfig:
        """Validates a ``fused_params`` dict; unknown keys and optimizers raise ValueError."""
        # Kernel settings travel in the same dict (as FBGEMM's bounds_check_mode does).
        params = {k: v for k, v in fused_params.items() if k not in TTKernelOptions.KEYS}
        if "betas" in params:
            betas = params.pop("betas")
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"fused optimizer: betas must be a pair, got {betas!r}")
            params["beta1"], params["beta2"] = betas
        if "lr" in params:
            params["learning_rate"] = params.pop("lr")
        names = {f.name for f in fields(FusedOptimConfig)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"fused_params has unsupported keys {unknown}; supported: {sorted(names)}")
        if "optimizer" not in params:
            raise ValueError("fused_params needs an 'optimizer' (an fbgemm_gpu EmbOptimType)")
        try:
            opt = EmbOptimType(params["optimizer"])
        except ValueError:
            raise ValueError(f"unknown optimizer {params['optimizer']!r}") from None
        if opt not in SUPPORTED_FUSED_OPTIMIZERS:
            raise ValueError(
                f"fused optimizer {opt.name} is not supported; choose one of "
                f"{[o.name for o in SUPPORTED_FUSED_OPTIMIZERS]}"
            )
        params["optimizer"] = opt
        return FusedOptimConfig(**params)

    def state_shapes(self, core_shape: torch.Size) -> dict[str, tuple[int, ...]]:
        """Shapes of the state buffers of one core."""
        if self.optimizer == EmbOptimType.EXACT_ADAGRAD:
            return {"momentum1": tuple(core_shape)}
        if self.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
            return {"momentum1": (core_shape[0],)}
        if self.optimizer == EmbOptimType.ADAM:
            return {"momentum1": tuple(core_shape), "momentum2": tuple(core_shape), "step": ()}
        return {}


def read_lr(group: Mapping[str, Any], where: str) -> float:
    """The learning rate of a param group, checked as it is read for an update (a scheduler or
    a user may have set it to anything since the config was validated)."""
    return check_number("param_groups lr", group["lr"], low=0.0, where=where)


def effective_grad(core: Tensor, grad: Tensor, cfg: FusedOptimConfig) -> Tensor:
    """The gradient an update uses: clipped (``gradient_clipping``), then weight decay added."""
    g = grad.clamp(-cfg.max_gradient, cfg.max_gradient) if cfg.gradient_clipping else grad
    return g if cfg.weight_decay == 0 else g.add(core, alpha=cfg.weight_decay)


def finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: no NaN or inf in any (no host sync)."""
    return finite_flags([tensors])[0]


def finite_flags(groups: Sequence[Sequence[Tensor]]) -> Tensor:
    """One bool per group as a 1-D tensor on the tensors' device: no NaN or inf in any tensor of
    the group (no host sync). The same answer as ``isfinite(t).all()`` over the group's tensors,
    in five ops for all groups together instead of several per tensor (a GPU step is bound by
    launches), and no temporary the size of the tensors: a tensor's inf-norm ``max |x|`` is
    finite exactly when every element is (the largest magnitude of finite floats is finite, an
    inf makes it inf, and the reduction propagates NaN: on the CPU ``_foreach_norm`` runs
    ``linalg.vector_norm``, whose max propagates NaN; CUDA's foreach inf-norm kernel reduces with
    ``max_propagate_nan``), and a group's largest norm (``amax``, which propagates NaN too) is
    below inf exactly when all its norms are finite."""
    flat = [t for group in groups for t in group]
    if not flat or not all(groups):
        raise ValueError("finite_flags needs at least one tensor in every group")
    try:
        norms = list(torch._foreach_norm(flat, float("inf")))
    except RuntimeError:
        # The inf-norm of an empty tensor has no identity, and _foreach_norm refuses it: an empty
        # tensor is finite, so it takes a 0 (the check per tensor runs only here).
        if all(t.numel() > 0 for t in flat):
            raise
        full = [t for t in flat if t.numel() > 0]
        found = iter(torch._foreach_norm(full, float("inf")) if full else ())
        zero = flat[0].new_zeros(())
        norms = [next(found) if t.numel() > 0 else zero for t in flat]
    width = max(len(group) for group in groups)
    if any(len(group) != width for group in groups):  # pad short groups with a finite 0
        pad = norms[0].new_zeros(())
        rows, pos = [], 0
        for group in groups:
            rows += norms[pos : pos + len(group)] + [pad] * (width - len(group))
            pos += len(group)
        norms = rows
    return torch.stack(norms).view(len(groups), width).amax(dim=1) < float("inf")


@torch.no_grad()
def apply_if(ok: Tensor, tensors: Sequence[Tensor], update: Callable[[], None]) -> None:
    """Runs ``update`` (which changes ``tensors`` in place), then puts every tensor back where
    the 0-dim bool ``ok`` is false: a skipped step without reading ``ok`` on the host."""
    before = [t.clone() for t in tensors]
    update()
    for t, old in zip(tensors, before):
        t.copy_(torch.where(ok, t, old))


def zero_grad_is_no_op(cfg: FusedOptimConfig) -> bool:
    """Whether an update with an all-zero gradient leaves the core and its state exactly as they
    were (SGD, Adagrad and row-wise Adagrad without weight decay: ``m1 += 0``, ``G -= 0`` with
    ``eps > 0``). A skipped step is then the update of a zeroed gradient, cheaper than
    :func:`apply_if`'s copies; Adam (its moments decay, its step counts) and weight decay need
    the copies."""
    return cfg.weight_decay == 0 and cfg.optimizer in (
        EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD)


def zeroed_unless(ok: Tensor, grad: Tensor) -> Tensor:
    """``grad`` where the 0-dim bool ``ok`` is true, zeros (NaN and inf included) where not."""
    key = (grad.dtype, grad.device)
    zero = _ZEROS.get(key)
    if zero is None:  # made once: a new 0-dim zero per call is an op (a fill launch on a GPU)
        zero = _ZEROS[key] = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return torch.where(ok, grad, zero)


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def count_if_not(count: Tensor | int, ok: Tensor) -> Tensor:
    """``count + (not ok)`` as a device tensor (a skipped-step counter)."""
    return (~ok).to(torch.int64) + count


@torch.no_grad()
def fused_update(core: Tensor, grad: Tensor, state: Mapping[str, Tensor], cfg: FusedOptimConfig, lr: float) -> None:
    """Applies one fused-optimizer step to ``core`` in place (state updated in place)."""
    g = effective_grad(core, grad, cfg)
    opt = cfg.optimizer
    if opt == EmbOptimType.EXACT_SGD:
        core.add_(g, alpha=-lr)
    elif opt == EmbOptimType.EXACT_ADAGRAD:
        m1 = state["momentum1"]
        m1.addcmul_(g, g)
        core.addcdiv_(g, m1.sqrt().add_(cfg.eps), value=-lr)
    elif opt == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
        m1 = state["momentum1"]
        m1.add_(g.square().mean(dim=1))
        core.sub_(g * (lr / (m1.sqrt() + cfg.eps)).unsqueeze(1))
    elif opt == EmbOptimType.ADAM:
        m1, m2, step = state["momentum1"], state["momentum2"], state["step"]
        step.add_(1)
        m1.lerp_(g, 1 - cfg.beta1)
        m2.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        # Bias corrections as tensor ops: reading the step on the host would sync the GPU.
        bc1 = 1 - torch.pow(cfg.beta1, step)
        bc2 = 1 - torch.pow(cfg.beta2, step)
        denom = (m2 / bc2).sqrt_().add_(cfg.eps)
        core.sub_(lr * m1 / bc1 / denom)
    else:  # FusedOptimConfig.from_fused_params only admits the ones above
        raise AssertionError(opt)


@torch.no_grad()
def fused_update_many(
    cores: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Mapping[str, Tensor]],
    cfg: FusedOptimConfig,
    lr: float,
) -> None:
    """:func:`fused_update` of several cores with one config and learning rate. SGD and Adagrad
    without clipping or weight decay run as ``torch._foreach_*`` ops (a few launches for all
    the cores instead of a few per core: the step of a DLRM with 7 TT tables is bound by host
    launch time on a GPU); the others go core by core. The same arithmetic either way."""
    if len(cores) != len(grads) or len(cores) != len(states):
        raise ValueError(f"{len(cores)} cores, {len(grads)} gradients and {len(states)} states")
    plain = not cfg.gradient_clipping and cfg.weight_decay == 0 and len(cores) > 1
    if plain and cfg.optimizer == EmbOptimType.EXACT_SGD:
        torch._foreach_add_(list(cores), list(grads), alpha=-lr)
    elif plain and cfg.optimizer == EmbOptimType.EXACT_ADAGRAD:
        sums = [st["momentum1"] for st in states]
        torch._foreach_addcmul_(sums, list(grads), list(grads))
        denom = torch._foreach_sqrt(sums)
        torch._foreach_add_(denom, cfg.eps)
        torch._foreach_addcdiv_(list(cores), list(grads), denom, value=-lr)
    else:
        for core, grad, state in zip(cores, grads, states):
            fused_update(core, grad, state, cfg, lr)


def _describe(value: Any) -> str:
    if isinstance(value, ShardedTensor):
        return f"a ShardedTensor of size {tuple(value.size())}, {value.dtype}"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}, {value.dtype}"
    return f"a {type(value).__name__}"


def _check_state_value(path: str, have: Any, new: Any) -> None:
    if isinstance(have, ShardedTensor):
        ok = (
            isinstance(new, ShardedTensor)
            and new.size() == have.size()
            and new.dtype == have.dtype
            and [s.tensor.shape for s in new.local_shards()]
            == [s.tensor.shape for s in have.local_shards()]
        )
    else:
        ok = isinstance(new, Tensor) and not isinstance(new, ShardedTensor) and (
            new.shape == have.shape and new.dtype == have.dtype
        )
    if not ok:
        raise ValueError(
            f"fused optimizer state_dict: {path} is {_describe(new)} but the optimizer holds "
            f"{_describe(have)} (local shards must match too); nothing was loaded"
        )


def _names(keys: Any) -> list[str]:
    return sorted(str(k) for k in keys)


class ValidatedLoadMixin:
    """``load_state_dict`` that checks the whole state dict (every key, state name, shape and
    dtype, the param groups and their learning rates) before KeyedOptimizer copies any of it,
    so a bad state dict raises ``ValueError`` naming the key and leaves the optimizer as it was."""

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)  # type: ignore[misc]

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pre = "fused optimizer state_dict"
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            raise ValueError(f"{pre}: expected a mapping with 'state' (and 'param_groups')")
        new_state = state_dict["state"]
        params: dict[str, Any] = self.params  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        missing, unexpected = set(params) - set(new_state), set(new_state) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"{pre}: keys do not match the optimizer's: missing {_names(missing)}, "
                f"unexpected {_names(unexpected)}; nothing was loaded"
            )
        for key, param in params.items():
            have, new = state[param], new_state[key]
            if not isinstance(new, Mapping) or set(have) != set(new):
                got = _names(new) if isinstance(new, Mapping) else _describe(new)
                raise ValueError(
                    f"{pre}: state[{key!r}] has {got} but the optimizer's has {_names(have)}; "
                    "nothing was loaded"
                )
            for name, value in have.items():
                _check_state_value(f"state[{key!r}][{name!r}]", value, new[name])
        if not self.defaults["_save_param_groups"]:  # type: ignore[attr-defined]
            return
        new_groups = state_dict.get("param_groups")
        groups = self.param_groups  # type: ignore[attr-defined]
        if not isinstance(new_groups, Sequence) or len(new_groups) != len(groups):
            raise ValueError(
                f"{pre}: param_groups must be a list of {len(groups)} groups, got "
                f"{new_groups!r}; nothing was loaded"
            )
        key_of = {id(p): k for k, p in params.items()}
        new_by_params = {
            tuple(sorted(g.get("params", ()))): g for g in new_groups if isinstance(g, Mapping)
        }
        for group in groups:
            keys = tuple(sorted(key_of[id(p)] for p in group["params"]))
            new = new_by_params.get(keys)
            if new is None:
                raise ValueError(f"{pre}: no param group holds {list(keys)}; nothing was loaded")
            if set(new) != set(group):
                raise ValueError(
                    f"{pre}: the param group of {list(keys)} has keys {_names(new)}, expected "
                    f"{_names(group)}; nothing was loaded"
                )
            read_lr(new, f"{pre}: the param group of {list(keys)}")


class TTFusedOptimizer(ValidatedLoadMixin, KeyedOptimizer):
    """KeyedOptimizer view of the fused optimizer of a TT collection.

    The updates happen in the backward; ``step()`` and ``zero_grad()`` do nothing (as for
    FBGEMM's fused TBE optimizer). ``param_groups[0]["lr"]`` is read (and checked) at every
    update, so learning-rate schedulers work. With ``skip_non_finite``, a table's core
    gradients are held until all of them arrived in the backward, then applied together or
    (any of them non-finite) dropped and counted in ``skipped_steps``.
    """

    def __init__(
        self,
        cfg: FusedOptimConfig,
        params: Mapping[str, nn.Parameter],
        state_of: Callable[[str], dict[str, Tensor]],
    ) -> None:
        # State is looked up by parameter name through `state_of` (the owning module's buffers)
        # rather than held here, so it stays right when the module moves or is materialised.
        self._state_of = state_of
        super().__init__(
            params=dict(params),
            state={},
            param_groups=[{"params": list(params.values()), "lr": cfg.learning_rate}],
        )
        self.cfg = cfg
        self._handles: list[Any] = []
        # Steps skipped per table by skip_non_finite: device tensors once counted (no sync).
        self._skipped: dict[str, Tensor | int] = {}
        self._pending: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        self.rebind(params)

    @staticmethod
    def _table_of(name: str) -> str:
        return name.split(".")[1]  # embedding_bags.<table>.core_<k>

    def rebind(self, params: Mapping[str, nn.Parameter]) -> None:
        """Moves the update hooks to new parameter objects (after ``to_empty``, ``to``, …)."""
        for h in self._handles:
            h.remove()
        self.params = dict(params)
        self.param_groups[0]["params"] = list(self.params.values())  # type: ignore[index]
        self._names = {p: name for name, p in self.params.items()}
        self._cores_per_table: dict[str, int] = {}
        for name in self.params:
            table = self._table_of(name)
            self._cores_per_table[table] = self._cores_per_table.get(table, 0) + 1
            self._skipped.setdefault(table, 0)
        self._pending.clear()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params.values()]

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles point at the original parameters' hook dicts; copies get their own.
        state = dict(super().__getstate__())
        state["_handles"] = []
        state["_pending"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy / pickle: the parameters are the copy's (hooks are never copied), so
        # the copy's updates are registered on them here.
        super().__setstate__(state)
        self.rebind(self.params)

    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, dict[str, Tensor]]:
        return {p: self._state_of(name) for name, p in self.params.items()}

    @property
    def skipped_steps(self) -> dict[str, int]:
        """Steps skipped per table by ``skip_non_finite`` (always 0 with it off); reading it
        synchronises with the device."""
        return {table: int(n) for table, n in self._skipped.items()}

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        if value:
            raise ValueError("TTFusedOptimizer state lives in the module's buffers")

    def _on_grad(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None  # also on a rejected step: no gradient leaks into the next backward
        name = self._names[param]
        table = self._table_of(name)
        lr = read_lr(self.param_groups[0], f"fused optimizer of TT tables {sorted(self._cores_per_table)}")  # type: ignore[arg-type]
        if not self.cfg.skip_non_finite:
            fused_update(param, grad, self._state_of(name), self.cfg, lr)
            return
        pending = self._pending.setdefault(table, {})
        pending[name] = (param, grad)
        if len(pending) < self._cores_per_table[table]:
            return
        del self._pending[table]
        ok = finite_flag([g for _, g in pending.values()])
        if zero_grad_is_no_op(self.cfg):
            for core_name, (core, g) in pending.items():
                fused_update(core, zeroed_unless(ok, g), self._state_of(core_name), self.cfg, lr)
        else:
            touched = [c for c, _ in pending.values()]
            touched += [s for n in pending for s in self._state_of(n).values()]

            def update() -> None:
                for core_name, (core, g) in pending.items():
                    fused_update(core, g, self._state_of(core_name), self.cfg, lr)

            apply_if(ok, touched, update)
        self._skipped[table] = count_if_not(self._skipped[table], ok)

    def step(self, closure: Any = None) -> None:  # noqa: D102 - updates already happened
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - no gradients kept
        return None
