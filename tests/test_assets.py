"""Tests for scripts/assets.py: the pure helpers and the cache/marker logic. No network: every
test that reaches ``ensure`` or ``main`` swaps in fake builders and makes ``pip`` fail loudly."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_assets():
    spec = importlib.util.spec_from_file_location("statprune_assets", ROOT / "scripts" / "assets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


assets = _load_assets()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not download anything")

    monkeypatch.setattr(assets, "pip_download", refuse)
    monkeypatch.setattr(assets, "ensure_packages", refuse)


@pytest.fixture
def fake_builder(monkeypatch, no_network):
    """Replace the corpora builder with a counting one that writes two small files."""
    calls = []

    def build(out: Path, work: Path) -> dict:
        calls.append(out)
        (out / "a.txt").write_text("alpha\n", encoding="utf-8")
        (out / "sub").mkdir()
        (out / "sub" / "b.txt").write_text("beta\n", encoding="utf-8")
        return {"n": len(calls)}

    monkeypatch.setitem(assets.BUILDERS, "corpora", build)
    return calls


# --- tag stripping and detokenization -------------------------------------------------------


def test_split_tagged_uses_last_slash():
    assert assets.split_tagged("The/DT dog/NN ./.") == [("The", "DT"), ("dog", "NN"), (".", ".")]
    assert assets.split_tagged(r"a/b/NN \/NN one/NN|CD bare") == [
        ("a/b", "NN"),
        ("\\", "NN"),
        ("one", "NN|CD"),
        ("bare", ""),
    ]
    assert assets.split_tagged("   ") == []


def test_strip_tags_wsj_line():
    line = "Pierre/NNP Vinken/NNP ,/, 61/CD years/NNS old/JJ ,/, will/MD join/VB Nov./NNP 29/CD ./."
    assert assets.strip_tags(line) == "Pierre Vinken, 61 years old, will join Nov. 29."


def _words(text: str) -> list[str]:
    return text.split()


def test_detokenize_quotes_clitics_and_currency():
    toks = _words("He said `` I ca n't pay $ 5 '' ; it 's 10 % off ( really ) .")
    assert assets.detokenize(toks) == "He said \"I can't pay $5\"; it's 10% off (really)."
    assert assets.detokenize(_words('a " b c " d " e " .')) == 'a "b c" d "e".'
    assert assets.detokenize(_words("-LRB- x -RRB- the investors ' money")) == "(x) the investors' money"
    assert assets.detokenize(_words("'' Neither was aware .")) == "Neither was aware."
    assert assets.detokenize([]) == ""


def test_tagged_to_lines_drops_blank_and_punctuation_only_lines():
    text = 'Hello/UH ,/, world/NN !/.\n\n"/"\n  \nIt/PRP works/VBZ ./.\n'
    assert assets.tagged_to_lines(text) == ["Hello, world!", "It works."]


def test_clean_lines():
    assert assets.clean_lines("  To be,\n\n\tor not\n   \n") == ["To be,", "or not"]


# --- polarity csv -> jsonl -----------------------------------------------------------------


POLARITY_CSV = (
    '\ufeff"1","a gorgeous , "" witty "" film . \n"\n'
    '"-1","dull and\nlong , spanning two lines . "\n'
    "\n"
    '"1",plain unquoted text\n'
).encode()


def test_parse_polarity_csv_bom_quotes_and_multiline():
    rows = assets.parse_polarity_csv(POLARITY_CSV)
    assert rows == [
        {"text": 'a gorgeous , " witty " film .', "label": 1},
        {"text": "dull and long , spanning two lines .", "label": 0},
        {"text": "plain unquoted text", "label": 1},
    ]


def test_parse_polarity_csv_from_file_and_jsonl_roundtrip(tmp_path):
    src = tmp_path / "polarity.csv"
    src.write_bytes(POLARITY_CSV)
    rows = assets.parse_polarity_csv(src.read_bytes())
    out = tmp_path / "rt.jsonl"
    assert assets.write_jsonl(out, rows) == 3
    back = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert back == rows
    assert not out.read_bytes().startswith(b"\xef\xbb\xbf")


@pytest.mark.parametrize(
    "data",
    [b'"0","neutral?"\n', b'"1","a","extra"\n', b'"1","   "\n'],
    ids=["bad-label", "three-fields", "empty-text"],
)
def test_parse_polarity_csv_rejects_bad_rows(data):
    with pytest.raises(assets.AssetError):
        assets.parse_polarity_csv(data)


# --- splits ------------------------------------------------------------------------------------


def test_split_rows_sizes_determinism_and_recipe():
    rows = [{"text": f"s{i}", "label": i % 2} for i in range(4000)]
    train, test = assets.split_rows(rows)
    assert (len(train), len(test)) == (3200, 800)
    assert assets.split_rows(rows) == (train, test)
    texts = [r["text"] for r in train + test]
    assert len(set(texts)) == 4000
    assert rows[0]["text"] == "s0"  # input not shuffled in place
    reference = list(rows)
    random.Random(0).shuffle(reference)
    assert train + test == reference  # documented recipe: random.Random(0).shuffle, then slice
    other_train, _ = assets.split_rows(rows, seed=1)
    assert other_train != train


def test_split_rows_small_and_too_small():
    train, test = assets.split_rows(list(range(10)), n_train=6, n_test=3)
    assert len(train) == 6
    assert len(test) == 3
    assert not set(train) & set(test)
    with pytest.raises(assets.AssetError):
        assets.split_rows(list(range(10)), n_train=8, n_test=3)


def test_split_lines_keeps_order():
    lines = [f"l{i}" for i in range(10)]
    assert assets.split_lines(lines) == (lines[:8], lines[8:])
    calib, held = assets.split_lines([str(i) for i in range(1001)])
    assert (len(calib), len(held)) == (800, 201)
    assert held[0] == "800"


# --- archives ----------------------------------------------------------------------------------


def _zip_bytes(members: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def test_extract_zip_folder_strips_prefix_and_skips_junk(tmp_path):
    buf = _zip_bytes(
        {
            "pkg/model/config.json": b"{}",
            "pkg/model/1_Pooling/config.json": b"{}",
            "pkg/model/desktop.ini": b"x",
            "pkg/model/.gitattributes": b"x",
            "pkg/other.py": b"",
        }
    )
    with zipfile.ZipFile(buf) as zf:
        got = assets.extract_zip_folder(zf, "pkg/model/", tmp_path)
    assert sorted(got) == ["1_Pooling/config.json", "config.json"]
    assert assets.list_files(tmp_path) == ["1_Pooling/config.json", "config.json"]


def test_extract_zip_folder_rejects_unsafe_and_empty(tmp_path):
    for members in ({"m/../../evil": b"x"}, {"x/y": b"x"}):
        with zipfile.ZipFile(_zip_bytes(members)) as zf, pytest.raises(assets.AssetError):
            assets.extract_zip_folder(zf, "m/", tmp_path)


def test_find_model_folder():
    names = ["a/", "a/b/config.json", "a/b/model.safetensors", "a/b/1_Pooling/config.json"]
    assert assets.find_model_folder(names) == "a/b/"
    assert assets.find_model_folder(["config.json", "pytorch_model.bin"]) == ""
    with pytest.raises(assets.AssetError):
        assets.find_model_folder(["a/config.json", "a/tokenizer.json"])


def test_read_tar_member(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"p-1/test/corpora/a&b.csv": b"hello", "p-1/x.txt": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        assert assets.read_tar_member(tf, "test/corpora/a&b.csv") == b"hello"
        with pytest.raises(assets.AssetError):
            assets.read_tar_member(tf, "missing.txt")


def test_convert_bin_to_safetensors_with_tied_weights(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    shared = torch.randn(4, 3)
    torch.save({"emb.weight": shared, "head.weight": shared, "b": torch.zeros(2)}, tmp_path / "w.bin")
    assert assets.convert_bin_to_safetensors(tmp_path / "w.bin", tmp_path / "m.safetensors") == 3
    back = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(back["emb.weight"], shared)
    assert torch.equal(back["head.weight"], shared)


def test_convert_bin_refuses_non_tensor_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(1), "note": "text"}, tmp_path / "w.bin")
    with pytest.raises(assets.AssetError):
        assets.convert_bin_to_safetensors(tmp_path / "w.bin", tmp_path / "m.safetensors")


# --- DONE.json marker --------------------------------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpora"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.txt").write_text("beta\n")
    return root


def test_marker_roundtrip_and_cheap_vs_deep_checks(tmp_path):
    root = _folder(tmp_path)
    assert assets.marker_problem(root, "corpora") == "no valid DONE.json"
    marker = assets.write_marker(root, "corpora", {"k": 1})
    assert set(marker["files"]) == {"a.txt", "sub/b.txt"}
    assert marker["files"]["a.txt"]["bytes"] == 6
    assert assets.read_marker(root) == marker
    assert assets.is_done(root, "corpora")
    assert assets.is_done(root, "corpora", deep=True)
    assert not assets.is_done(root, "minilm")  # marker is for another asset

    (root / "a.txt").write_text("ALPHA\n")  # same size, other bytes
    assert assets.is_done(root, "corpora")
    assert assets.marker_problem(root, "corpora", deep=True) == "sha256 mismatch for a.txt"
    (root / "a.txt").write_text("alpha!\n")
    assert assets.marker_problem(root, "corpora") == "size mismatch for a.txt"
    (root / "a.txt").unlink()
    assert assets.marker_problem(root, "corpora") == "missing file a.txt"


def test_marker_recipe_bump_and_corrupt_marker(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    assets.write_marker(root, "corpora")
    monkeypatch.setitem(assets.RECIPES, "corpora", assets.RECIPES["corpora"] + 1)
    assert "recipe version" in assets.marker_problem(root, "corpora")
    (root / "DONE.json").write_text("{not json")
    assert assets.read_marker(root) is None
    assert not assets.is_done(root, "corpora")


def test_write_marker_refuses_empty_folder(tmp_path):
    with pytest.raises(assets.AssetError):
        assets.write_marker(tmp_path, "corpora")


# --- ensure(): idempotence, atomicity ---------------------------------------------------------


def test_ensure_builds_once_then_skips(tmp_path, fake_builder):
    path = assets.ensure("corpora", cache=tmp_path)
    assert path == tmp_path / "corpora"
    assert assets.list_files(path) == ["a.txt", "sub/b.txt"]
    assert assets.read_marker(path)["info"]["n"] == 1
    assert assets.ensure("corpora", cache=tmp_path) == path
    assert len(fake_builder) == 1
    assets.ensure("corpora", cache=tmp_path, force=True)
    assert len(fake_builder) == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_ensure_rebuilds_damaged_asset_and_cleans_stale_tmp(tmp_path, fake_builder):
    path = assets.ensure("corpora", cache=tmp_path)
    (path / "a.txt").unlink()
    stale = tmp_path / ".tmp-corpora-dead"
    stale.mkdir()
    assets.ensure("corpora", cache=tmp_path)
    assert len(fake_builder) == 2
    assert assets.is_done(path, "corpora", deep=True)
    assert not stale.exists()


def test_ensure_failure_leaves_previous_asset_intact(tmp_path, monkeypatch, fake_builder):
    path = assets.ensure("corpora", cache=tmp_path)

    def broken(out: Path, work: Path) -> dict:
        (out / "partial.txt").write_text("half")
        raise assets.AssetError("boom")

    monkeypatch.setitem(assets.BUILDERS, "corpora", broken)
    with pytest.raises(assets.AssetError, match="boom"):
        assets.ensure("corpora", cache=tmp_path, force=True)
    assert assets.is_done(path, "corpora", deep=True)
    assert not (path / "partial.txt").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_ensure_unknown_name(tmp_path):
    with pytest.raises(assets.AssetError):
        assets.ensure("all", cache=tmp_path)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STATPRUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("STATPRUNE_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "statprune"


def test_expand_names():
    assert assets.expand_names([]) == ["minilm", "corpora"]
    assert assets.expand_names(["mpnet", "all", "mpnet"]) == ["mpnet", "minilm", "corpora"]
    assert assets.expand_names(["all-models"]) == ["minilm", "corpora", "mpnet", "smollm2"]
    with pytest.raises(assets.AssetError):
        assets.expand_names(["gpt2"])


# --- CLI -----------------------------------------------------------------------------------------


def test_main_builds_skips_verifies_and_reports_errors(tmp_path, fake_builder, capsys):
    cache = ["--cache", str(tmp_path)]
    assert assets.main(["corpora", *cache]) == 0
    assert assets.main(["corpora", *cache]) == 0
    assert len(fake_builder) == 1
    assert "skipping" in capsys.readouterr().out
    assert assets.main(["corpora", "--verify", *cache]) == 0
    assert assets.main(["minilm", "--verify", *cache]) == 1
    assert assets.main(["--list", *cache]) == 0
    assert "ready" in capsys.readouterr().out
    assert assets.main(["nonsense", *cache]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("assets.py: error: unknown asset 'nonsense'")
    assert "\n" not in err
