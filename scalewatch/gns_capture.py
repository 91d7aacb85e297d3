"""Capturing the squared gradient norms the noise scale needs, on the device, without a host sync.

Three sources, each giving small-batch and big-batch gradients at the SAME weights:

* :class:`ParamGradHooks`: per-parameter tensor hooks see each backward's gradient
  contribution before it is accumulated into ``.grad``. Under gradient accumulation
  that is each micro-batch's gradient; under DDP it is the rank's local gradient
  before the all-reduce (an equivalent of a communication hook that also sees
  micro-batches). One norm kernel per parameter per backward; no gradient copies.
* :class:`PerExampleNorms`: per-example squared gradient norms of ``nn.Linear``,
  ``nn.LayerNorm`` and ``nn.RMSNorm`` weights from their inputs and output gradients
  (``|a_i|^2·|delta_i|^2`` for 2-D inputs; for sequences the cheaper of the "ghost
  norm" Gram form and a per-example ``bmm``). Opt-in: it costs extra compute.
* :class:`DeviceNoiseEMA`: the bias-corrected EMAs of ``|G|^2`` and ``tr(Sigma)`` kept
  as a device vector, updated with tensor ops only.

Everything here is torch without Lightning: :class:`NoiseScaleTracker` runs one run's capture from
plain numbers the callback reads off the trainer (method, accumulation, world size, AMP scale).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from scalewatch.gns import coefficients


def _norm(grad: Tensor) -> Tensor:
    """L2 norm in at least float32: one kernel for float32/float64 gradients."""
    if grad.is_sparse:
        grad = grad.coalesce().values()
    if grad.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(grad)
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


def grad_sq_norm(params: Iterable[Tensor]) -> Tensor | None:
    """Squared L2 norm of the ``.grad`` of ``params`` (float32 0-d device tensor), None if no grads.

    One fused foreach kernel per dtype/device group, no host read. The per-tensor norms are taken
    in float32 (a float16 total above 65504 would read as inf), and parts on several devices (a
    model split across devices in one process) are gathered on the first one.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
        >>> float(grad_sq_norm([p]))
        12.0
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    dense = [g for g in grads if not g.is_sparse]
    norms = list(torch._foreach_norm(dense, 2, dtype=torch.float32)) if dense else []
    norms += [_norm(g).float() for g in grads if g.is_sparse]
    device = norms[0].device
    if len(dense) < len(grads) or len({g.device for g in dense}) > 1:  # else no per-norm copy (~1 us each)
        norms = [n.to(device, non_blocking=True) for n in norms]
    return torch.stack(norms).square().sum()


def grad_norm(params: Iterable[Tensor]) -> Tensor | None:
    """Global L2 norm of the ``.grad`` of ``params`` (the square root of :func:`grad_sq_norm`).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
        >>> round(float(grad_norm([p])), 4)   # sqrt(12)
        3.4641
    """
    sq = grad_sq_norm(params)
    return None if sq is None else sq.sqrt()


class _BackwardNorms:
    """Norms collected during one backward, folded into the step's sum of squared norms."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self._norms: list[Tensor] = []
        self._step_sum: Tensor | None = None
        self._backwards = 0

    def end_backward(self) -> None:
        """Fold this backward's norms into the step (squared, summed) and count the backward."""
        if not self._norms:
            return
        norms = self._norms
        if len({n.dtype for n in norms}) > 1:
            norms = [n.float() for n in norms]
        total = torch.stack(norms).float().square().sum()
        self._norms = []
        self._step_sum = total if self._step_sum is None else self._step_sum + total
        self._backwards += 1

    def take_step(self) -> tuple[Tensor | None, int]:
        """``(sum of squared norms, number of backwards)`` of the step, and reset."""
        out = (self._step_sum, self._backwards)
        self._step_sum, self._backwards, self._norms = None, 0, []
        return out


