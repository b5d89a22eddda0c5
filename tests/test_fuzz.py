"""Property-based fuzzing of calibration and evaluation input through the CLI (Hypothesis).

The property, for any data file: the run ends either with exit 0 and a valid model (``compress``)
or results (``eval``), or with exit 1 and exactly one ``error: …`` line on stderr — no traceback,
no output left behind, the data file and the model folder untouched.

Runs in-process through ``statprune.cli.main`` on tiny models (a 2-layer BERT classifier and a
2-layer Llama), derandomized and bounded for CI: ``FUZZ_EXAMPLES`` examples per test (default 25;
set the environment variable to fuzz longer locally). Inputs that once broke the property are kept
as ``@example`` regression cases.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORDS, _build_tiny_tokenizer, build_tiny_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from statprune.cli import main  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),
    deadline=20_000,  # ms per example: a valid input runs a whole (tiny) compression
    derandomize=True,  # the same inputs on every CI run
    database=None,  # writes nothing into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- input strategies

WORD = st.sampled_from(TINY_WORDS)
SENTENCE = st.lists(WORD, min_size=0, max_size=25).map(" ".join)
NASTY = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\t\r",
        "\u2028",
        "\ufeff",
        "\u202e",
        "🦜" * 50,
        "the " * 5000,  # a very long line
        "é" * 3,
        "\x1b[31mred",
        '"',
        '""',
        "\\",
        "{",
        ",",
    ]
)
UNICODE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)  # any but surrogates
TEXT = st.one_of(SENTENCE, NASTY, UNICODE, st.text(alphabet=st.characters(max_codepoint=31)))
JSON_VALUE = st.one_of(
    TEXT,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
RAW_BYTES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"caf\xe9", b"\x00\x00\x00", b"\xef\xbb\xbf"]),
)


def _valid_txt(n: int = 80) -> bytes:
    import random

    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(TINY_WORDS) for _ in range(12)) for _ in range(n)).encode()


def _encode(line: str | bytes) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")


def _with_base(draw, valid: list[bytes], junk) -> list[bytes]:
    """Either only drawn lines, or a valid corpus with a few drawn lines spliced in (so that
    the nasty content reaches the tokenizer and the model, not only the reader)."""
    if draw(st.booleans()):
        lines = [_encode(line) for line in draw(st.lists(junk, max_size=120))]
    else:
        lines = list(valid)
        for line in draw(st.lists(junk, min_size=1, max_size=6)):
            lines.insert(draw(st.integers(0, len(lines))), _encode(line))
    if draw(st.integers(0, 3)) == 0:  # sometimes another encoding, or broken bytes, somewhere
        lines.insert(draw(st.integers(0, len(lines))), draw(RAW_BYTES))
    return lines


@st.composite
def txt_files(draw) -> bytes:
    valid = _valid_txt(draw(st.integers(10, 80))).split(b"\n")
    return b"\n".join(_with_base(draw, valid, st.one_of(SENTENCE, TEXT, TEXT)))


@st.composite
def jsonl_files(draw, fields=("text", "pair", "label")) -> bytes:
    valid = [
        json.dumps({"text": line, "pair": line[::-1], "label": i % 3}).encode()
        for i, line in enumerate(_valid_txt(draw(st.integers(10, 80))).decode().split("\n"))
    ]
    lines = [] if draw(st.booleans()) else valid
    for _ in range(draw(st.integers(0, 120 if not lines else 6))):
        kind = draw(st.sampled_from(["record"] * 6 + ["partial", "partial", "malformed", "other", "bytes"]))
        if kind == "record":
            record = {f: draw(st.one_of(SENTENCE, JSON_VALUE)) for f in fields}
            if "label" in record and draw(st.booleans()):
                record["label"] = draw(st.integers(-1, 3))
            lines.append(json.dumps(record, allow_nan=True))
        elif kind == "partial":  # some fields missing (e.g. half of a pair)
            keep = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields)))
            lines.append(json.dumps({f: draw(SENTENCE) for f in keep}))
        elif kind == "malformed":
            lines.append(draw(st.sampled_from(['{"text": "a', "{text: 1}", "[", "nul\x00l", "{}}", ""])))
        elif kind == "other":
            lines.append(json.dumps(draw(JSON_VALUE)))
        else:
            lines.append(draw(RAW_BYTES))
    if len(lines) > len(valid) and draw(st.booleans()):
        draw(st.randoms()).shuffle(lines)
    return b"\n".join(_encode(line) for line in lines)


@st.composite
def csv_files(draw, fields=("text", "pair", "label")) -> bytes:
    header = draw(st.one_of(st.just(list(fields)), st.lists(st.sampled_from([*fields, "x", ""]), max_size=4)))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    if header == list(fields) and draw(st.booleans()):
        for i, line in enumerate(_valid_txt(draw(st.integers(10, 80))).decode().split("\n")):
            writer.writerow([line, line[::-1], i % 3])
    for _ in range(draw(st.integers(0, 40))):
        cells = draw(st.lists(st.one_of(SENTENCE, SENTENCE, TEXT), min_size=0, max_size=len(header) + 1))
        if cells and draw(st.booleans()) and "label" in header:
            cells[min(header.index("label"), len(cells) - 1)] = str(draw(st.integers(-2, 4)))
        writer.writerow(cells)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.booleans()):  # break the quoting or the encoding somewhere
        junk = draw(st.sampled_from([b'"', b'\n"unclosed', b"\xff", b"\x00", b"a,b,c,d,e,f\n"]))
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + junk + data[cut:]
    return data


# --------------------------------------------------------------------------- the property


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def check_property(
    model_dir: Path, data: bytes, suffix: str, command: str, *extra: str, options: list[str] | None = None
) -> int:
    """Run ``command`` on ``data`` (saved with ``suffix``); assert the property; return the exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        out = Path(tmp) / "out"
        model_before = _digest(model_dir)
        if command == "compress":
            argv = ["compress", str(model_dir), "--data", str(path), "--out", str(out)]
            argv += options or ["--keep-flops", "0.6", "--samples", "48", "--seq-len", "24"]
            argv += ["--quiet"]
        else:
            argv = ["eval", str(model_dir), "--data", str(path), "--seq-len", "24", "--json", str(out)]
        code, err = _run([*argv, *extra])
        assert path.read_bytes() == data, "the data file was changed"
        assert _digest(model_dir) == model_before, "the model folder was changed"
        assert "Traceback" not in err
        # what is left once warnings and transformers' progress bars ("Loading weights: …it/s]")
        # are set aside must be nothing, or the one error line
        errors = [
            line
            for line in err.splitlines()
            if line.strip() and not line.startswith("warning: ") and not line.rstrip().endswith("it/s]")
        ]
        if code == 0:
            assert not errors, err
            assert out.exists()
            if command == "compress":
                import statprune

                statprune.load(out)  # a valid model
        else:
            assert code == 1, (code, err)
            assert len(errors) == 1 and errors[0].startswith("error: "), err
            assert not out.exists(), "output left behind"
            leftovers = [p.name for p in Path(tmp).iterdir() if p.name not in (path.name,)]
            assert not leftovers, leftovers
        return code


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-models")
    tokenizer = _build_tiny_tokenizer()
    folders = {}
    for name in ("bert", "llama", "llama-3000"):
        model = build_tiny_model(name.split("-")[0])
        if name.endswith("-3000"):  # finite in float32, overflowing in float16 (issue 15)
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if "gate_proj" in param_name or "up_proj" in param_name:
                        param.mul_(3000)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@FUZZ
