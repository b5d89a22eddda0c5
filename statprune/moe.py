"""Mixture-of-experts FFNs: statistics of the tokens routed to each expert, and pinned experts.

A routed MoE block outputs ``y = sum_e w_e(x) * W_e z_e(x)`` over the experts ``e`` the router
picked for token ``x`` (``z_e``: expert e's neuron activations, ``W_e`` its down projection,
``w_e`` its routing weight). Concatenating ``z~ = [w_1 z_1, …, w_E z_E]`` (zero for the experts a
token was not routed to) makes the block one linear map ``y = [W_1 … W_E] z~``: statprune prunes
it as one FFN whose neurons are all the experts' neurons, and each kept neuron's corrected column
goes back into its own expert's down projection, so the pruned block is exact to represent.

Statistics: expert e's Gram is ``sum over the tokens routed to e of w_e² z_e z_eᵀ``, the Gram of
its contribution to the layer output, so the least-squares correction of ``W_e`` fits the
expert's own weighted output on its own tokens. The Grams of different experts are kept apart
(block-diagonal): the selection never explains one expert's neurons by another's. Greedy pivoting
on the block-diagonal Gram orders the neurons of all experts of a layer together (the largest
residual first, whichever expert it is in), so the global allocation spreads a layer's cut over
its experts by their error, and every expert ends with its own width. The Gram is kept as its
blocks and factorized block by block (``statprune.linalg.blocks``: the same order, errors and
corrections as the dense matrix, in ``E·I²`` memory instead of ``(E·I)²``).

An expert that saw fewer routed calibration tokens than it has neurons has a rank-deficient Gram
(its neurons would look removable at no error): it keeps every neuron, with a warning naming the
layer, the expert and the token count (``ExpertGramAccumulator``, :func:`pin_selection`).
"""

from __future__ import annotations

import warnings

import torch

from statprune.calibration import CalibrationWarning
from statprune.linalg.blocks import BlockDiagonalGram
from statprune.linalg.gram import CrossStats, GramAccumulator
from statprune.linalg.interpolative import InterpolativeDecomposition

# rows each expert's Gram accumulator buffers before an update (at least the expert's width):
# E buffers are alive at once, so fewer than a dense FFN's 4096 (scripts/moe_statistics_memory.py,
# Qwen3-30B-A3B's experts: 1.63 GB of buffers at 4096, 0.38 GB at 1024, no measurable slowdown)
EXPERT_BLOCK_ROWS = 1024