class ParamGradHooks(_BackwardNorms):
    """Squared norm of each backward's gradient contribution, summed over ``params``.

    Call :meth:`end_backward` after each backward: it folds the per-parameter norms
    into the step's sum of squared micro-batch norms (device tensor) and counts the
    backward. :meth:`take_step` returns ``(sum of squared norms, number of backwards)``
    and resets.

    Example:
        >>> lin = torch.nn.Linear(3, 1, bias=False)
        >>> hooks = ParamGradHooks(list(lin.parameters()))
        >>> for x in (torch.ones(1, 3), 2 * torch.ones(1, 3)):
        ...     lin(x).sum().backward(); hooks.end_backward()
        >>> total, n = hooks.take_step(); hooks.remove()
        >>> float(total), n   # |(1,1,1)|^2 + |(2,2,2)|^2
        (15.0, 2)
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params)
        self._handles = [p.register_hook(self._hook) for p in self.params]

    def _hook(self, grad: Tensor) -> None:
        # Runs inside autograd before accumulation into .grad: the norm must be taken now,
        # keeping a reference would make AccumulateGrad copy instead of steal the tensor.
        # One kernel per parameter; squaring and summing wait for end_backward.
        self._norms.append(_norm(grad))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class DDPCommHookCapture(_BackwardNorms):
    """DDP: each rank's local gradient norm from a communication hook, one norm per bucket.

    The hook sees each gradient bucket before the all-reduce (the flattened local
    gradient), takes its norm, then all-reduces exactly as DDP's default does. Cheaper
    than per-parameter hooks (a norm per ~25 MB bucket instead of per parameter), but it
    only sees the last micro-batch of an accumulation (DDP skips communication under
    ``no_sync``), so it is used for DDP without accumulation. A comm hook cannot be
    unregistered: :meth:`remove` only stops the measuring.

    Raises ``RuntimeError`` (from DDP) when the model already has a comm hook.
    """

    def __init__(self, ddp_model: Any, params: Iterable[Tensor], process_group: Any = None) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        super().__init__(params)
        self.active = True
        self._allreduce = default_hooks.allreduce_hook
        self._group = process_group
        ddp_model.register_comm_hook(self, DDPCommHookCapture._hook)

    @staticmethod
    def _hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations here
        if state.active:
            state._norms.append(_norm(bucket.buffer()))
        return state._allreduce(state._group, bucket)

    def remove(self) -> None:
        self.active = False
        self._norms = []

    def reactivate(self) -> None:
        self.active = True


def _linear_sq(x: Tensor, g: Tensor, weight: bool, bias: bool) -> Tensor:
    """Per-example squared norms of a Linear layer's weight/bias gradients, shape [B]."""
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1]).float()
    g = g.reshape(b, -1, g.shape[-1]).float()
    t, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
    out = x.new_zeros(b)
    if weight:
        if t == 1:
            out = out + x[:, 0].square().sum(1) * g[:, 0].square().sum(1)
        elif t * (d_in + d_out) < d_in * d_out:
            # Ghost norm: |sum_t g_t x_t^T|^2 = sum_{t,s} (x_t.x_s)(g_t.g_s), O(B T^2 (d_in + d_out)).
            out = out + ((x @ x.mT) * (g @ g.mT)).sum((1, 2))
        else:
            out = out + torch.bmm(g.mT, x).square().sum((1, 2))
    if bias:
        out = out + g.sum(1).square().sum(1)
    return out


def _norm_sq(mod: nn.Module, x: Tensor, g: Tensor, weight: bool, bias: bool) -> Tensor:
    """Per-example squared norms of a LayerNorm/RMSNorm's affine gradients, shape [B]."""
    b = x.shape[0]
    shape = tuple(mod.normalized_shape)
    x = x.float()
    if isinstance(mod, nn.LayerNorm):
        xhat = torch.nn.functional.layer_norm(x, shape, eps=mod.eps)
    else:
        eps = mod.eps if mod.eps is not None else torch.finfo(x.dtype).eps
        dims = tuple(range(-len(shape), 0))
        xhat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    n = 1
    for s in shape:
        n *= s
    xhat = xhat.reshape(b, -1, n)
    g = g.float().reshape(b, -1, n)
    out = x.new_zeros(b)
    if weight:
        out = out + (g * xhat).sum(1).square().sum(1)
    if bias:
        out = out + g.sum(1).square().sum(1)
    return out


