"""Tests for scripts/assets.py and its statprune_assets package: the pure helpers and the
cache/marker logic. No network: every test that reaches ``ensure`` or ``main`` swaps in fake
builders and makes any child process (``pip`` included) fail loudly."""

from __future__ import annotations

import io
import itertools
import json
import random
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import assets  # noqa: E402  (the entry point: its public names)
from statprune_assets import cache, classifiers, corpora, fetch, registry, training  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Any child process (pip download, pip install, a model worker) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not download, install or run anything")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


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
    assert corpora.split_tagged("The/DT dog/NN ./.") == [("The", "DT"), ("dog", "NN"), (".", ".")]
    assert corpora.split_tagged(r"a/b/NN \/NN one/NN|CD bare") == [
        ("a/b", "NN"),
        ("\\", "NN"),
        ("one", "NN|CD"),
        ("bare", ""),
    ]
    assert corpora.split_tagged("   ") == []


def test_strip_tags_wsj_line():
    line = "Pierre/NNP Vinken/NNP ,/, 61/CD years/NNS old/JJ ,/, will/MD join/VB Nov./NNP 29/CD ./."
    assert corpora.strip_tags(line) == "Pierre Vinken, 61 years old, will join Nov. 29."


def _words(text: str) -> list[str]:
    return text.split()


def test_detokenize_quotes_clitics_and_currency():
    toks = _words("He said `` I ca n't pay $ 5 '' ; it 's 10 % off ( really ) .")
    assert corpora.detokenize(toks) == "He said \"I can't pay $5\"; it's 10% off (really)."
    assert corpora.detokenize(_words('a " b c " d " e " .')) == 'a "b c" d "e".'
    assert corpora.detokenize(_words("-LRB- x -RRB- the investors ' money")) == "(x) the investors' money"
    assert corpora.detokenize(_words("'' Neither was aware .")) == "Neither was aware."
    assert corpora.detokenize([]) == ""


def test_tagged_to_lines_drops_blank_and_punctuation_only_lines():
    text = 'Hello/UH ,/, world/NN !/.\n\n"/"\n  \nIt/PRP works/VBZ ./.\n'
    assert corpora.tagged_to_lines(text) == ["Hello, world!", "It works."]


def test_clean_lines():
    assert corpora.clean_lines("  To be,\n\n\tor not\n   \n") == ["To be,", "or not"]


# --- polarity csv -> jsonl -----------------------------------------------------------------


POLARITY_CSV = (
    '\ufeff"1","a gorgeous , "" witty "" film . \n"\n'
    '"-1","dull and\nlong , spanning two lines . "\n'
    "\n"
    '"1",plain unquoted text\n'
).encode()


def test_parse_polarity_csv_bom_quotes_and_multiline():
    rows = corpora.parse_polarity_csv(POLARITY_CSV)
    assert rows == [
        {"text": 'a gorgeous , " witty " film .', "label": 1},
        {"text": "dull and long , spanning two lines .", "label": 0},
        {"text": "plain unquoted text", "label": 1},
    ]


def test_parse_polarity_csv_from_file_and_jsonl_roundtrip(tmp_path):
    src = tmp_path / "polarity.csv"
    src.write_bytes(POLARITY_CSV)
    rows = corpora.parse_polarity_csv(src.read_bytes())
    out = tmp_path / "rt.jsonl"
    assert corpora.write_jsonl(out, rows) == 3
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
        corpora.parse_polarity_csv(data)


# --- splits ------------------------------------------------------------------------------------


def test_split_rows_sizes_determinism_and_recipe():
    rows = [{"text": f"s{i}", "label": i % 2} for i in range(4000)]
    train, test = corpora.split_rows(rows)
    assert (len(train), len(test)) == (3200, 800)
    assert corpora.split_rows(rows) == (train, test)
    texts = [r["text"] for r in train + test]
    assert len(set(texts)) == 4000
    assert rows[0]["text"] == "s0"  # input not shuffled in place
    reference = list(rows)
    random.Random(0).shuffle(reference)
    assert train + test == reference  # documented recipe: random.Random(0).shuffle, then slice
    other_train, _ = corpora.split_rows(rows, seed=1)
    assert other_train != train


