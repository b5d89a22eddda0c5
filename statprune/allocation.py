"""Global allocation: how many heads and neurons each layer keeps under one budget.

Every layer's factorizations price each possible count (``errors[c]``: reconstruction error when
keeping ``c`` units). Cutting along each block's lower convex hull of (cost, error) in order of
increasing error per unit of cost saved minimizes the total weighted error for the cost removed
(the Lagrangian solution); the last cut is refined to the largest count that still meets the
budget. ``uniform`` keeps the same fraction of heads and neurons in every layer instead.

What a unit costs comes from the budget kind's cost model (:class:`CostModel`): FLOPs or
parameters from ``statprune.flops``'s accounting (:class:`Accounting`), or latency measured on
this machine (``statprune.latency.LatencyCost``, Kwon et al. 2022's lookup tables). The greedy is
the same for every kind.

Shared experts (Qwen2-MoE): a layer's FFN neurons are its routed experts' and its shared
expert's, and under a FLOPs budget a shared neuron costs ``E/k`` routed ones, so a count alone
does not price the layer. Its two groups have their own error curves (the Gram is
block-diagonal: errors add up over the groups), merged by error reduction per unit of cost into
one order whose first ``c`` units hold a known number of shared neurons; the curve prices each
count by that split (:func:`curve_from_errors`), and the allocation hands the split on with the
count (:class:`SplitCount`) so that the pruning keeps exactly those, whatever order its own
selection gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from statprune.errors import BudgetError
from statprune.flops import LayerShape, dense_counts


class CostModel:
    """What a model with given per-layer widths costs, in the budget kind's unit.

    ``layer_cost(shape, heads, neurons)``: one layer's cost; ``fixed``: what no pruning changes
    (embeddings, task head, per-call overheads; 0 for FLOPs and parameters, which count only
    attention and FFN). Subclasses: :class:`Accounting` (``flops``, ``params``) and
    ``statprune.latency.LatencyCost`` (``latency``, milliseconds)."""

    kind: str = ""
    fixed: float = 0.0

    def layer_cost(self, shape: LayerShape, heads: int, neurons: int) -> float:
        raise NotImplementedError

    def block_cost(self, shape: LayerShape, block: str, count: int) -> float:
        """Cost added by ``count`` heads (``block='heads'``) or neurons of one layer."""
        if block == "heads":
            return self.layer_cost(shape, count, 0) - self.layer_cost(shape, 0, 0)
        return self.layer_cost(shape, 0, count) - self.layer_cost(shape, 0, 0)

    def total(self, shapes: Sequence[LayerShape], counts: Sequence[tuple[int, int]]) -> float:
        """``fixed`` plus every layer's cost; layer ``i`` keeps ``counts[i] = (heads, neurons)``."""
        return self.fixed + sum(self.layer_cost(s, h, n) for s, (h, n) in zip(shapes, counts, strict=True))


class Accounting(CostModel):
    """FLOPs (at ``seq_len`` tokens) or parameters of the attention and FFN projections
    (``LayerShape.cost``; integers)."""

    def __init__(self, kind: str, seq_len: int) -> None:
        if kind not in ("flops", "params"):
            raise ValueError(f"unknown cost kind {kind!r}")
        self.kind, self.seq_len = kind, seq_len

    def layer_cost(self, shape: LayerShape, heads: int, neurons: int, shared: int | None = None) -> float:
        return shape.cost(heads, neurons, self.kind, self.seq_len, shared)


def check_prices(model: CostModel, shapes: Sequence[LayerShape]) -> None:
    """``OptionsError`` for a cost model that prices neurons by count alone (latency tables) on
    a model with shared experts, whose neurons do not all cost the same."""
    if not isinstance(model, Accounting) and any(s.ffn_shared for s in shapes):
        from statprune.errors import OptionsError

        raise OptionsError(
            f"--keep-{model.kind or 'latency'} prices a layer's FFN neurons by their count, and a shared "
            "expert's neurons (Qwen2-MoE) cost more than a routed expert's: use --keep-flops or --keep-params"
        )