_SUPPORTED = (nn.Linear, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored transposed
    (``[in, out]``, ``y = x @ W + b``). The per-example gradient is the same outer product, so it is
    measured as a Linear; recognised by name so that ``transformers`` need not be imported."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


class PerExampleNorms:
    """Per-example squared gradient norms of the Linear / LayerNorm / RMSNorm parameters of a model.

    Covers each parameter that belongs to exactly one supported module (tied weights,
    such as a GPT head shared with the embedding, are left out, as are embeddings and
    any other module type). The noise scale is then that of the covered parameters,
    which tracks the whole model's (Gray et al.). The batch dimension must be dim 0.
    ``layers="norm"`` keeps only the LayerNorm/RMSNorm weights: O(B·T·d) per layer
    instead of a per-example weight-gradient matmul, for a fraction of the cost.

    After each backward, :meth:`end_backward` folds the layers' per-example norms;
    :meth:`take_step` returns ``(sum over examples of |g_i|^2, batch size, covered
    params)`` where ``g_i`` is example i's contribution to the gradient as computed
    (1/B of its own gradient when the loss is a batch mean), or ``(None, 0, [])``
    when the step could not be measured.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1))
        >>> pe = PerExampleNorms(net)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> net(x).sum().backward(); pe.end_backward()   # per-example grads: (1,0,1) and (0,2,1)
        >>> s, b, params = pe.take_step(); pe.remove()
        >>> float(s), b, len(params)
        (7.0, 2, 2)
    """

    def __init__(self, model: nn.Module, layers: str = "all") -> None:
        if layers not in ("all", "norm"):
            raise ValueError(f"layers must be 'all' or 'norm', got {layers!r}")
        supported = _SUPPORTED if layers == "all" else tuple(t for t in _SUPPORTED if t is not nn.Linear)
        owners: dict[int, int] = {}
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self._targets: dict[nn.Module, tuple[bool, bool, list[Tensor]]] = {}
        for mod in model.modules():
            if not (isinstance(mod, supported) or (layers == "all" and _is_conv1d(mod))):
                continue
            w = getattr(mod, "weight", None)
            bias = getattr(mod, "bias", None)
            use_w = isinstance(w, Tensor) and w.requires_grad and owners.get(id(w)) == 1
            use_b = isinstance(bias, Tensor) and bias.requires_grad and owners.get(id(bias)) == 1
            if use_w or use_b:
                params = ([w] if use_w else []) + ([bias] if use_b else [])
                self._targets[mod] = (use_w, use_b, params)
        self._model_params = list({id(p): p for p in model.parameters()}.values())
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._targets]
        self._calls: dict[nn.Module, int] = {}
        self._pending: list[tuple[nn.Module, Tensor]] = []
        self._step: dict[nn.Module, Tensor] = {}
        self._batch = 0
        self._excluded: set[nn.Module] = set()
        self.warnings: list[str] = []

    @property
    def n_modules(self) -> int:
        return len(self._targets)

    def coverage(self) -> str:
        """What is measured, exactly: modules by type and the share of the trainable parameters.

        Example:
            >>> PerExampleNorms(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Embedding(4, 2))).coverage()
            '1 Linear: 6 of 14 trainable parameters'
        """
        kinds: dict[str, int] = {}
        for mod in self._targets:
            kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
        covered = sum(p.numel() for _, _, params in self._targets.values() for p in params)
        total = sum(p.numel() for p in self._model_params if p.requires_grad)
        return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f": {covered:,} of {total:,} trainable " \
            "parameters"

    def _forward_hook(self, mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if mod in self._excluded or not torch.is_grad_enabled() or not isinstance(output, Tensor) \
                or not output.requires_grad or not inputs or not isinstance(inputs[0], Tensor):
            return
        x = inputs[0].detach()  # autograd already keeps this input alive for the weight gradient
        self._calls[mod] = self._calls.get(mod, 0) + 1
        output.register_hook(lambda g, mod=mod, x=x: self._on_grad(mod, x, g))

    def _on_grad(self, mod: nn.Module, x: Tensor, g: Tensor) -> None:
        use_w, use_b, _ = self._targets[mod]
        if x.ndim == 0 or g.shape[0] != x.shape[0]:
            return
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            sq = _linear_sq(x, g.detach(), use_w, use_b)
        else:
            sq = _norm_sq(mod, x, g.detach(), use_w, use_b)
        self._pending.append((mod, sq))

    def end_backward(self) -> None:
        """Fold this backward's per-layer norms into the step (one backward per step is supported)."""
        for mod, sq in self._pending:
            if mod in self._step:
                self._step[mod] = self._step[mod] + sq
            else:
                self._step[mod] = sq
        self._pending = []

    def take_step(self) -> tuple[Tensor | None, int, list[Tensor]]:
        step, calls = self._step, self._calls
        self._step, self._calls, self._pending = {}, {}, []
        usable = []
        sizes = {int(sq.shape[0]) for sq in step.values()}
        for mod, sq in step.items():
            if calls.get(mod, 0) != 1:
                # A module run twice per step (reuse, activation checkpointing): its per-example
                # gradient is a sum over calls whose norm the per-call norms do not give.
                self._exclude(mod, f"{type(mod).__name__} ran {calls.get(mod, 0)} times in one step")
                continue
            usable.append((mod, sq))
        if not usable or len(sizes) != 1:
            if len(sizes) > 1:
                self.warnings.append("layers saw different batch sizes in dim 0; per-example norms skipped")
            return None, 0, []
        total = torch.stack([sq for _, sq in usable]).sum(0).sum()
        params = [p for mod, _ in usable for p in self._targets[mod][2]]
        return total, sizes.pop(), params

    def _exclude(self, mod: nn.Module, why: str) -> None:
        if mod not in self._excluded:
            self._excluded.add(mod)
            self.warnings.append(f"per-example norms: left out a {why}")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class DeviceNoiseEMA:
    """Bias-corrected EMAs of ``|G|^2`` and ``tr(Sigma)`` as one float64[3] device vector.

    ``state = [m_g2, m_trace, weight]``; the estimates are ``m / weight``. Updates are
    tensor ops only: a non-finite step leaves the state untouched without a host read.
    Under DDP each rank feeds its own small-batch norm; the estimators are linear in
    it, so averaging the ranks' states at the log step gives exactly the EMA of the
    rank-averaged estimates (the big-batch norm is the same on every rank).
    """

    def __init__(self, decay: float, device: torch.device | str = "cpu") -> None:
        self.decay = decay
        self.state = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> None:
        c = coefficients(b_small, b_big)
        small = small_sq.double()
        big = big_sq.double()
        est = torch.stack((c.big * big - c.small * small, c.trace * (small - big), torch.ones_like(big)))
        new = self.decay * self.state + (1 - self.decay) * est
        self.state = torch.where(torch.isfinite(est).all(), new, self.state)


METHOD_DESCRIPTIONS = {
    "ddp": "each rank's local gradient before the all-reduce (a DDP communication hook) vs the global gradient",
    "accumulation": "each micro-batch's gradient vs the accumulated step gradient",
    "ddp+accumulation": "each rank's micro-batch gradients vs the global step gradient",
    "per_example": "per-example gradient norms of Linear (and Hugging Face Conv1D) / LayerNorm / RMSNorm weights "
                   "vs their batch gradient",
    "per_example_norm": "per-example gradient norms of LayerNorm/RMSNorm weights only (Gray et al.) vs "
                        "their batch gradient",
}


def choose_gns_method(mode: str, strategy: Any, world_size: int, accumulate_grad_batches: int,
                      automatic_optimization: bool) -> tuple[str | None, str | None]:
    """Which noise-scale capture applies: ``(method or None, message to say once or None)``.

    Only strategies where each rank holds whole gradients (single device, DDP) can
    compare a local gradient with the global one; sharded ones (FSDP, DeepSpeed,
    model parallel) cannot.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
        >>> choose_gns_method("auto", DDPStrategy(), 8, 4, True)
        ('ddp+accumulation', None)
        >>> choose_gns_method("auto", FSDPStrategy(), 8, 1, True)[0] is None
        True
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if mode == "off":
        return None, None
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return None, (f"off: the {type(strategy).__name__} strategy shards gradients or is not supported, so no "
                      "rank holds a whole local gradient to compare with the global one; the rest of scalewatch "
                      "keeps working")
    ddp = world_size > 1
    accumulation = accumulate_grad_batches > 1 and automatic_optimization
    free = "ddp+accumulation" if ddp and accumulation else "ddp" if ddp else "accumulation" if accumulation else None
    if mode == "auto":
        if free is None and not automatic_optimization and not ddp:
            return None, ("not measured: under manual optimization on one device, scalewatch cannot tell which "
                          "backwards make one step (Lightning's accumulate_grad_batches is not in use); "
                          "ScaleWatch(gns='per_example') measures it from per-example gradient norms, at extra "
                          "compute")
        if free is None:
            return None, ("not measured: one device without gradient accumulation gives no second batch size for "
                          "free; ScaleWatch(gns='per_example') measures it from per-example gradient norms of the "
                          "Linear/LayerNorm layers, at extra compute")
        return free, None
    if mode in ("per_example", "per_example_norm"):
        if free is not None:
            return free, (f"{mode} applies to one device without accumulation; using the free '{free}' "
                          "method instead")
        return mode, None
    if free is None or mode not in free:
        return None, (f"gns={mode!r} cannot apply here (world size {world_size}, accumulate_grad_batches "
                      f"{accumulate_grad_batches}, automatic optimization {automatic_optimization}); use gns='auto'")
    return free, None


Capture = ParamGradHooks | DDPCommHookCapture | PerExampleNorms


class NoiseScaleTracker:
    """One run's noise-scale measurement: the capture, the sizes of the step's micro-batches, the device EMAs.

    The callback calls :meth:`start` when training starts, :meth:`add_batch` per micro-batch,
    :meth:`end_backward` per backward and :meth:`step` before each optimizer step; the EMAs
    (``ema.state``) ride along in the callback's one collective per log interval and come back
    through :meth:`set_reduced`. Messages worth saying once go to ``note(key, message)``.

    Args:
        decay: EMA decay per optimizer step.
        note: called with ``(key, message)``; the caller says each key once.
    """

    def __init__(self, decay: float, note: Callable[[str, str], None] = lambda key, message: None) -> None:
        self.decay = decay
        self.note = note
        self.method: str | None = None
        self.capture: Capture | None = None
        self.ema: DeviceNoiseEMA | None = None
        self.reduced: tuple[float, float, float] | None = None  # m_g2, m_trace, weight averaged over ranks
        self.restored: list[float] | None = None  # EMA state from a checkpoint, applied at start
        self.ddp_hook: DDPCommHookCapture | None = None
        self._ddp_hook_model: Any = None
        self._sizes: list[int] = []  # samples of each micro-batch of the current step

    @property
    def description(self) -> str:
        text = METHOD_DESCRIPTIONS.get(self.method or "", "not measured")
        if isinstance(self.capture, PerExampleNorms):
            text += f"; covers {self.capture.coverage()}"
        return text

    def start(self, method: str, model: nn.Module, device: torch.device | str, ddp_model: Any = None,
              process_group: Any = None) -> bool:
        """Install the capture for ``method``; False (with a note) when it finds nothing to measure."""
        self.remove()
        self._sizes = []
        if method in ("per_example", "per_example_norm"):
            layers = "all" if method == "per_example" else "norm"
            capture: Capture = PerExampleNorms(model, layers=layers)
            if capture.n_modules == 0:
                capture.remove()
                kinds = "Linear, LayerNorm or RMSNorm" if layers == "all" else "LayerNorm or RMSNorm"
                self.note("no_linear", f"{method} found no {kinds} layer with its own trainable weights; use "
                          "gradient accumulation or DDP for a free estimate")
                return False
        elif method == "ddp":
            capture = self._ddp_capture(model, ddp_model, process_group)
        else:
            capture = ParamGradHooks(model.parameters())
        self.method = method
        self.capture = capture
        self.ema = DeviceNoiseEMA(self.decay, device=device)
        self._apply_restored()
        return True

    def _ddp_capture(self, model: nn.Module, ddp_model: Any, process_group: Any) -> Capture:
        """A DDP communication hook (one norm per bucket); per-parameter hooks if one cannot be registered."""
        if self.ddp_hook is not None and self._ddp_hook_model is ddp_model:
            self.ddp_hook.reactivate()  # registered on this very model by an earlier start
            return self.ddp_hook
        if isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            try:
                self.ddp_hook = DDPCommHookCapture(ddp_model, model.parameters(), process_group)
                self._ddp_hook_model = ddp_model
                return self.ddp_hook
            except RuntimeError as exc:  # e.g. the run already registered its own comm hook
                self.note("comm_hook", f"no DDP communication hook ({exc}); using per-parameter hooks, which cost "
                          "one norm per parameter")
        return ParamGradHooks(model.parameters())

    def add_batch(self, samples: Any) -> None:
        """The next micro-batch's size in sequences (0 when unknown, e.g. a packed batch counted on the device)."""
        if self.capture is not None:
            self._sizes.append(samples if isinstance(samples, int) else 0)

    def drop_batch(self) -> None:
        """The last micro-batch was skipped (``training_step`` returned None): it had no backward."""
        if self._sizes:
            self._sizes.pop()

    def end_backward(self) -> None:
        if self.capture is not None:
            self.capture.end_backward()

    def step(self, accumulate: int, automatic: bool, world_size: int, amp_scale: Tensor | None,
             big_sq: Tensor | None = None) -> None:
        """Fold this optimizer step's norms into the EMAs (tensor ops only; no host read).

        Args:
            accumulate: the factor Lightning divided each micro-batch loss by (1 under manual optimization).
            automatic: whether Lightning runs the optimization (how the losses were scaled is known).
            world_size: number of data-parallel ranks.
            amp_scale: the fp16 loss scale when the hooks saw scaled gradients but ``.grad`` is unscaled.
            big_sq: the squared norm of the step's ``.grad`` over the capture's parameters, when the
                caller already took it this step (it is not read twice).
        """
        sizes, self._sizes = self._sizes, []
        if self.capture is None or self.ema is None:
            return
        if isinstance(self.capture, PerExampleNorms):
            per_example, batch, params = self.capture.take_step()
            for message in self.capture.warnings:
                self.note(message, message)
            self.capture.warnings = []
            if per_example is None or batch < 2:
                return
            big = grad_sq_norm(params)
            if big is None:
                return
            # Example i's own gradient is B x its contribution to the batch-mean gradient.
            small, b_small, b_big = per_example * batch, 1, batch
        else:
            total, backwards = self.capture.take_step()
            if total is None or backwards == 0:
                return
            if not automatic and backwards > 1:
                self.note("manual", "skipped: several backwards per step under manual optimization, and how their "
                          "losses were scaled is unknown")
                return
            if len(set(sizes[-backwards:])) != 1 or len(sizes) < backwards:
                return  # unequal micro-batches (a short last batch): the two-size estimator does not apply
            big = big_sq if big_sq is not None else grad_sq_norm(self.capture.params)
            if big is None:
                return
            # Lightning divides each micro-batch loss by accumulate (k); the step's gradient is
            # then (n/k) x the mean of the n micro-batch gradients.
            small = total * (accumulate * accumulate / backwards)
            big = big * (accumulate / backwards) ** 2
            b_small = sizes[-1]
            if b_small <= 0:
                self.note("samples", "skipped: the batch size in sequences is unknown; pass "
                          "ScaleWatch(samples_fn=lambda batch: <number of sequences>)")
                return
            b_big = b_small * backwards * world_size
            if b_big <= b_small:
                return
        if amp_scale is not None:
            small = small / amp_scale.double().square()  # hook gradients carry the loss scale, .grad does not
        self.ema.update(small, big, b_small, b_big)

    def set_reduced(self, summed: Tensor, summed_values: Sequence[float], world_size: int) -> None:
        """Take the EMAs summed over ranks by the log collective (``summed_values``: the same, already on
        the host). Averaging the ranks' EMAs is exact: the estimators are linear in each rank's small norm."""
        if self.ema is None:
            return
        self.ema.state = summed / world_size
        m_g2, m_tr, weight = (v / world_size for v in summed_values)
        self.reduced = (m_g2, m_tr, weight)

    def estimates(self) -> tuple[float, float] | None:
        """``(|G|^2, tr(Sigma))`` of the last reduction, None before the first measured step."""
        if self.reduced is None or self.reduced[2] <= 0:
            return None
        m_g2, m_tr, weight = self.reduced
        return m_g2 / weight, m_tr / weight

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        self.capture = None

    def state_dict(self) -> dict[str, Any] | None:
        """The EMA sums (reduced over ranks at the checkpoint: the same on every rank), or None."""
        state = self.ema.state.tolist() if self.ema is not None else self.restored
        return None if state is None else {"method": self.method, "decay": self.decay, "state": state}

    def load_state_dict(self, saved: dict[str, Any] | Sequence[float] | None) -> None:
        """Restore the EMA sums (the dict :meth:`state_dict` gives, or the bare list it gave before);
        applied when the capture starts (or now, when it runs)."""
        state = saved.get("state") if isinstance(saved, dict) else saved
        if state is not None and len(state) == 3:
            self.restored = [float(v) for v in state]
            self._apply_restored()

    def _apply_restored(self) -> None:
        if self.ema is not None and self.restored is not None:
            self.ema.state = torch.tensor(self.restored, dtype=torch.float64, device=self.ema.state.device)
