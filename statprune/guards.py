"""Guards against inputs that the model or the method cannot honestly handle.

Four kinds, each checked in one place and used by every command (``compress``, ``sweep``,
``eval``, ``bench``) and the Python API:

- **option names** (:func:`option`): a message names ``--batch-size 1`` under the CLI and
  ``batch_size=1`` in the Python API; the CLI switches with :func:`cli_option_names`;
- **model limits** (:func:`max_positions`, :func:`check_seq_len`): a sequence length beyond the
  position table is refused naming the limit; beyond a sliding attention window it warns that the
  FLOPs are counted for full attention;
- **non-finite values** (:func:`require_finite`, :func:`non_finite`): NaN or Inf anywhere in
  calibration (activations, logits, sampled labels, gradients, Gram sums) stops with one
  :class:`~statprune.errors.ModelError` line, suggesting float32 when the model runs in half
  precision (whose range, ±65504 in float16, is what overflows);
- **degenerate calibration data** (:func:`check_calibration`, :func:`sensitivity_problem`):
  duplicated or near-constant examples and, for causal LMs, examples without a next token to
  predict are reported with numbers (:class:`~statprune.calibration.CalibrationWarning`); a loss
  gradient that is zero or degenerate falls back to the residual layer weighting instead of
  deciding the allocation;

and the allocation's **budget fill** (:func:`fill_budget`): when the Lagrangian cut leaves more
than ``BUDGET_TOLERANCE`` of the budget unspent (coarse head steps that the statistics price as
free, e.g. on duplicated data), the cheapest exchange that spends it is taken.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from statprune.errors import DataError, ModelError

if TYPE_CHECKING:
    from statprune.allocation import BlockCurve
    from statprune.calibration import CalibrationBatch
    from statprune.flops import LayerShape

__all__ = [
    "BUDGET_TOLERANCE",
    "LimitWarning",
    "check_calibration",
    "check_count",
    "check_seq_len",
    "cli_option_names",
    "fill_budget",
    "max_positions",
    "next_token_targets",
    "non_finite",
    "option",
    "require_finite",
    "sensitivity_problem",
]


class LimitWarning(UserWarning):
    """An option goes beyond what the model was built for, but the run can proceed."""


# ---------------------------------------------------------------------------------- option names

_CLI = contextvars.ContextVar("statprune_cli_option_names", default=False)
_NO_VALUE = object()
# keywords whose CLI flag is not "--" + the keyword with dashes
_FLAGS = {"calib_path": "--data", "eval_path": "--eval", "data": "--data"}
# switches the CLI turns off with a --no-… flag (given the value False)
_NEGATED = {"bias_compensation": "--no-bias-compensation"}
# API spellings that are not ``keyword=value`` (the dtype is chosen when loading the model)
_API = {
    "dtype": lambda value: f"model.to(torch.{value})",
    "prune": lambda value: f"prune={tuple(value.split(','))!r}",  # a tuple in the API
}


@contextlib.contextmanager
def cli_option_names() -> Iterator[None]:
    """Within this context, :func:`option` spells options as the CLI's flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option(name: str, value: Any = _NO_VALUE) -> str:
    """How the user sets option ``name`` (a keyword of the Python API), optionally to ``value``:
    ``--batch-size 1`` under the CLI, ``batch_size=1`` in the Python API (a switch's ``True``
    is the bare flag, ``--pack``)."""
    if _CLI.get():
        if value is False and name in _NEGATED:
            return _NEGATED[name]
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is _NO_VALUE or value is True else f"{flag} {value}"
    if value is _NO_VALUE:
        return name
    if name in _API:
        return _API[name](value)
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


# ---------------------------------------------------------------------------------- model limits


def max_positions(model) -> int | None:
    """The longest sequence ``model`` supports: the rows of a learned position table (less the
    padding offset where positions start after the pad id; ``ModelAdapter.max_positions``), else
    the config's ``max_position_embeddings`` (the length a rotary decoder was built and trained
    for); None when neither is known."""
    from statprune.adapters import adapter_class

    limit = adapter_class(model.config).max_positions(model)
    if limit is not None:
        return int(limit)
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def sliding_window(config) -> int | None:
    """Tokens a sliding-window attention layer sees (Mistral, Qwen2 when enabled, Gemma2/3,
    ModernBERT's local layers; ``ModelAdapter.sliding_window``), else None."""
    from statprune.adapters import adapter_class

    return adapter_class(config).sliding_window(config)