class SplitCount(int):
    """A layer's kept neuron count that also fixes how many are shared-expert neurons.

    ``shared`` of the ``int(self)`` kept neurons are shared-expert neurons, whose indices start at
    ``first`` (the shared experts come last in the concatenation). Handed to a selection's
    ``keep`` (``InterpolativeDecomposition.keep`` asks for :meth:`arrange`), it keeps the first
    ``shared`` shared neurons and the first ``int(self) - shared`` routed ones of the selection's
    order, so the pruned layer costs what the allocation priced."""

    shared: int
    first: int

    def __new__(cls, count: int, shared: int, first: int) -> SplitCount:
        obj = super().__new__(cls, count)
        obj.shared, obj.first = int(shared), int(first)
        return obj

    def __reduce__(self):
        return SplitCount, (int(self), self.shared, self.first)

    def arrange(self, order: torch.Tensor) -> torch.Tensor:
        """``order`` (every neuron index once) rearranged so that its first ``int(self)`` entries
        are the kept ones; each group keeps its own order."""
        is_shared = order >= self.first
        shared, routed = order[is_shared], order[~is_shared]
        n = int(self) - self.shared
        return torch.cat([shared[: self.shared], routed[:n], shared[self.shared :], routed[n:]])


def cost_model(kind: str | CostModel, seq_len: int) -> CostModel:
    """``kind`` itself when it is a cost model, else the accounting of ``flops`` / ``params``."""
    return kind if isinstance(kind, CostModel) else Accounting(kind, seq_len)


@dataclass(frozen=True)
class BlockCurve:
    """Error of keeping each allowed count of one block (a layer's heads or its neurons)."""

    layer: int
    kind: str  # "heads" or "neurons"
    counts: list[int]  # allowed counts, ascending, from 0 to the current width
    errors: list[float]  # weighted error for each count (non-increasing)
    costs: list[float]  # cost of the block at each count (the budget kind's unit)
    # neurons of a layer with shared experts: how many of each count's kept neurons are shared
    shared: list[int] | None = None


def allowed_neuron_counts(width: int, multiple: int = 1) -> list[int]:
    """0, every multiple of ``multiple`` below ``width``, and ``width`` itself."""
    return sorted({0, width, *range(multiple, width, multiple)})


def _lower_hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """Lower convex hull of (cost, error, count) points sorted by cost ascending."""
    hull: list[tuple[int, float, int]] = []
    for p in points:
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> p
            if (e2 - e1) * (p[0] - c1) >= (p[1] - e1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    shapes: list[LayerShape],
    curves: list[BlockCurve],
    kind: str | CostModel,
    keep: float,
    seq_len: int,
    method: str = "greedy",
    reserve: float = 0.0,
) -> list[tuple[int, int]]:
    """Per-layer ``(heads, neurons)`` kept so that the cost is at most ``keep`` × dense cost.

    ``kind``: ``flops``, ``params`` or a :class:`CostModel` (e.g. latency); the block curves'
    costs must come from the same model. ``curves`` holds the prunable blocks (a block without a
    curve keeps its width). ``reserve`` is cost the pruning itself may add outside the curves
    (biases created by bias compensation). ``BudgetError`` when even removing every prunable unit
    does not reach the budget (the message gives the reachable floor).
    """
    if not 0.0 < keep <= 1.0:
        raise BudgetError(f"budget {keep} is outside (0, 1]: give the fraction to keep, e.g. 0.6")
    model = cost_model(kind, seq_len)
    check_prices(model, shapes)
    dense = dense_counts(shapes)
    dense_cost = model.total(shapes, dense)
    target = keep * dense_cost - reserve
    counts = [list(c) for c in dense]
    slot = {"heads": 0, "neurons": 1}
    floor = [list(c) for c in dense]
    for curve in curves:
        floor[curve.layer][slot[curve.kind]] = 0
    floor_cost = model.total(shapes, [tuple(c) for c in floor])
    if floor_cost > target:
        raise floor_error(
            model,
            keep,
            (floor_cost + reserve) / dense_cost,
            {c.kind for c in curves},
            reserve / dense_cost,
            floor_cost,
            dense_cost,
        )
    if keep >= 1.0:
        return [tuple(c) for c in dense]

    state = _Counts(curves, counts, slot, dense_cost)
    if method == "uniform":
        _allocate_uniform(curves, state, target)
    elif method == "greedy":
        _allocate_greedy(curves, state, target)
        _refill(curves, state, target)
        from statprune.guards import fill_budget  # slack a coarse last cut could not spend

        fill_budget(shapes, curves, state, target, dense_cost)
    else:
        raise ValueError(f"unknown allocation method {method!r}")
    for curve in curves:  # shared experts: the count carries the split the curve priced
        if curve.shared is not None:
            n = counts[curve.layer][1]
            shape = shapes[curve.layer]
            shared = curve.shared[curve.counts.index(n)]
            counts[curve.layer][1] = SplitCount(n, shared, shape.ffn_width - shape.ffn_shared)
    result = [tuple(c) for c in counts]
    if all(h == 0 and n == 0 for h, n in result):
        raise BudgetError(f"budget {keep} would remove every head and neuron of the model; raise the budget")
    return result