def test_split_rows_small_and_too_small():
    train, test = corpora.split_rows(list(range(10)), n_train=6, n_test=3)
    assert len(train) == 6
    assert len(test) == 3
    assert not set(train) & set(test)
    with pytest.raises(assets.AssetError):
        corpora.split_rows(list(range(10)), n_train=8, n_test=3)


def test_split_lines_keeps_order():
    lines = [f"l{i}" for i in range(10)]
    assert corpora.split_lines(lines) == (lines[:8], lines[8:])
    calib, held = corpora.split_lines([str(i) for i in range(1001)])
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
        got = fetch.extract_zip_folder(zf, "pkg/model/", tmp_path)
    assert sorted(got) == ["1_Pooling/config.json", "config.json"]
    assert cache.list_files(tmp_path) == ["1_Pooling/config.json", "config.json"]


def test_extract_zip_folder_rejects_unsafe_and_empty(tmp_path):
    for members in ({"m/../../evil": b"x"}, {"x/y": b"x"}):
        with zipfile.ZipFile(_zip_bytes(members)) as zf, pytest.raises(assets.AssetError):
            fetch.extract_zip_folder(zf, "m/", tmp_path)


def test_find_model_folder():
    names = ["a/", "a/b/config.json", "a/b/model.safetensors", "a/b/1_Pooling/config.json"]
    assert fetch.find_model_folder(names) == "a/b/"
    assert fetch.find_model_folder(["config.json", "pytorch_model.bin"]) == ""
    with pytest.raises(assets.AssetError):
        fetch.find_model_folder(["a/config.json", "a/tokenizer.json"])


def test_read_tar_member(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"p-1/test/corpora/a&b.csv": b"hello", "p-1/x.txt": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        assert fetch.read_tar_member(tf, "test/corpora/a&b.csv") == b"hello"
        with pytest.raises(assets.AssetError):
            fetch.read_tar_member(tf, "missing.txt")


def test_convert_bin_to_safetensors_with_tied_weights(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    shared = torch.randn(4, 3)
    torch.save({"emb.weight": shared, "head.weight": shared, "b": torch.zeros(2)}, tmp_path / "w.bin")
    assert fetch.convert_bin_to_safetensors(tmp_path / "w.bin", tmp_path / "m.safetensors") == 3
    back = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(back["emb.weight"], shared)
    assert torch.equal(back["head.weight"], shared)


def test_convert_bin_refuses_non_tensor_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(1), "note": "text"}, tmp_path / "w.bin")
    with pytest.raises(assets.AssetError):
        fetch.convert_bin_to_safetensors(tmp_path / "w.bin", tmp_path / "m.safetensors")


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
    marker = cache.write_marker(root, "corpora", {"k": 1})
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
    cache.write_marker(root, "corpora")
    monkeypatch.setitem(cache.RECIPES, "corpora", cache.RECIPES["corpora"] + 1)
    assert "recipe version" in assets.marker_problem(root, "corpora")
    (root / "DONE.json").write_text("{not json")
    assert assets.read_marker(root) is None
    assert not assets.is_done(root, "corpora")


def test_write_marker_refuses_empty_folder(tmp_path):
    with pytest.raises(assets.AssetError):
        cache.write_marker(tmp_path, "corpora")


# --- ensure(): idempotence, atomicity ---------------------------------------------------------


def test_ensure_builds_once_then_skips(tmp_path, fake_builder):
    path = assets.ensure("corpora", cache=tmp_path)
    assert path == tmp_path / "corpora"
    assert cache.list_files(path) == ["a.txt", "sub/b.txt"]
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
    assert assets.expand_names(["all-models"]) == [
        "minilm",
        "corpora",
        "mpnet",
        "smollm2",
        "minilm-mr",
        "mpnet-mr",
        "gemma3",
    ]
    assert not {"minilm-mr", "mpnet-mr"} & set(assets.expand_names(["all"]))
    assert assets.expand_names(["mpnet-mr"]) == ["mpnet-mr"]
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