class ExpertCrossAccumulator:
    """``ZᵀΔ`` of the routed experts (correction toward the original model), filled expert by
    expert: expert e's rows (``widths[e]`` × ``out_width``, from ``sum(widths[:e])`` in the
    concatenated order) are ``Σ over the tokens routed to e of w_e z_e Δᵀ``, which is what the
    dense ``z~ᵀ Δ`` holds there (``z~`` is zero elsewhere), without the N × sum(widths) ``z~``.

    :meth:`finish` gives the same :class:`~statprune.linalg.gram.CrossStats` as a
    :class:`~statprune.linalg.gram.CrossAccumulator` fed the dense rows: ``cross`` (m × d,
    float64), the column sums of Δ and the token count.
    """

    def __init__(
        self, widths: tuple[int, ...], out_width: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.width, self.out_width = sum(widths), out_width
        self.offsets = [sum(widths[:e]) for e in range(len(widths))]
        self.device, self.compute_dtype = torch.device(device), dtype
        self._cross = torch.zeros(self.width, out_width, dtype=torch.float64, device=self.device)
        self._total = torch.zeros(out_width, dtype=torch.float64, device=self.device)
        self._count = 0

    def add_shifts(self, shift: torch.Tensor) -> None:
        """Count the shifts Δ (n, d) of one call's tokens (their column sums and number)."""
        y = shift.to(device=self.device, dtype=self.compute_dtype)
        sums = y.sum(dim=0, dtype=torch.float64)
        if not torch.isfinite(sums).all():
            raise FloatingPointError("targets contain NaN or Inf")
        self._total += sums
        self._count += shift.shape[0]

    def add_expert(self, expert: int, rows: torch.Tensor, shift: torch.Tensor) -> None:
        """Add expert ``expert``'s weighted rows (n_e, w_e) and its tokens' shifts (n_e, d)."""
        if rows.shape[0] == 0 or rows.shape[1] == 0:
            return
        start = self.offsets[expert]
        z = rows.to(device=self.device, dtype=self.compute_dtype)
        y = shift.to(device=self.device, dtype=self.compute_dtype)
        self._cross[start : start + rows.shape[1]] += (z.T @ y).double()

    def zero(self, rows: torch.Tensor) -> None:
        """Zero the rows ``rows`` (indices into the concatenation)."""
        self._cross[rows.to(self.device)] = 0.0

    def finish(self) -> CrossStats:
        return CrossStats(cross=self._cross, total=self._total, count=self._count)


class ExpertGramAccumulator:
    """Block-diagonal Gram of the routed experts' weighted activations (see the module doc).

    ``widths``: each expert's neuron count; ``name`` names the layer in the warning. Fed by
    :meth:`add_call` with the experts module's call arguments, expert by expert (the module's
    ``routed_activations``: each expert's rows on its own tokens only, never the dense
    N × sum(widths) ``z~``); :meth:`finish` gives a
    :class:`~statprune.linalg.blocks.BlockDiagonalGram` (one w × w block per expert, never the
    dense ``sum(widths)`` square) over all ``count`` real tokens, with the blocks of starved
    experts zeroed; ``pinned`` then lists their neurons (indices into the concatenation).
    Its column sums are zero: bias compensation (the next bias absorbing the mean
    of what is removed) does not apply to routed experts, since one bias added to every token
    cannot stand for a mean that each expert contributes only on its own tokens, and centering
    the block-diagonal Gram by the means of all tokens would couple the experts (and lose
    positive semi-definiteness).

    With ``correction_target original``, :meth:`track_targets` adds an
    :class:`ExpertCrossAccumulator` (``targets``) that :meth:`add_call` fills from the same
    rows when given the shifts Δ.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype,
        name: str = "",
        block_rows: int = EXPERT_BLOCK_ROWS,
    ) -> None:
        self.widths, self.name = tuple(int(w) for w in widths), name
        self.width = sum(self.widths)
        self.device, self.dtype = torch.device(device), dtype
        self.blocks = [GramAccumulator(w, device, dtype, block_rows) for w in self.widths]
        self.tokens = [0] * len(self.widths)  # routed real tokens per expert
        self._count = 0
        self._finished: BlockDiagonalGram | None = None
        self.pinned = torch.zeros(0, dtype=torch.long)
        self.targets: ExpertCrossAccumulator | None = None  # ZᵀΔ (correction toward the original model)

    @property
    def count(self) -> int:
        return self._count

    def track_targets(self, out_width: int) -> ExpertCrossAccumulator:
        """Start accumulating ``ZᵀΔ`` for shifts Δ of width ``out_width`` (see :meth:`add_call`)."""
        self.targets = ExpertCrossAccumulator(self.widths, out_width, self.device, self.dtype)
        return self.targets

    def add_call(
        self,
        module: torch.nn.Module,
        args: tuple,
        mask: torch.Tensor,
        shift: torch.Tensor | None = None,
    ) -> None:
        """Add one call of the experts module (``args``: hidden states (N, H), top-k indices and
        weights (N, k), for Qwen2-MoE the shared expert's gate (N, 1)) restricted to the real
        tokens ``mask`` (N,) bool, one expert at a time: the largest activation tensor held is
        one expert's rows on its routed real tokens (n_e × w_e). ``shift`` (n real tokens, d):
        the shifts Δ of those tokens (in order) for ``targets``, which needs them."""
        if self._finished is not None:
            raise RuntimeError("this accumulator is finished; start a new one")
        if (shift is None) != (self.targets is None):
            raise ValueError("give the shifts exactly when the target statistics are tracked")
        n = mask.shape[0]
        args = tuple(a[mask] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a for a in args)
        self._count += args[0].shape[0]
        if shift is not None:
            self.targets.add_shifts(shift)
        for e, tokens, rows in module.routed_activations(*args):
            self.tokens[e] += tokens.numel()
            if self.widths[e]:
                self.blocks[e].add_batch(rows)
                if shift is not None:
                    self.targets.add_expert(e, rows, shift[tokens.to(shift.device)])
            del tokens, rows  # before the next expert's rows are computed

    def starved(self) -> list[int]:
        """Experts with fewer routed tokens than neurons."""
        return [e for e, (n, w) in enumerate(zip(self.tokens, self.widths, strict=True)) if n < w]

    def finish(self) -> BlockDiagonalGram:
        """The experts' Grams as one :class:`~statprune.linalg.blocks.BlockDiagonalGram` (memory
        ``8 Σ widths²`` bytes, never ``8 (Σ widths)²``), starved experts' blocks zeroed (and
        their rows of ``targets``: nothing to refit on them)."""
        if self._finished is not None:
            return self._finished
        starved, pinned, blocks, start = set(self.starved()), [], [], 0
        for e, (acc, width) in enumerate(zip(self.blocks, self.widths, strict=True)):
            if e in starved:
                pinned.extend(range(start, start + width))
                blocks.append(torch.zeros(width, width, dtype=torch.float64, device=self.device))
            else:
                blocks.append(acc.finish().gram)
            start += width
        for e in sorted(starved):
            warnings.warn(
                CalibrationWarning(
                    f"{self.name} expert {e} was routed only {self.tokens[e]} calibration tokens for its "
                    f"{self.widths[e]} neurons: it keeps them all; give more calibration data to prune it"
                ),
                stacklevel=2,
            )
        self.pinned = torch.tensor(pinned, dtype=torch.long)
        if self.targets is not None and pinned:
            self.targets.zero(self.pinned)
        self.blocks = []  # the result holds the blocks now
        total = torch.zeros(self.width, dtype=torch.float64, device=self.device)
        self._finished = BlockDiagonalGram(blocks=tuple(blocks), total=total, count=self._count)
        return self._finished


def pin_selection(selection: InterpolativeDecomposition, stats: object) -> InterpolativeDecomposition:
    """``selection`` with the pinned neurons of ``stats`` (an :class:`ExpertGramAccumulator`,
    after ``finish``) kept first, whatever the count; unchanged for any other statistics.

    Their Gram rows are zero, so they never reduce the error: ``errors[c]`` for ``c`` at least
    their number is the error of the other neurons kept in the original order; fewer than that
    would remove pinned neurons, priced far above any real error so the allocation never does.
    """
    pinned = getattr(stats, "pinned", None)
    if pinned is None or pinned.numel() == 0:
        return selection
    is_pinned = torch.zeros(selection.order.numel(), dtype=torch.bool)
    is_pinned[pinned] = True
    flags = is_pinned[selection.order]
    others = selection.order[~flags]
    # errors after each count of the other neurons: the old curve where the j-th other one is kept
    positions = torch.nonzero(~flags).flatten() + 1
    tail = torch.cat([selection.errors[:1], selection.errors[positions]])
    n = int(is_pinned.sum())
    penalty = max(float(selection.errors[0]), 1e-30) * 1e6
    head = tail[0] + penalty * torch.arange(n, 0, -1, dtype=torch.float64)
    errors = torch.cat([head, tail])
    errors[-1] = 0.0  # every neuron kept
    rank = min(selection.rank + n, selection.order.numel())
    return InterpolativeDecomposition(order=torch.cat([pinned, others]), errors=errors, rank=rank)


# public configs (config.json on the Hugging Face Hub): hidden_size, experts, expert FFN width
# (OLMoE: num_experts, intermediate_size; Qwen3-MoE: num_experts, moe_intermediate_size;
# Mixtral: num_local_experts, intermediate_size), experts per token, layers
PUBLIC_MOE_CONFIGS = {
    "OLMoE-1B-7B-0924": (2048, 64, 1024, 8, 16),
    "Qwen3-30B-A3B": (2048, 128, 768, 8, 48),
    "Mixtral-8x7B-v0.1": (4096, 8, 14336, 2, 32),
}


def statistics_memory(
    hidden: int, experts: int, width: int, top_k: int, block_rows: int = EXPERT_BLOCK_ROWS
) -> dict[str, int]:
    """Bytes of one MoE layer's neuron statistics for ``experts`` experts of ``width`` neurons,
    ``top_k`` experts per token and hidden size ``hidden`` (Gram and cross statistics in float64,
    rows in float32).

    ``dense``: the former peak, the (E·I)² Gram plus the two temporaries of its column-scaled copy
    in ``select_columns`` (``g * outer(s, s)``: 3 × 8 (E·I)²); ``blockwise``: the E blocks plus
    one block's two such temporaries (8 E·I² + 2 × 8 I²); ``buffers_before``/``buffers``: the
    rows each expert's Gram accumulator buffers before an update, ``4 E·I·max(rows, I)`` for the
    former 4096 rows and for ``block_rows`` (``EXPERT_BLOCK_ROWS``); ``cross``: ``ZᵀΔ``
    (8 E·I·H), only with ``correction_target original``, unchanged (each expert's I × H rows are
    needed for its refit); ``rows_per_1k_tokens``: the former routing-weighted activations ``z~``
    of a batch, dense (4 × 1000 × E·I per thousand tokens of the batch);
    ``expert_rows_per_1k_tokens``: what replaced it, the rows of the one expert being added
    (``ExpertGramAccumulator.add_call``) on its routed tokens, 4 × 1000 × (k/E) × I per thousand
    batch tokens under balanced routing (at most 4 × 1000 × I, if one expert got every token).
    """
    m = experts * width
    return {
        "dense": 3 * 8 * m * m,
        "blockwise": 8 * experts * width * width + 2 * 8 * width * width,
        "buffers_before": 4 * m * max(4096, width),
        "buffers": 4 * m * max(block_rows, width),
        "cross": 8 * m * hidden,
        "rows_per_1k_tokens": 4 * 1000 * m,
        "expert_rows_per_1k_tokens": 4 * 1000 * top_k * width // experts,
    }


def memory_table(configs: dict[str, tuple[int, ...]] = PUBLIC_MOE_CONFIGS) -> str:
    """The Markdown table of :func:`statistics_memory` per layer for ``configs`` (docs/MOE.md),
    in GB (10⁹ bytes), the last column in MB (10⁶ bytes)."""
    keys = ("dense", "blockwise", "buffers_before", "buffers", "cross", "rows_per_1k_tokens")
    lines = [
        "| model | H | E | I | k | layers | Gram peak before | Gram peak after | row buffers before "
        "| row buffers after | ZᵀΔ (original target) | z~ per 1k batch tokens before "
        "| one expert's rows per 1k batch tokens after (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (hidden, experts, width, top_k, layers) in configs.items():
        mem = statistics_memory(hidden, experts, width, top_k)
        cells = [name, hidden, experts, width, top_k, layers, *(f"{mem[k] / 1e9:.3g}" for k in keys)]
        cells.append(f"{mem['expert_rows_per_1k_tokens'] / 1e6:.3g}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
