"""Reading, sampling and batching calibration data."""

import json
import warnings

import pytest
import torch

from statprune.calibration import (
    CalibrationBatch,
    CalibrationWarning,
    batches_from_tensors,
    count_tokens,
    pack_examples,
    read_examples,
    sample_examples,
    tokenize_examples,
)
from statprune.errors import DataError

# ------------------------------------------------------------------------------------ formats


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_txt_one_example_per_nonempty_line(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("  first line \n\n\t\nsecond line\r\nthird\n", encoding="utf-8")
    assert read_examples(path) == ["first line", "second line", "third"]
    assert read_examples(str(path)) == ["first line", "second line", "third"]


def test_txt_bom_is_dropped_and_unicode_line_separator_kept(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes("\ufeffcafé\u2028same line\nnext\n".encode())
    assert read_examples(path) == ["café\u2028same line", "next"]


def test_directory_of_txt_sorted_nonrecursive(tmp_path):
    (tmp_path / "b.txt").write_text("b1\nb2\n", encoding="utf-8")
    (tmp_path / "a.TXT").write_text("a1\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("ignored\n", encoding="utf-8")
    assert read_examples(tmp_path) == ["a1", "b1", "b2"]


def test_jsonl_default_and_custom_field(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [{"text": "hello", "body": "x"}, {"text": 42, "body": "y"}, {"text": "  ", "body": "z"}],
    )
    assert read_examples(path) == ["hello", "42"]
    assert read_examples(path, text_field="body") == ["x", "y", "z"]


def test_jsonl_skips_blank_lines_and_handles_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n   \n{"text": "b\\u2028c"}\n')
    assert read_examples(path) == ["a", "b\u2028c"]


def test_jsonl_pairs(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [{"premise": "a cat", "hypothesis": "an animal"}, {"premise": "x", "hypothesis": 1.5}],
    )
    assert read_examples(path, text_field="premise", pair_field="hypothesis") == [
        ("a cat", "an animal"),
        ("x", "1.5"),
    ]


def test_csv_bom_and_quoted_multiline_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes('\ufefftext,id\r\n"first ""quoted""\r\nspans lines",1\r\nplain,2\r\n,3\r\n'.encode())
    assert read_examples(path) == ['first "quoted"\r\nspans lines', "plain"]


def test_csv_custom_field_and_pairs(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence1,sentence2,label\na cat,an animal,1\nthe dog,a fox,0\n")
    assert read_examples(path, text_field="sentence2") == ["an animal", "a fox"]
    assert read_examples(path, text_field="sentence1", pair_field="sentence2") == [
        ("a cat", "an animal"),
        ("the dog", "a fox"),
    ]


def test_csv_long_field_exceeds_default_limit(tmp_path):
    path = tmp_path / "data.csv"
    long_text = "word " * 40_000
    path.write_text(f'text\n"{long_text}"\n', encoding="utf-8")
    assert read_examples(path) == [long_text]


# ------------------------------------------------------------------------------------- errors


def _error(path, **kwargs) -> str:
    """The message as the CLI shows it (options named by their flags)."""
    from statprune.guards import cli_option_names

    with pytest.raises(DataError) as info, cli_option_names():
        read_examples(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    message = _error(tmp_path / "nope.txt")
    assert "nope.txt" in message and "not found" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("x")
    message = _error(path)
    assert "data.parquet" in message
    assert all(ext in message for ext in (".txt", ".jsonl", ".csv", "directory"))


@pytest.mark.parametrize("name", ["data.txt", "data.jsonl", "data.csv"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    message = _error(path)
    assert name in message and "empty" in message


def test_no_examples(tmp_path):
    jsonl = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    assert "blank.jsonl" in _error(jsonl) and "no examples" in _error(jsonl)
    csv_path = tmp_path / "header_only.csv"
    csv_path.write_text("text\n")
    assert "header_only.csv" in _error(csv_path) and "no examples" in _error(csv_path)


def test_directory_without_txt_or_examples(tmp_path):
    (tmp_path / "a.md").write_text("x")
    assert "no .txt files" in _error(tmp_path)
    (tmp_path / "a.txt").write_text("\n")
    assert "no examples" in _error(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    message = _error(path)
    assert "latin1.txt" in message and "not UTF-8" in message
    assert "byte offset 6" in message and "line 2" in message and "convert" in message


def test_not_utf8_in_directory_names_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert "bad.txt" in _error(tmp_path)


def test_text_field_with_txt_is_rejected(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x\n")
    assert "--text-field" in _error(path, text_field="body")
    assert "--pair-field" in _error(path, pair_field="body")


def test_jsonl_invalid_json_gives_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": oops}\n')
    message = _error(path)
    assert "data.jsonl line 3" in message and "not valid JSON" in message


def test_jsonl_not_an_object_gives_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    message = _error(path)
    assert "data.jsonl line 2" in message and "array" in message and "object" in message


def test_jsonl_missing_field_lists_fields(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"body": "a", "title": "b"}])
    message = _error(path)
    assert "data.jsonl line 1" in message and "'text'" in message
    assert "'body'" in message and "'title'" in message and "--text-field" in message
    message = _error(path, text_field="body", pair_field="label")
    assert "'label'" in message and "--pair-field" in message


@pytest.mark.parametrize(("value", "kind"), [(None, "null"), (True, "boolean"), ([1], "array")])
def test_jsonl_non_string_value(tmp_path, value, kind):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": value}])
    message = _error(path)
    assert "data.jsonl line 2" in message and kind in message and "'text'" in message


def test_csv_missing_column_lists_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello,1\n")
    message = _error(path)
    assert "data.csv" in message and "'sentence'" in message and "'label'" in message
    assert "--text-field" in message
    assert "--pair-field" in _error(path, text_field="sentence", pair_field="other")


def test_csv_short_row_gives_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("id,text\n1,hello\n2\n")
    message = _error(path)
    assert "data.csv line 3" in message and "'text'" in message


# ----------------------------------------------------------------------------------- sampling


def test_sample_is_deterministic_subset():
    examples = [f"ex{i}" for i in range(100)]
    first = sample_examples(examples, 10, seed=0)
    assert first == sample_examples(examples, 10, seed=0)
    assert first != sample_examples(examples, 10, seed=1)
    assert len(first) == len(set(first)) == 10 and set(first) <= set(examples)


def test_sample_too_few_warns_and_returns_all():
    examples = [("a", "b"), ("c", "d"), ("e", "f")]
    with pytest.warns(CalibrationWarning, match="only 3 .* 5 requested"):
        out = sample_examples(examples, 5, seed=0)
    assert sorted(out) == examples
    with pytest.warns(CalibrationWarning):
        assert sample_examples(examples, 5, seed=0) == out
    assert issubclass(CalibrationWarning, UserWarning)


def test_sample_exact_count_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(sample_examples(["a", "b"], 2, seed=3)) == ["a", "b"]


@pytest.mark.parametrize("n", [0, -1])
def test_sample_needs_positive_n(n):
    with pytest.raises(DataError, match="at least 1"):
        sample_examples(["a"], n, seed=0)


def test_sample_needs_examples():
    with pytest.raises(DataError):
        sample_examples([], 1, seed=0)


# ------------------------------------------------------------------------------- tokenization


def _lengths(batch: CalibrationBatch) -> list[int]:
    return batch.token_mask.sum(dim=1).tolist()


def test_tokenize_pads_sorts_and_masks(tiny_tokenizer):
    examples = ["the cat", "the quick brown fox jumps over the lazy dog", "a dog ran", "sat"]
    batches = tokenize_examples(tiny_tokenizer, examples, seq_len=128, batch_size=2)
    assert [_lengths(b) for b in batches] == [[11, 5], [4, 3]]  # longest first, [CLS]+[SEP]
    first = batches[0]
    assert set(first.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert first.inputs["input_ids"].shape == (2, 11)
    assert first.inputs["input_ids"].dtype == torch.long
    mask = first.token_mask
    assert mask.dtype == torch.bool
    assert torch.equal(mask, first.inputs["attention_mask"].bool())
    assert mask[1].tolist() == [True] * 5 + [False] * 6  # padding is on the right
    pad_id = tiny_tokenizer.pad_token_id
    assert (first.inputs["input_ids"][~mask] == pad_id).all()
    assert (first.inputs["input_ids"][mask] != pad_id).all()
    assert first.inputs["input_ids"][1, :5].tolist() == tiny_tokenizer("a dog ran")["input_ids"]
    assert first.num_tokens == 16
    assert count_tokens(batches) == 11 + 5 + 4 + 3


def test_tokenize_is_deterministic_and_stable(tiny_tokenizer):
    examples = ["the cat", "a dog", "the dog sat", "a cat"]
    batches = tokenize_examples(tiny_tokenizer, examples, batch_size=3)
    again = tokenize_examples(tiny_tokenizer, examples, batch_size=3)
    for a, b in zip(batches, again, strict=True):
        assert a.inputs.keys() == b.inputs.keys()
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    ids = torch.cat([b.inputs["input_ids"][:, 1:3] for b in batches]).tolist()
    vocab = tiny_tokenizer.get_vocab()
    expected = ["the dog", "the cat", "a dog", "a cat"]  # ties keep input order
    assert ids == [[vocab[w] for w in e.split()] for e in expected]


def test_tokenize_truncates_to_seq_len(tiny_tokenizer):
    batches = tokenize_examples(tiny_tokenizer, ["the quick brown fox jumps", "cat"], seq_len=4)
    ids = batches[0].inputs["input_ids"]
    assert ids.shape == (2, 4)
    assert ids[0].tolist()[-1] == tiny_tokenizer.sep_token_id  # truncated before [SEP] is added
    assert _lengths(batches[0]) == [4, 3]


def test_tokenize_pairs_produce_token_type_ids(tiny_tokenizer):
    batches = tokenize_examples(tiny_tokenizer, [("the cat", "a dog ran"), ("sat", "on")])
    batch = batches[0]
    assert batch.inputs["token_type_ids"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0, 0, 0],  # padding gets the pad type id
    ]
    assert _lengths(batch) == [8, 5]


def test_tokenize_without_token_type_ids(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(model_input_names=["input_ids", "attention_mask"])
    batches = tokenize_examples(tokenizer, [("the cat", "a dog")])
    assert set(batches[0].inputs) == {"input_ids", "attention_mask"}


def test_tokenize_drops_zero_token_examples(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(template=False)
    batches = tokenize_examples(tokenizer, ["the cat", "   ", "dog"])
    assert _lengths(batches[0]) == [2, 1]
    with pytest.raises(DataError, match="no calibration example produced any tokens"):
        tokenize_examples(tokenizer, ["  ", "\t"])


def test_tokenize_pad_fallbacks_leave_tokenizer_unchanged(make_tiny_tokenizer):
    eos = make_tiny_tokenizer(pad_token=None, eos_token="[SEP]")
    batch = tokenize_examples(eos, ["the cat sat", "dog"])[0]
    assert eos.pad_token is None
    assert batch.inputs["input_ids"][1, -1].item() == eos.eos_token_id
    unk = make_tiny_tokenizer(pad_token=None)
    batch = tokenize_examples(unk, ["the cat sat", "dog"])[0]
    assert batch.inputs["input_ids"][1, -1].item() == unk.unk_token_id
    assert batch.token_mask[1].tolist() == [True] * 3 + [False] * 2


def test_tokenize_without_any_pad_candidate(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(pad_token=None, unk_token=None)
    with pytest.raises(DataError, match="no pad, eos or unk token"):
        tokenize_examples(tokenizer, ["the cat", "dog"])
    assert len(tokenize_examples(tokenizer, ["the cat", "dog"], batch_size=1)) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seq_len": 0}, "sequence length"), ({"batch_size": 0}, "batch size")],
)
def test_tokenize_rejects_bad_sizes(tiny_tokenizer, kwargs, match):
    with pytest.raises(DataError, match=match):
        tokenize_examples(tiny_tokenizer, ["the cat"], **kwargs)


def test_tokenize_rejects_empty_and_mixed(tiny_tokenizer):
    with pytest.raises(DataError):
        tokenize_examples(tiny_tokenizer, [])
    with pytest.raises(DataError, match="mix"):
        tokenize_examples(tiny_tokenizer, ["the cat", ("a", "dog")])


def test_read_then_tokenize_pairs(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"q": "the cat", "a": "sat"}] * 3)
    examples = sample_examples(read_examples(path, text_field="q", pair_field="a"), 2, seed=0)
    batches = tokenize_examples(tiny_tokenizer, examples, batch_size=2)
    assert count_tokens(batches) == 2 * 6


# ----------------------------------------------------------------------------- from tensors


def test_batches_from_tensors_default_mask_and_split():
    ids = torch.arange(20).reshape(5, 4)
    batches = batches_from_tensors(ids, batch_size=2)
    assert [b.inputs["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b.inputs["input_ids"] for b in batches]), ids)  # order kept
    assert all(b.token_mask.all() for b in batches)
    assert count_tokens(batches) == 20


def test_batches_from_tensors_mask_extra_and_empty_rows():
    ids = torch.ones(3, 4, dtype=torch.int32)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    types = torch.zeros(3, 4, dtype=torch.long)
    batches = batches_from_tensors(ids, mask, token_type_ids=types)
    assert len(batches) == 1
    inputs = batches[0].inputs
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert inputs["input_ids"].dtype == torch.long and inputs["attention_mask"].dtype == torch.long
    assert _lengths(batches[0]) == [2, 4]  # the all-padding row is dropped


def test_batches_from_tensors_1d():
    batches = batches_from_tensors(torch.tensor([5, 6, 7]))
    assert batches[0].inputs["input_ids"].tolist() == [[5, 6, 7]]
    assert batches[0].num_tokens == 3


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4)), {}, "attention_mask has shape"),
        ((torch.ones(2, 3, dtype=torch.long),), {"token_type_ids": torch.ones(3)}, "token_type"),
        ((torch.ones(2, 3),), {}, "integer"),
        ((torch.ones(2, 3, 4, dtype=torch.long),), {}, "num_examples, seq"),
        ((torch.ones(0, 3, dtype=torch.long),), {}, "non-empty"),
        ((torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3)), {}, "no tokens"),
        ((torch.ones(2, 3, dtype=torch.long),), {"batch_size": 0}, "batch size"),
    ],
)
def test_batches_from_tensors_errors(args, kwargs, match):
    with pytest.raises(DataError, match=match):
        batches_from_tensors(*args, **kwargs)


def test_calibration_batch_validates_and_moves():
    with pytest.raises(DataError, match="attention_mask"):
        CalibrationBatch({"input_ids": torch.ones(1, 2, dtype=torch.long)})
    batch = CalibrationBatch(
        {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2)}
    )
    moved = batch.to("cpu")
    assert moved is not batch and moved.num_tokens == 2


def test_pack_cuts_full_windows_of_the_joined_texts(tiny_tokenizer):
    texts = [f"line {i} with a few words" for i in range(60)]
    batches = pack_examples(tiny_tokenizer, texts, n=10, seed=0, seq_len=16, batch_size=4)
    assert [b.inputs["input_ids"].shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    assert all(bool(b.token_mask.all()) for b in batches)  # no padding: every token is text
    eos = tiny_tokenizer.eos_token_id
    stream = []
    for ids in tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, eos] if eos is not None else ids
    windows = [stream[i : i + 16] for i in range(0, len(stream) - 15, 16)]  # non-overlapping
    drawn = [row.tolist() for b in batches for row in b.inputs["input_ids"]]
    assert len(windows) > 10 and drawn == sample_examples(windows, 10, 0)
    again = pack_examples(tiny_tokenizer, texts, n=10, seed=0, seq_len=16, batch_size=4)
    first = [b.inputs["input_ids"].tolist() for b in batches]
    assert [b.inputs["input_ids"].tolist() for b in again] == first


def test_pack_rejects_too_little_text_and_pairs(tiny_tokenizer):
    with pytest.raises(DataError, match=r"less than one window of seq_len=64; .* shorter seq_len"):
        pack_examples(tiny_tokenizer, ["short"], n=4, seed=0, seq_len=64)
    with pytest.raises(DataError, match="pairs cannot be packed"):
        pack_examples(tiny_tokenizer, [("a", "b")], n=4, seed=0, seq_len=4)