def check_seq_len(model, seq_len: int, name: str = "seq_len") -> int:
    """Refuse a sequence length the model cannot run; warn past a sliding window. Returns it.

    Raises ``ModelError`` naming the limit when ``seq_len`` exceeds :func:`max_positions`
    (learned tables crash beyond it; rotary decoders run but were never trained there, and FLOPs
    would be counted at a length the model cannot serve). Warns :class:`LimitWarning` when it
    exceeds a sliding attention window (the FLOPs accounting assumes full attention)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"{option(name)} must be a positive integer, not {seq_len!r}")
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ModelError(
            f"{option(name, seq_len)} exceeds the {limit} positions of this model; "
            f"pass {option(name, limit)} or less"
        )
    window = sliding_window(model.config)
    if window is not None and seq_len > window:
        warnings.warn(
            LimitWarning(
                f"{option(name, seq_len)} exceeds the model's sliding attention window of {window} "
                "tokens: attention FLOPs are counted as full attention over the whole sequence"
            ),
            stacklevel=2,
        )
    return seq_len


def check_count(requested: int | None, available: int, name: str, what: str = "examples") -> int:
    """How many of ``available`` items to use when ``requested`` were asked for (``name``: the
    option): all of them, with a :class:`LimitWarning` naming both numbers, when there are fewer."""
    if requested is None:
        return available
    if requested > available:
        warnings.warn(
            LimitWarning(
                f"{option(name, requested)} asks for more than the {available} {what} in the data; "
                f"using all {available}"
            ),
            stacklevel=2,
        )
        return available
    return requested


# ---------------------------------------------------------------------------------- non-finite

_HALF = (torch.float16, torch.bfloat16)


def non_finite(what: str, dtype: torch.dtype | None = None) -> ModelError:
    """The one-line error for NaN or Inf met in ``what`` of a model computing in ``dtype``."""
    if dtype in _HALF:
        short = str(dtype).removeprefix("torch.")
        return ModelError(
            f"{what} became NaN or Inf in {short} (its range overflows); run in float32 with "
            f"{option('dtype', 'float32')}"
        )
    if dtype is None:  # not known where it was met
        return ModelError(
            f"{what} became NaN or Inf; in float16 or bfloat16 run in float32 with "
            f"{option('dtype', 'float32')}, in float32 check the model's weights"
        )
    return ModelError(
        f"{what} became NaN or Inf; check the model's weights (they may be corrupt or too large) "
        "and its inputs"
    )


def require_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` unchanged, or :func:`non_finite` raised (``dtype``: the model's, default the tensor's)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise non_finite(what, dtype or tensor.dtype)
    return tensor


# ---------------------------------------------------------------------------------- degenerate data

DUPLICATE_SHARE = 0.25  # warn when more than this share of the calibration examples are repeats
FEW_TOKEN_IDS = 8  # warn when all calibration examples together use fewer different token ids


def next_token_targets(batches: Sequence[CalibrationBatch]) -> int:
    """Real tokens that have a real next token in the same example: a causal LM's loss terms."""
    total = 0
    for batch in batches:
        mask = batch.token_mask
        total += int((mask[:, 1:] & mask[:, :-1]).sum())
    return total