class _Counts:
    """Current per-layer counts and their total cost, updated incrementally."""

    def __init__(self, curves: list[BlockCurve], counts: list[list[int]], slot: dict, cost: float):
        self.counts, self.slot, self.cost = counts, slot, cost
        self.block_cost = [dict(zip(c.counts, c.costs, strict=True)) for c in curves]

    def set(self, ci: int, curve: BlockCurve, count: int) -> None:
        idx = self.slot[curve.kind]
        old = self.counts[curve.layer][idx]
        self.cost += self.block_cost[ci][count] - self.block_cost[ci][old]
        self.counts[curve.layer][idx] = count


def _allocate_greedy(curves: list[BlockCurve], state: _Counts, target: float) -> None:
    segments = []  # (slope, curve index, step, from_count, to_count)
    for ci, curve in enumerate(curves):
        points = sorted(zip(curve.costs, curve.errors, curve.counts, strict=True))
        hull = _lower_hull(points)
        # walk from the full width down: each step saves (cost) at the price of (error)
        for j in range(len(hull) - 1, 0, -1):
            (c_lo, e_lo, n_lo), (c_hi, e_hi, n_hi) = hull[j - 1], hull[j]
            slope = (e_lo - e_hi) / max(c_hi - c_lo, 1e-30)
            segments.append((slope, ci, len(hull) - j, n_hi, n_lo))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    for _, ci, _, n_hi, n_lo in segments:
        if state.cost <= target:
            return
        curve = curves[ci]
        state.set(ci, curve, n_lo)
        if state.cost <= target:
            # refine: the largest allowed count in (n_lo, n_hi) that still meets the budget
            for n in sorted((c for c in curve.counts if n_lo < c < n_hi), reverse=True):
                state.set(ci, curve, n)
                if state.cost <= target:
                    return
            state.set(ci, curve, n_lo)
            return


def _refill(curves: list[BlockCurve], state: _Counts, target: float) -> None:
    """Spend the slack a coarse last cut left: add back the units that buy the most error
    reduction per unit of cost, while the budget still holds."""
    position = [c.counts.index(state.counts[c.layer][state.slot[c.kind]]) for c in curves]
    while True:
        best, best_gain = -1, 0.0
        for ci, curve in enumerate(curves):
            j = position[ci]
            if j + 1 >= len(curve.counts):
                continue
            extra = curve.costs[j + 1] - curve.costs[j]
            if state.cost + extra > target:
                continue
            gain = (curve.errors[j] - curve.errors[j + 1]) / max(extra, 1e-30)
            if gain > best_gain:
                best, best_gain = ci, gain
        if best < 0:
            return
        position[best] += 1
        state.set(best, curves[best], curves[best].counts[position[best]])


def _allocate_uniform(curves: list[BlockCurve], state: _Counts, target: float) -> None:
    def apply(fraction: float) -> None:
        for ci, curve in enumerate(curves):
            allowed = [c for c in curve.counts if c <= fraction * curve.counts[-1] + 1e-9]
            state.set(ci, curve, max(allowed) if allowed else 0)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        apply(mid)
        if state.cost <= target:
            lo = mid
        else:
            hi = mid
    apply(lo)


def bias_reserve(
    shapes: list[LayerShape], curves: Sequence[BlockCurve | tuple[int, str]], kind: str, enabled: bool
) -> int:
    """Parameters that bias compensation may add (``enabled``: the method folds a correction with
    bias compensation): a bias on each pruned block that had none. 0 for FLOPs budgets.
    ``curves``: the prunable blocks, as curves or ``(layer, "heads" | "neurons")``."""
    if kind != "params" or not enabled:
        return 0
    reserve = 0
    for curve in curves:
        layer, block = (curve.layer, curve.kind) if isinstance(curve, BlockCurve) else curve
        shape = shapes[layer]
        has_bias = shape.o_bias if block == "heads" else shape.ffn_out_bias
        reserve += 0 if has_bias else shape.hidden
    return reserve


# ------------------------------------------------------------------------- the reachable floor

_UNITS = {
    "flops": "attention+FFN FLOPs",
    "params": "attention+FFN parameters",
    "latency": "latency",
}


def share(fraction: float) -> str:
    """A fraction as a percentage with enough digits to tell it from its neighbours: ``63.2%``,
    ``0.81%``, ``0.032%``."""
    if fraction <= 0:
        return "0%"
    if fraction >= 0.1:
        return f"{fraction:.1%}"
    if fraction >= 0.01:
        return f"{fraction:.2%}"
    return f"{fraction * 100:.2g}%"