def test_entry_script_runs_as_a_command(tmp_path):
    """The Makefile, README and workers run ``python scripts/assets.py ...`` (package beside it)."""
    script = str(ROOT / "scripts" / "assets.py")
    listed = subprocess.run(
        [sys.executable, script, "--list", "--cache", str(tmp_path)], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
        [name, "missing"] for name in assets.BUILDERS
    ]
    worker = subprocess.run([sys.executable, script, "_worker", "nonsense"], capture_output=True, text=True)
    assert worker.returncode == 2
    assert worker.stderr.strip() == "assets.py: error: unknown worker"
    assert Path(script) == fetch.ENTRY


# --- extra Python packages: declared, checked, never installed -------------------------------

MISSING = "statprune_test_no_such_module"


def test_missing_module_stops_before_anything_with_one_line(tmp_path, monkeypatch, no_network, capsys):
    built = []
    for name in ("minilm", "corpora", "mpnet"):
        monkeypatch.setitem(assets.BUILDERS, name, lambda out, work: built.append(out) or {})
    monkeypatch.setitem(registry.REQUIRES, "smollm2", ("json", MISSING))
    before = set(sys.modules)
    assert assets.main(["all-models", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"assets.py: error: smollm2 needs the Python packages {MISSING}, which are not installed: "
        "install them with pip install 'statprune[assets]'\n"
    )
    assert built == []  # checked up front: nothing fetched before the failure
    assert not (tmp_path / "smollm2").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert MISSING not in set(sys.modules) - before
    with pytest.raises(assets.AssetError, match=r"pip install 'statprune\[assets\]'$"):
        assets.ensure("smollm2", cache=tmp_path)


def test_a_finished_asset_needs_no_extra_module(tmp_path, monkeypatch, no_network):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cache.write_marker(folder, "smollm2")
    monkeypatch.setitem(registry.REQUIRES, "smollm2", (MISSING,))
    assert assets.ensure("smollm2", cache=tmp_path) == folder
    assert assets.main(["smollm2", "--cache", str(tmp_path)]) == 0


def test_extra_modules_are_declared_in_the_assets_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in extras["assets"]}
    needed = {m for modules in registry.REQUIRES.values() for m in modules}
    assert needed == {"gguf", "accelerate", "psutil"}
    assert needed <= declared
    assert any(req.startswith("statprune[") and "assets" in req for req in extras["dev"])


# --- fine-tuning helpers ----------------------------------------------------------------------


def test_steps_and_warmup():
    assert training.steps_per_epoch(3200, 32) == 100
    assert training.steps_per_epoch(2800, 32) == 88  # last batch of 16 still counts
    assert training.steps_per_epoch(1, 32) == 1
    assert training.warmup_steps(300, 0.1) == 30  # no float noise: 300 * 0.1 = 30.000000000000004
    assert training.warmup_steps(264, 0.1) == 27
    assert training.warmup_steps(10, 0.0) == 0
    for bad in ((0, 32), (10, 0)):
        with pytest.raises(ValueError):
            training.steps_per_epoch(*bad)
    with pytest.raises(ValueError):
        training.warmup_steps(10, 1.5)


def test_linear_schedule_shape():
    total, warm = 300, 30
    lrs = [training.linear_schedule(s, total, warm) for s in range(total + 5)]
    assert lrs[0] == 0.0
    assert lrs[15] == pytest.approx(0.5)
    assert lrs[warm] == 1.0
    assert max(lrs) == 1.0
    assert all(a <= b for a, b in itertools.pairwise(lrs[: warm + 1]))  # warming up
    assert all(a >= b for a, b in itertools.pairwise(lrs[warm:]))  # then decaying
    assert lrs[165] == pytest.approx(0.5)
    assert lrs[total - 1] == pytest.approx(1 / 270)
    assert lrs[total:] == [0.0] * 5
    assert training.linear_schedule(0, 10, 0) == 1.0  # no warmup: start at the full rate