def check_calibration(batches: Sequence[CalibrationBatch], shapes: Sequence[LayerShape], model=None) -> None:
    """Check tokenized calibration data beyond its size; warn with numbers or refuse.

    - rows wider than the model's positions (pre-tokenized batches): ``ModelError``;
    - duplicated examples: more than ``DUPLICATE_SHARE`` repeats warns (they add no information,
      and units whose error the few distinct examples cannot see look free to remove); fewer
      tokens in the distinct examples than the widest layer is a ``DataError``, as for too little
      data;
    - near-constant inputs (fewer than ``FEW_TOKEN_IDS`` different token ids): warns.

    A causal LM's examples without next-token targets are the gradient pass's concern
    (:func:`sensitivity_problem`): they matter only where a loss gradient is used.
    """
    rows: list[tuple[int, ...]] = []
    width = 0
    for batch in batches:
        ids, mask = batch.inputs["input_ids"], batch.token_mask
        width = max(width, int(ids.shape[1]))
        rows += [tuple(r[m].tolist()) for r, m in zip(ids, mask, strict=True)]
    if model is not None and (limit := max_positions(model)) is not None and width > limit:
        raise ModelError(
            f"calibration batches are {width} tokens wide but the model has {limit} positions; "
            f"cut them to {limit} tokens or less"
        )
    widest = max(max(s.n_heads * s.head_dim, s.ffn_width) for s in shapes) if shapes else 0
    distinct = set(rows)
    repeats = len(rows) - len(distinct)
    distinct_tokens = sum(len(r) for r in distinct)
    if repeats and distinct_tokens < widest:
        raise DataError(
            f"calibration data has {len(rows)} examples but only {len(distinct)} distinct ones, "
            f"with {distinct_tokens} tokens; a meaningful factorization needs at least {widest} "
            "(the widest layer) — give more varied examples (duplicates add no information)"
        )
    if repeats > DUPLICATE_SHARE * len(rows):
        warnings.warn(
            _calibration_warning(
                f"{repeats} of the {len(rows)} calibration examples repeat others (only "
                f"{len(distinct)} distinct, {distinct_tokens} tokens): duplicates add no information, "
                "and units the few distinct examples do not exercise look free to remove; give more "
                "varied data"
            ),
            stacklevel=2,
        )
    ids = {token for r in distinct for token in r}
    if len(ids) < FEW_TOKEN_IDS:
        warnings.warn(
            _calibration_warning(
                f"the calibration examples use only {len(ids)} different tokens: near-constant inputs "
                "exercise few directions of each layer, so the statistics cannot tell most units "
                "apart; give representative text"
            ),
            stacklevel=2,
        )


def sensitivity_problem(
    energy: dict[tuple[str, int], float], batches: Sequence[CalibrationBatch] | None = None
) -> str | None:
    """Why the loss gradients at the blocks' outputs cannot weigh the allocation, or None.

    ``energy`` maps each pruned block to Σ‖∂loss/∂y‖² over the calibration tokens; ``batches``
    are a causal LM's calibration batches (None for other heads), whose next-token targets the
    loss needs. Degenerate: no target at all, or a block whose gradient energy is zero (its error
    would cost nothing and the allocation would remove it whole) or not finite."""
    if not energy:
        return None
    if batches is not None and next_token_targets(batches) == 0:
        lengths = [int(n) for b in batches for n in b.token_mask.sum(dim=1)]
        return (
            f"none of the {len(lengths)} calibration examples has a next token to predict (the "
            f"longest has {max(lengths, default=0)} token; without a BOS token one-word lines have "
            f"none), so the next-token loss has no gradient; give longer examples or join them "
            f"with {option('pack', True)}"
        )
    bad = [key for key, value in energy.items() if not math.isfinite(value)]
    if bad:
        return f"the loss gradient at {_block(bad[0])} is NaN or Inf"
    zero = [key for key, value in energy.items() if value == 0.0]
    if len(zero) == len(energy):
        return "the loss gradient is exactly zero at every block (the model's predictions are certain)"
    if zero:
        return (
            f"the loss gradient is exactly zero at {len(zero)} of {len(energy)} blocks (e.g. "
            f"{_block(zero[0])}), which would let the allocation remove them whole"
        )
    return None


def _calibration_warning(message: str) -> Warning:
    from statprune.calibration import CalibrationWarning  # calibration.py imports this module

    return CalibrationWarning(message)


def _block(key: tuple[str, int]) -> str:
    return f"layer {key[1]}'s {'attention heads' if key[0] == 'heads' else 'FFN neurons'}"


def warn_sensitivity_fallback(reason: str) -> None:
    warnings.warn(
        _calibration_warning(
            f"{reason}; the layers are weighted by the residual stream's energy instead "
            f"({option('layer_weighting', 'residual')}) and errors measured as euclidean"
        ),
        stacklevel=3,
    )


def record_fallback(report, sensitivity) -> None:
    """Note in ``report.options`` a gradient weighting that fell back (see :func:`sensitivity_problem`)."""
    reason = getattr(sensitivity, "problem", None)
    if reason:
        report.options.update(layer_weighting="residual", error_metric="euclidean", weighting_fallback=reason)