def smallest_budget(floor: float) -> float:
    """The floor rounded up to a budget one can type: two decimals (more below 1 %)."""
    digits = 2 if floor >= 0.01 else 1 - math.floor(math.log10(max(floor, 1e-12)))
    scale = 10**digits
    return min(1.0, math.ceil(floor * scale - 1e-9) / scale)


def floor_error(
    model: CostModel | str,
    keep: float,
    floor: float,
    prunable: set[str] | Sequence[str],
    reserve: float = 0.0,
    floor_cost: float | None = None,
    dense_cost: float | None = None,
    name: str | None = None,
) -> BudgetError:
    """The error for a budget below the reachable floor, saying which budget, what the floor is
    made of, the smallest budget that can be met and what else to change.

    ``floor``: the fraction of the dense cost left with every prunable unit removed, bias
    compensation's ``reserve`` (a fraction too) included; ``prunable``: ``heads`` / ``neurons``;
    ``name``: how the budget was given (default: ``--keep-KIND`` / ``keep_KIND=``)."""
    from statprune.guards import option

    kind = model if isinstance(model, str) else model.kind
    prunable = set(prunable)
    removed = {
        frozenset({"heads", "neurons"}): "every attention head and FFN neuron",
        frozenset({"heads"}): "every attention head (the FFN neurons stay)",
        frozenset({"neurons"}): "every FFN neuron (the attention heads stay)",
    }.get(frozenset(prunable), "nothing (nothing may be pruned)")

    def given(value: float) -> str:
        return f"{name} {value:g}" if name else option(f"keep_{kind}", float(f"{value:g}"))

    text = (
        f"{given(keep)} is below what can be reached: removing {removed} "
        f"still keeps {share(floor - reserve)} of the dense model's {_UNITS.get(kind, kind)}"
    )
    key = getattr(getattr(model, "table", None), "key", None)
    if kind == "latency" and floor_cost is not None and dense_cost is not None:
        where = f" at batch {key['batch']} x {key['seq_len']} tokens" if key and "batch" in key else ""
        where += f" on {key['device']}" if key and key.get("device") else ""
        table = getattr(model, "table", None)
        cached = (
            f"; cached in {table.path}: delete it to measure again if this machine's load has changed"
            if getattr(table, "source", None) == "cache" and getattr(table, "path", None)
            else ""
        )
        text += (
            f" ({floor_cost:.1f} of {dense_cost:.1f} ms by the lookup tables{where}: embeddings, "
            f"task head and each layer's norms and residuals{cached})"
        )
    if reserve > 0:
        text += f", and bias compensation adds {share(reserve)} (a bias for each pruned block without one)"
    lowest = smallest_budget(floor)
    if lowest >= 1.0:
        text += "; no budget below the dense model can be met"
    else:
        text += f"; the smallest reachable budget is {share(floor)}: give {given(lowest)} or more"
    others = {"heads", "neurons"} - prunable
    if others:
        text += f", or let {' and '.join(sorted(others))} go too with {option('prune', 'heads,neurons')}"
    if reserve > 0:
        text += f", or {option('bias_compensation', False)}"
    return BudgetError(text)


def adds_biases(plan) -> bool:
    """Whether compressing under ``plan`` (``statprune.pipeline.records.Plan``) may add biases
    that a params budget must reserve: its method allocates with the shared greedy
    (``PruningMethod.allocate``) and folds corrections with bias compensation."""
    from statprune.methods.base import PruningMethod

    method, options = plan.method, plan.options
    shared = type(method).allocate is PruningMethod.allocate
    return shared and method.corrects and options.correction and options.bias_compensation


def check_reachable(
    shapes: list[LayerShape],
    kind: str | CostModel,
    keep: float,
    seq_len: int,
    prune: Sequence[str],
    bias_compensation: bool = False,
    name: str | None = None,
) -> float:
    """Refuse, before any calibration, a budget that no allocation can meet: removing every unit
    ``prune`` allows (``heads``, ``neurons``) of every layer must reach ``keep`` × the dense cost
    (plus, for a params budget with ``bias_compensation``, the biases it may add). Returns the
    reachable floor (a fraction of the dense cost); raises :func:`floor_error`'s ``BudgetError``.
    The same test :func:`allocate` makes once the curves are known, from the shapes alone."""
    model = cost_model(kind, seq_len)
    check_prices(model, shapes)
    dense = dense_counts(shapes)
    dense_cost = model.total(shapes, dense)
    floor = [(0 if "heads" in prune else h, 0 if "neurons" in prune else n) for h, n in dense]
    blocks = [(i, b) for i in range(len(shapes)) for b in ("heads", "neurons") if b in prune]
    reserve = bias_reserve(shapes, blocks, model.kind, bias_compensation)
    floor_cost = model.total(shapes, floor)
    if dense_cost <= 0:
        return 1.0
    if floor_cost > keep * dense_cost - reserve:
        raise floor_error(
            model,
            keep,
            (floor_cost + reserve) / dense_cost,
            prune,
            reserve / dense_cost,
            floor_cost,
            dense_cost,
            name,
        )
    return (floor_cost + reserve) / dense_cost