def test_linear_schedule_matches_transformers():
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("transformers.optimization")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = optimization.get_linear_schedule_with_warmup(opt, 27, 264)
    for step in range(270):
        assert ref.lr_lambdas[0](step) == pytest.approx(training.linear_schedule(step, 264, 27))


def test_epoch_batches_are_deterministic_permutations():
    a = training.epoch_batches(100, 32, epoch=0, seed=0)
    assert [len(b) for b in a] == [32, 32, 32, 4]
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(100))
    assert flat != list(range(100))
    assert training.epoch_batches(100, 32, epoch=0, seed=0) == a
    assert flat == training.epoch_order(100, 0, 0)
    assert training.epoch_order(100, 1, 0) != flat  # a new order every epoch
    assert training.epoch_order(100, 0, 1) != flat  # and for every seed
    # documented recipe: random.Random(seed * 1_000_003 + epoch).shuffle(range(n))
    ref = list(range(100))
    random.Random(7 * 1_000_003 + 2).shuffle(ref)
    assert training.epoch_order(100, 2, 7) == ref


def test_accuracy():
    assert training.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError):
        training.accuracy([1], [1, 0])
    with pytest.raises(ValueError):
        training.accuracy([], [])


def test_check_head_loading():
    ok = {"missing_keys": {"classifier.weight", "classifier.bias"}, "unexpected_keys": {"pooler.dense.bias"}}
    info = classifiers._check_head_loading({**ok, "mismatched_keys": set(), "error_msgs": []})
    assert info == {
        "missing_keys": ["classifier.bias", "classifier.weight"],
        "unexpected_keys": ["pooler.dense.bias"],
    }
    for bad in (
        {**ok, "missing_keys": {"classifier.weight", "bert.encoder.layer.0.output.dense.weight"}},
        {**ok, "unexpected_keys": {"lm_head.dense.weight"}},
        {**ok, "mismatched_keys": {("classifier.weight", (2, 4), (3, 4))}},
        {"missing_keys": set()},  # a checkpoint that already has a head is not a base model
    ):
        with pytest.raises(assets.AssetError):
            classifiers._check_head_loading(bad)


def test_train_threads(monkeypatch):
    monkeypatch.setattr(classifiers, "THREADS", None)
    monkeypatch.delenv("STATPRUNE_THREADS", raising=False)
    assert classifiers.train_threads() is None
    monkeypatch.setenv("STATPRUNE_THREADS", "3")
    assert classifiers.train_threads() == 3
    monkeypatch.setattr(classifiers, "THREADS", 2)
    assert classifiers.train_threads() == 2
    monkeypatch.setattr(classifiers, "THREADS", None)
    for bad in ("two", "0"):
        monkeypatch.setenv("STATPRUNE_THREADS", bad)
        with pytest.raises(assets.AssetError):
            classifiers.train_threads()


def test_finetune_recipe_constants():
    assert set(classifiers.FINETUNED) <= set(cache.RECIPES)
    assert set(classifiers.FINETUNED) <= set(assets.BUILDERS)
    assert classifiers.FT_LABELS == {0: "negative", 1: "positive"}
    hp = classifiers.FT_HPARAMS
    assert (hp["batch_size"], hp["max_length"], hp["warmup_frac"]) == (32, 64, 0.1)
    for name, spec in classifiers.FINETUNED.items():
        assert registry.DEPENDS[name] == [spec["base"], "corpora"]
        assert spec["base"] in assets.BUILDERS