# ---------------------------------------------------------------------------------- budget fill

BUDGET_TOLERANCE = 0.01  # fraction of the dense cost the allocation may leave unspent


# fill_budget may add at most this fraction to the allocation's total weighted error to meet the
# budget (duplicated data prices whole heads near zero, so the exchange is nearly free there; where
# it is not, e.g. trading 52 neurons for one head under a latency model, the slack stays unspent)
FILL_ERROR_TOLERANCE = 0.01


def fill_budget(shapes, curves: list[BlockCurve], state, target: float, dense_cost: float) -> None:
    """Spend what the Lagrangian cut left of the budget, when that is more than
    ``BUDGET_TOLERANCE`` of the dense cost (``state``: the allocation's counts, updated in place).

    The greedy cut removes whole hull segments; a coarse block (attention heads, one per key/value
    group at a time) whose errors the statistics price near zero — typical of duplicated or
    near-constant calibration data, whose activations span few directions — goes first, and the
    slack its last step leaves is smaller than the step, so the refill cannot spend it (42 % of
    the FLOPs kept at a 50 % target). Each candidate exchange widens one block by one allowed
    step and trims the others back under the target, one allowed step at a time at the least
    error per cost saved; among the candidates whose total weighted error grows by at most
    ``FILL_ERROR_TOLERANCE``,
    the one ending within the tolerance with the least error is taken (else the one closest to the
    target), for up to ``len(curves)`` rounds."""
    tolerance = BUDGET_TOLERANCE * dense_cost
    slot = state.slot
    costs = [dict(zip(c.counts, c.costs, strict=True)) for c in curves]
    errors = [dict(zip(c.counts, c.errors, strict=True)) for c in curves]
    current = [state.counts[c.layer][slot[c.kind]] for c in curves]
    cost = state.cost
    for _ in range(len(curves)):
        if target - cost <= tolerance:
            break
        now_error = sum(errors[cj][n] for cj, n in enumerate(current))
        best = None
        for ci, curve in enumerate(curves):
            wider = [n for n in curve.counts if n > current[ci]]
            if not wider:
                continue
            trial = list(current)
            trial[ci] = wider[0]
            trial_cost = _trim(
                curves,
                costs,
                errors,
                trial,
                cost + costs[ci][wider[0]] - costs[ci][current[ci]],
                target,
                keep=ci,
                floor=target - tolerance,
            )
            if trial_cost is None or trial_cost <= cost:
                continue
            error = sum(errors[cj][n] for cj, n in enumerate(trial))
            if error > now_error * (1 + FILL_ERROR_TOLERANCE) + 1e-12:
                continue  # slack is not bought with more than a sliver of error
            key = (0, error) if target - trial_cost <= tolerance else (1, target - trial_cost)
            if best is None or key < best[0]:
                best = (key, trial, trial_cost)
        if best is None:
            break
        _, current, cost = best
    for ci, curve in enumerate(curves):
        state.counts[curve.layer][slot[curve.kind]] = current[ci]
    state.cost = cost


def _trim(
    curves, costs, errors, counts: list[int], cost: float, target: float, keep: int, floor: float
) -> float | None:
    """Lower ``counts`` (in place) one allowed step at a time, the step adding the least error per
    cost saved first (savings beyond the remaining excess do not count, so a coarse step that
    overshoots is not preferred for its size; steps that would fall below ``floor`` only when no
    other is left), never touching block ``keep``, until ``cost`` meets ``target``; returns the
    cost, or None if it cannot be met."""
    while cost > target:
        best = None
        for ci, curve in enumerate(curves):
            if ci == keep:
                continue
            lower = [n for n in curve.counts if n < counts[ci]]
            if not lower:
                continue
            step = lower[-1]
            saved = costs[ci][counts[ci]] - costs[ci][step]
            if saved <= 0:
                continue
            # per cost that counts: a step saving more than the excess is charged its whole error
            ratio = (errors[ci][step] - errors[ci][counts[ci]]) / min(saved, cost - target)
            key = (cost - saved < floor, ratio)
            if best is None or key < best[0]:
                best = (key, ci, step, saved)
        if best is None:
            return None
        _, ci, step, saved = best
        counts[ci] = step
        cost -= saved
    return cost