def curve_from_errors(
    layer: int,
    kind: str,
    shape: LayerShape,
    errors: torch.Tensor,
    weight: float,
    cost_kind: str | CostModel,
    seq_len: int,
    multiple: int = 1,
    order: torch.Tensor | None = None,
) -> BlockCurve:
    """Build a block curve from an error curve indexed by count (heads per group or neurons);
    each count's cost from ``cost_kind`` (``flops``, ``params`` or a :class:`CostModel`).

    ``order``: the neurons in the order ``errors`` keeps them (the selection's ``order``), needed
    for a layer with shared experts (``shape.ffn_shared``): see :func:`merge_by_price`."""
    model = cost_model(cost_kind, seq_len)
    if kind == "neurons" and shape.ffn_shared:
        check_prices(model, [shape])
        if order is None:
            raise ValueError("a layer with shared experts needs the selection's order")
        first = shape.ffn_width - shape.ffn_shared
        routed_price = model.layer_cost(shape, 0, 1, 0) - model.layer_cost(shape, 0, 0, 0)
        shared_price = model.layer_cost(shape, 0, 1, 1) - model.layer_cost(shape, 0, 0, 0)
        merged, shared = merge_by_price(errors, order >= first, shared_price, routed_price)
        counts = allowed_neuron_counts(len(errors) - 1, multiple)
        base = model.layer_cost(shape, 0, 0, 0)
        costs = [model.layer_cost(shape, 0, n, shared[n]) - base for n in counts]
        errs = [weight * float(merged[n]) for n in counts]
        return BlockCurve(layer, kind, counts, errs, costs, [shared[n] for n in counts])
    if kind == "heads":
        per_group = list(range(len(errors)))
        counts = [r * shape.groups for r in per_group]
        costs = [model.block_cost(shape, "heads", h) for h in counts]
        errs = [weight * float(errors[r]) for r in per_group]
    else:
        counts = allowed_neuron_counts(len(errors) - 1, multiple)
        costs = [model.block_cost(shape, "neurons", n) for n in counts]
        errs = [weight * float(errors[n]) for n in counts]
    return BlockCurve(layer=layer, kind=kind, counts=counts, errors=errs, costs=costs)


def merge_by_price(
    errors: torch.Tensor, is_shared: torch.Tensor, shared_price: float, routed_price: float
) -> tuple[torch.Tensor, list[int]]:
    """Re-merge a layer's neuron order so that each step buys the most error per unit of cost.

    ``errors[c]``: error keeping the first ``c`` neurons of the selection's order (``m + 1``
    values); ``is_shared[j]``: whether its ``j``-th neuron is a shared-expert one. The routed and
    shared groups have block-diagonal statistics, so step ``j``'s error reduction
    ``errors[j] - errors[j + 1]`` belongs to its group alone and the error of keeping the first
    ``a`` shared and ``b`` routed neurons (each group in its own order) is ``errors[0]`` minus
    those reductions. Merging the groups by reduction / price (the larger first; routed first on
    a tie) gives the errors of the merged order, ``(m + 1,)`` float64, and the number of shared
    neurons among its first ``c``, for every ``c``."""
    errors = errors.detach().double().cpu()
    drops = (errors[:-1] - errors[1:]).tolist()
    flags = is_shared.cpu().tolist()
    groups = {
        True: [d for d, f in zip(drops, flags, strict=True) if f],
        False: [d for d, f in zip(drops, flags, strict=True) if not f],
    }
    price = {True: max(shared_price, 1e-30), False: max(routed_price, 1e-30)}
    nxt = {True: 0, False: 0}
    merged, shared, error, count = [float(errors[0])], [0], float(errors[0]), 0
    for _ in drops:
        options = [g for g in (False, True) if nxt[g] < len(groups[g])]
        pick = max(options, key=lambda g: (groups[g][nxt[g]] / price[g], not g))
        error -= groups[pick][nxt[pick]]
        nxt[pick] += 1
        count += pick
        merged.append(error)
        shared.append(count)
    merged[-1] = float(errors[-1])  # every neuron kept: exactly as the selection says
    return torch.tensor(merged, dtype=torch.float64), shared