def test_ensure_finetuned_prepares_dependencies_then_runs_the_worker(tmp_path, monkeypatch, no_network):
    built = []

    def fake(name):
        def build(out: Path, work: Path) -> dict:
            built.append(name)
            (out / "x.txt").write_text(name)
            return {}

        return build

    for dep in ("minilm", "corpora"):
        monkeypatch.setitem(assets.BUILDERS, dep, fake(dep))
    jobs = []

    def worker(name, args, log_path, echo=False):
        assert args[0] == "finetune"
        job = json.loads(args[1])
        jobs.append(job)
        (Path(job["out"]) / "model.safetensors").write_bytes(b"w")
        return {"summary": "fake", "dense_test_accuracy": 0.5}

    monkeypatch.setattr(classifiers, "run_worker", worker)
    monkeypatch.setattr(classifiers, "THREADS", 2)
    path = assets.ensure("minilm-mr", cache=tmp_path)
    assert built == ["minilm", "corpora"]
    (job,) = jobs
    assert job["base"] == str((tmp_path / "minilm").resolve())
    assert job["corpora"] == str((tmp_path / "corpora").resolve())
    assert job["model_class"] == "BertForSequenceClassification"
    assert job["lr"] == classifiers.FINETUNED["minilm-mr"]["lr"]
    assert job["threads"] == 2
    assert job["hparams"]["epochs"] == classifiers.FT_HPARAMS["epochs"]
    info = assets.read_marker(path)["info"]
    assert info["dense_test_accuracy"] == 0.5
    assert info["inputs"]["base_asset"] == "minilm"
    assert cache.list_files(path) == ["model.safetensors"]
    assets.ensure("minilm-mr", cache=tmp_path)  # finished: nothing runs again
    assert len(jobs) == 1


def test_finetuned_builder_refuses_missing_dependencies(tmp_path):
    out = tmp_path / ".tmp-minilm-mr-x" / "out"
    out.mkdir(parents=True)
    with pytest.raises(assets.AssetError, match="needs asset minilm"):
        classifiers.build_minilm_mr(out, tmp_path / "work")


def test_main_tune_lr_only_for_finetuned_assets(tmp_path, capsys, no_network):
    assert assets.main(["corpora", "--tune-lr", "1e-5", "--cache", str(tmp_path)]) == 1
    assert "--tune-lr applies to" in capsys.readouterr().err


def _tiny_classifier(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    words = ["good", "great", "fine", "bad", "awful", "dull", "film", "a", "very", "plot"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    cfg = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    return torch, transformers.BertForSequenceClassification(cfg), tok


TINY_ROWS = [
    {"text": t, "label": y}
    for t, y in [
        ("a good film", 1),
        ("a very great plot", 1),
        ("fine film", 1),
        ("great great film", 1),
        ("a bad film", 0),
        ("a very awful plot", 0),
        ("dull film", 0),
        ("awful dull plot", 0),
    ]
]


def test_finetune_classifier_tiny_model_is_deterministic(tmp_path):
    kwargs = dict(
        lr=5e-3,
        epochs=4,
        batch_size=3,
        max_length=8,
        warmup_frac=0.1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=0,
        eval_rows=TINY_ROWS,
    )
    runs = []
    for _ in range(2):
        torch, model, tok = _tiny_classifier(tmp_path)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lines: list[str] = []
        res = training.finetune_classifier(model, tok, TINY_ROWS, progress=lines.append, **kwargs)
        runs.append((res, model, before, lines))
    (res, model, before, lines), (res2, model2, before2, _) = runs
    assert all(torch.equal(before[k], before2[k]) for k in before)  # same seeded initial weights
    assert (res["steps"], res["steps_per_epoch"], res["warmup_steps"]) == (12, 3, 2)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
    assert all(0.0 <= h["eval_accuracy"] <= 1.0 for h in res["history"])
    assert any("step 12/12" in line for line in lines)
    state, state2 = model.state_dict(), model2.state_dict()
    assert not torch.equal(state["classifier.weight"], before["classifier.weight"])
    for k in state:  # same seed, same data order, same dropout masks -> bit-identical weights
        assert torch.equal(state[k], state2[k]), k
    assert [h["train_loss"] for h in res["history"]] == [h["train_loss"] for h in res2["history"]]
    preds, logits = training.predict_labels(model, tok, [r["text"] for r in TINY_ROWS], 8, 5)
    assert logits.shape == (8, 2)
    assert preds == logits.argmax(-1).tolist()
    assert not model.training