@given(data=txt_files(), family=st.sampled_from(["bert", "llama"]))
@example(data=_valid_txt(), family="llama")  # the property's other branch: a valid model
@example(data=b"\x00\n" * 100, family="bert")
@example(data=b"caf\xe9 au lait\n" + _valid_txt(), family="bert")
def test_fuzz_compress_txt(models, data, family):
    check_property(models[family], data, ".txt", "compress")


@FUZZ
@given(data=jsonl_files(), pair=st.booleans())
@example(data=b'{"text": "the cat", "pair": null}\n' * 80, pair=True)
@example(data=b'{"text": 1e400}\n', pair=False)
def test_fuzz_compress_jsonl_and_pairs(models, data, pair):
    extra = ["--pair-field", "pair"] if pair else []
    check_property(models["bert"], data, ".jsonl", "compress", *extra)


@FUZZ
@given(data=csv_files(), pair=st.booleans())
@example(data=b'text,pair\n"the cat",\n', pair=True)
def test_fuzz_compress_csv(models, data, pair):
    extra = ["--pair-field", "pair"] if pair else []
    check_property(models["bert"], data, ".csv", "compress", *extra)


@FUZZ
@given(data=st.one_of(jsonl_files(), csv_files()), as_csv=st.booleans())
@example(data=b'{"text": "the cat", "label": true}\n', as_csv=False)
@example(data=b'{"text": "the cat", "label": 2.5}\n', as_csv=False)
def test_fuzz_eval_labels(models, data, as_csv):
    check_property(models["bert"], data, ".csv" if as_csv else ".jsonl", "eval")


@FUZZ
@given(
    family=st.sampled_from(["bert", "llama"]),
    seq_len=st.integers(1, 300),
    batch_size=st.integers(1, 400),
    samples=st.integers(1, 800),
    budget=st.floats(0.02, 1.0),
    dtype=st.sampled_from(["float32", "float32", "bfloat16", "float16"]),
)
# once a traceback from the embeddings (130 positions), now the error naming the limit
@example(family="bert", seq_len=200, batch_size=16, samples=512, budget=0.5, dtype="float32")
# once a silent run past the rotary decoder's 128 positions, now the same error
@example(family="llama", seq_len=256, batch_size=16, samples=512, budget=0.5, dtype="float32")
# once a traceback from torch.multinomial (probabilities inf/nan), now "--dtype float32"
@example(family="llama-3000", seq_len=24, batch_size=16, samples=512, budget=0.5, dtype="float16")
def test_fuzz_compress_options(models, family, seq_len, batch_size, samples, budget, dtype):
    """Numeric options against what the model and the data allow (a valid 80-line file)."""
    options = [f"--seq-len={seq_len}", f"--batch-size={batch_size}", f"--samples={samples}"]
    options += [f"--keep-flops={budget}", f"--dtype={dtype}"]
    check_property(models[family], _valid_txt(), ".txt", "compress", options=options)


def test_fuzz_harness_sees_both_outcomes(models):
    """The property's two branches are both reachable: a valid file gives a model, a bad one an error."""
    assert check_property(models["bert"], _valid_txt(), ".txt", "compress") == 0
    assert check_property(models["bert"], b"\xff\xfe\x00", ".txt", "compress") == 1
