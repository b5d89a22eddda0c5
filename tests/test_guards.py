"""Each failure kind of issue 15, for an encoder (BERT) and a decoder (Llama): non-finite values in
calibration, options beyond the model's limits, degenerate calibration data, results that depended
on the batch size, and messages naming the CLI's flags or the API's keywords."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.calibration import batches_from_tensors, tokenize_examples
from statprune.cli import main
from statprune.errors import DataError, ModelError
from statprune.evaluate import evaluate
from statprune.guards import (
    LimitWarning,
    check_seq_len,
    cli_option_names,
    max_positions,
    non_finite,
    option,
    require_finite,
    sensitivity_problem,
)

TOK = _build_tiny_tokenizer()
FAMILIES = ("bert", "llama")


def _kept(report):
    return [(layer.heads_kept, layer.neurons_kept) for layer in report.layers]


def _compress(model, data, **kwargs):
    kwargs = {"keep_flops": 0.5, "progress": False, "samples": 600} | kwargs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, report = statprune.compress(model, None if _pretokenized(data) else TOK, data, **kwargs)
    ours = [str(w.message) for w in caught if w.category.__module__.startswith("statprune")]
    return pruned, report, ours


def _pretokenized(data) -> bool:
    return bool(data) and not isinstance(data[0], str)


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the setup printed (transformers' save bars)
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------- 1. non-finite values


def _overflowing(family: str):
    """Finite in float32, infinite in float16: the FFN input projections scaled by 3000 (and for
    BERT, whose GELU does not multiply two of them, all of its dense projections)."""
    model = build_tiny_model(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("gate_proj", "up_proj", "intermediate.dense.w", "output.dense.w")):
                param.mul_(3000)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weighting", ["auto", "residual"])
def test_half_precision_overflow_is_one_error_suggesting_float32(family, weighting):
    model = _overflowing(family).half()
    # with the gradient weighting the logits (or the sampled labels) meet it first, with the
    # residual weighting the streamed activations: either way one ModelError, no traceback
    with pytest.raises(ModelError, match=r"NaN or Inf.* float16 .*model\.to\(torch\.float32\)"):
        statprune.compress(
            model, TOK, tiny_texts(200), keep_flops=0.5, progress=False, layer_weighting=weighting
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_overflow_in_the_cli(family, tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    _overflowing(family).save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(tiny_texts(200)) + "\n")
    code, err = _cli(
        [
            "compress",
            model_dir,
            "--data",
            data,
            "--out",
            out,
            "--keep-flops",
            "0.5",
            "--dtype",
            "float16",
            "--quiet",
        ],
        capsys,
    )
    line = _one_error_line(err)
    assert code == 1 and "--dtype float32" in line and "model.to" not in line
    assert not out.exists()


def test_non_finite_messages_depend_on_the_dtype():
    assert "float32" in str(non_finite("the loss", torch.bfloat16))
    plain = str(non_finite("the loss", torch.float32))  # already float32: no such advice
    assert "float32" not in plain and "weights" in plain
    with pytest.raises(ModelError, match="the loss gradients became NaN"):
        require_finite(torch.tensor([1.0, float("nan")]), "the loss gradients")
    x = torch.tensor([1, 2])  # integer tensors cannot hold NaN
    assert require_finite(x, "ids") is x


# ----------------------------------------------------------------------- 2. model limits


@pytest.mark.parametrize(("family", "limit"), [("bert", 130), ("roberta", 129), ("llama", 128)])
def test_seq_len_beyond_positions_is_refused_in_the_api(family, limit):
    model = build_tiny_model(family)
    assert max_positions(model) == limit  # RoBERTa's table starts after the padding id
    with pytest.raises(ModelError, match=f"seq_len=1024 exceeds the {limit} positions.*seq_len={limit}"):
        statprune.compress(model, TOK, tiny_texts(100), keep_flops=0.5, seq_len=1024, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="exceeds"):
        evaluate(model, TOK, tiny_texts(10), seq_len=1024)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_seq_len_beyond_positions_is_refused_alike_by_every_command(family, tmp_path, capsys):
    model_dir = tmp_path / "model"
    build_tiny_model(family).save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(" ".join(tiny_texts(60, seed=i)) for i in range(20)) + "\n")  # long lines
    limit = 130 if family == "bert" else 128
    expected = (
        f"error: --seq-len 1024 exceeds the {limit} positions of this model; pass --seq-len {limit} or less"
    )
    commands = {
        "compress": ["compress", model_dir, "--data", data, "--out", tmp_path / "c", "--keep-flops", "0.5"],
        "sweep": [
            "sweep",
            model_dir,
            "--data",
            data,
            "--eval",
            data,
            "--budgets",
            "0.5",
            "--out",
            tmp_path / "s",
        ],
        "eval": ["eval", model_dir, "--data", data],
        "bench": ["bench", model_dir, "--batch", "1", "--trials", "1", "--warmup", "0"],
    }
    for name, argv in commands.items():
        code, err = _cli([*argv, "--seq-len", "1024"], capsys)
        assert (code, _one_error_line(err)) == (1, expected), name
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_sliding_window_and_pretokenized_width():
    mistral = build_tiny_model("mistral", sliding_window=16)
    with pytest.warns(LimitWarning, match="seq_len=32 exceeds the model's sliding attention window of 16"):
        assert check_seq_len(mistral, 32) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_seq_len(mistral, 16)
    # ModernBERT's window is ``local_attention`` tokens (its config's ``sliding_window`` is the half)
    from transformers import ModernBertConfig, ModernBertModel

    modernbert = ModernBertModel(
        ModernBertConfig(
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            local_attention=8,
            pad_token_id=0,
        )
    )
    with pytest.warns(LimitWarning, match="seq_len=16 exceeds the model's sliding attention window of 8 "):
        check_seq_len(modernbert, 16)
    llama = build_tiny_model("llama")  # 128 positions; batches given ready-made, 200 wide
    wide = batches_from_tensors(torch.randint(4, 19, (8, 200)))
    with pytest.raises(ModelError, match="200 tokens wide but the model has 128 positions"):
        statprune.compress(llama, None, wide, keep_flops=0.5, progress=False, seq_len=128)


# ----------------------------------------------------------------------- 3. degenerate data


def test_causal_lm_without_next_tokens_falls_back_to_residual_weighting():
    """600 one-token examples (a tokenizer without BOS): the sampled next-token loss has no term,
    every gradient is zero; the run warns with numbers and weighs layers as ``residual`` does."""
    model = build_tiny_model("llama", vocab_size=1000)
    ids = torch.randperm(990, generator=torch.Generator().manual_seed(0))[:600].reshape(600, 1) + 5
    data = batches_from_tensors(ids)
    _, report, messages = _compress(model, data)
    assert any("none of the 600 calibration examples has a next token" in m for m in messages)
    assert report.options["layer_weighting"] == "residual" and "weighting_fallback" in report.options
    _, explicit, _ = _compress(model, data, layer_weighting="residual", error_metric="euclidean")
    assert _kept(report) == _kept(explicit)
    assert all(layer.heads_kept or layer.neurons_kept for layer in report.layers)  # no layer gutted


def test_classifier_with_certain_predictions_falls_back_to_residual_weighting():
    """A classifier so confident that its expected Fisher is exactly zero in float64."""
    model = build_tiny_model("bert")
    with torch.no_grad():
        model.classifier.weight.mul_(1e6)
    _, report, messages = _compress(model, tiny_texts(300))
    assert any("exactly zero at every block" in m and "residual" in m for m in messages)
    _, explicit, _ = _compress(model, tiny_texts(300), layer_weighting="residual", error_metric="euclidean")
    assert _kept(report) == _kept(explicit)


def test_sensitivity_problems():
    assert sensitivity_problem({("heads", 0): 1.0, ("neurons", 0): 2.0}) is None
    assert "NaN or Inf" in sensitivity_problem({("heads", 0): float("inf")})
    assert "1 of 2 blocks" in sensitivity_problem({("heads", 0): 1.0, ("neurons", 1): 0.0})
    assert sensitivity_problem({}) is None  # nothing measured, nothing to fall back from


@pytest.mark.parametrize("family", FAMILIES)
def test_duplicated_examples_warn_and_the_budget_is_still_met(family):
    """5 distinct examples repeated 120 times: a warning with the numbers, and never more than the
    target kept. (The slack coarse head steps leave is spent only where the exchange is nearly
    free in the error model: see test_budget_fill_spends_slack_that_coarse_head_steps_leave.)"""
    texts = tiny_texts(5, seed=1) * 120
    for budget in (0.5, 0.7):
        _, report, messages = _compress(build_tiny_model(family), texts, keep_flops=budget)
        assert any(
            "595 of the 600 calibration examples repeat others (only 5 distinct" in m for m in messages
        )
        assert report.flops_kept <= budget


@pytest.mark.parametrize("family", FAMILIES)
def test_too_few_distinct_tokens_is_refused_and_near_constant_inputs_warn(family):
    model = build_tiny_model(family)
    with pytest.raises(DataError, match=r"only 2 distinct ones, with .* tokens; .* at least 64"):
        statprune.compress(model, TOK, ["the cat", "a dog"] * 300, keep_flops=0.5, progress=False)
    constant = [" ".join(["the"] * n) for n in range(1, 41)]  # distinct rows, one word
    _, _, messages = _compress(model, constant)
    assert any("use only 3 different tokens" in m for m in messages)  # [CLS], the, [SEP]


# ----------------------------------------------------------------------- 4. rough edges


@pytest.mark.parametrize("family", FAMILIES)
def test_results_do_not_depend_on_the_batch_size(family):
    model = build_tiny_model(family)
    texts = tiny_texts(120, seed=3)
    runs = [_compress(model, texts, batch_size=b)[:2] for b in (1, 7, 200)]  # 200: one batch
    reference_model, reference = runs[0]
    for pruned, report in runs[1:]:
        assert _kept(report) == _kept(reference)
        for (name, a), b in zip(
            pruned.state_dict().items(), reference_model.state_dict().values(), strict=True
        ):
            # float32 Gram products summed in another order, through the least-squares solve
            assert (a - b).abs().max() <= 2e-3 * b.abs().max(), name


def test_sampled_next_tokens_ignore_padding_and_batch_neighbours():
    from statprune.fisher_grads import _sampled_next_tokens

    logits = torch.randn(1, 6, 7)
    ids = torch.tensor([[5, 3, 2, 6, 1, 4]])
    alone = _sampled_next_tokens(logits, torch.ones(1, 6, dtype=torch.bool), ids, seed=0)
    padded = torch.cat([logits, torch.randn(1, 3, 7)], dim=1)
    batch_logits = torch.cat([torch.randn(1, 9, 7), padded])
    batch_ids = torch.cat(
        [torch.randint(0, 7, (1, 9)), torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)]
    )
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    together = _sampled_next_tokens(batch_logits, mask, batch_ids, seed=0)
    assert together[1, :6].tolist() == alone[0].tolist() and together[1, 6:].eq(-100).all()


def test_options_are_named_as_the_user_sets_them(make_tiny_tokenizer, tmp_path, capsys):
    assert (
        option("batch_size", 1) == "batch_size=1" and option("dtype", "float32") == "model.to(torch.float32)"
    )
    with cli_option_names():
        assert option("batch_size", 1) == "--batch-size 1" and option("pack", True) == "--pack"
        assert option("dtype", "float32") == "--dtype float32" and option("seq_len") == "--seq-len"
    assert option("seq_len") == "seq_len"  # the context is left as found
    bare = make_tiny_tokenizer(pad_token=None, unk_token=None)
    with pytest.raises(DataError, match=r"use batch_size=1$"):
        tokenize_examples(bare, tiny_texts(4), batch_size=2)
    model_dir, data = tmp_path / "model", tmp_path / "calib.txt"
    build_tiny_model("bert").save_pretrained(model_dir)
    bare.save_pretrained(model_dir)
    data.write_text("\n".join(tiny_texts(100)) + "\n")
    code, err = _cli(
        ["compress", model_dir, "--data", data, "--out", tmp_path / "out", "--keep-flops", "0.5", "--quiet"],
        capsys,
    )
    line = _one_error_line(err)
    assert code == 1 and line.endswith("use --batch-size 1") and "batch_size" not in line


def test_counts_beyond_the_data_are_clamped_with_a_warning(tmp_path, capsys):
    model_dir, data = tmp_path / "model", tmp_path / "eval.txt"
    build_tiny_model("bert").save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data.write_text("\n".join(tiny_texts(30)) + "\n")
    code, err = _cli(["eval", model_dir, "--data", data, "--samples", "1000"], capsys)
    assert code == 0 and "warning: --samples 1000 asks for more than the 30 examples in the data" in err
    code, err = _cli(["eval", model_dir, "--data", data, "--samples", "10"], capsys)
    assert code == 0 and "warning" not in err


def test_budget_fill_spends_slack_that_coarse_head_steps_leave():
    """Heads priced as free (flat errors, as duplicated data makes them) are cut whole; the slack
    the last coarse cut leaves is spent by keeping a head and trimming neurons that are free too
    (activations spanning few directions); where trimming would cost real error the slack stays."""
    from statprune.adapters import adapter_for
    from statprune.allocation import allocate, curve_from_errors
    from statprune.flops import dense_counts, model_shapes, total_cost

    model = build_tiny_model("bert")
    shapes = model_shapes(adapter_for(model.config), model.base_model)
    heads = torch.tensor([3e-4, 6e-8, 2e-8, 3e-9, 0.0])  # errors keeping 0..4 heads
    # smooth, decreasing to 0 at 32 kept neurons: the 32 last ones are free
    neurons = torch.cat([torch.linspace(5e-3, 0.0, 33) ** 2 * 200, torch.zeros(32)])
    curves = []
    for i, s in enumerate(shapes):
        curves.append(curve_from_errors(i, "heads", s, heads, 1.0, "flops", 128))
        curves.append(curve_from_errors(i, "neurons", s, neurons, 1.0, "flops", 128))
    dense = total_cost(shapes, dense_counts(shapes), "flops", 128)
    for keep in (0.5, 0.6, 0.7):
        counts = allocate(shapes, curves, "flops", keep, 128)
        kept = total_cost(shapes, counts, "flops", 128) / dense
        assert keep - 0.01 <= kept <= keep, (keep, kept, counts)
