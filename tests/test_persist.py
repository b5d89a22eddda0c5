"""Saved folders reload to identical outputs, with statprune and with plain transformers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DECODER_FAMILIES, TINY_FAMILIES, _build_tiny_tokenizer, build_tiny_model, tiny_texts

import statprune
from statprune.errors import OutputError

TOKENIZER = _build_tiny_tokenizer()


def _inputs(family):
    enc = TOKENIZER(tiny_texts(12, seed=3), return_tensors="pt", padding=True)
    if family != "bert":
        enc.pop("token_type_ids", None)
    return dict(enc)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _pruned(family, budget=0.4):
    model = build_tiny_model(family)
    return statprune.compress(model, TOKENIZER, tiny_texts(300), keep_flops=budget, progress=False)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_load_reproduces_outputs(family, tmp_path):
    pruned, report = _pruned(family)
    out = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report)
    loaded = statprune.load(out)
    assert type(loaded).__name__ == type(pruned).__name__
    assert isinstance(loaded, type(pruned).__mro__[1])  # the stock transformers task class
    inputs = _inputs(family)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pruned, inputs), rtol=0, atol=1e-6)
    saved = json.loads((out / "statprune.json").read_text())
    assert saved["flops_kept"] == pytest.approx(report.flops_kept)
    assert [len(layer["heads_kept"]) for layer in saved["layers"]] == [
        len(lr.heads_kept) for lr in report.layers
    ]
    assert statprune.load_report(out).to_dict() == report.to_dict()
    assert {"config.json", "model.safetensors", "modeling_statprune.py", "statprune.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".out.tmp-*"))


_PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import sys
    sys.modules["statprune"] = None  # importing statprune must fail in here
    import torch, transformers
    folder, auto_name = sys.argv[1], sys.argv[2]
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, folder + "/remote_logits.pt")
    print(type(model).__module__)
    """
)


@pytest.mark.parametrize(
    ("family", "auto"),
    [("mpnet", "AutoModelForSequenceClassification"), ("llama", "AutoModelForCausalLM")],
)
def test_plain_transformers_loads_without_statprune(family, auto, tmp_path):
    pruned, report = _pruned(family, budget=0.3)
    out = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report)
    inputs = _inputs(family)
    torch.save(inputs, out / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN_TRANSFORMERS, str(out), auto],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "modeling_statprune" in result.stdout  # the shipped code, not statprune, built it
    remote = torch.load(out / "remote_logits.pt")
    torch.testing.assert_close(remote, _logits(pruned, inputs), rtol=0, atol=1e-6)


def test_auto_model_loads_base_model_of_a_task_checkpoint(tmp_path):
    import transformers

    pruned, report = _pruned("bert")
    out = statprune.save(pruned, tmp_path / "out", tokenizer=TOKENIZER, report=report)
    base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    inputs = _inputs("bert")
    with torch.no_grad():
        expected = pruned.base_model(**inputs).last_hidden_state
        got = base(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    pruned, report = _pruned("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="not empty"):
        statprune.save(pruned, out, report=report)
    assert (out / "keep.txt").read_text() == "precious"
    statprune.save(pruned, out, report=report, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    pruned, report = _pruned("bert")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(report), "save", boom)
    with pytest.raises(KeyboardInterrupt):
        statprune.save(pruned, tmp_path / "out", report=report)
    assert list(tmp_path.iterdir()) == []


def test_saving_does_not_leave_auto_map_on_the_model(tmp_path):
    pruned, report = _pruned("bert")
    statprune.save(pruned, tmp_path / "out", report=report)
    assert getattr(pruned.config, "auto_map", None) is None


def test_load_plain_hf_folder(tmp_path):
    model = build_tiny_model("bert")
    model.save_pretrained(tmp_path / "plain")
    loaded = statprune.load(tmp_path / "plain")
    inputs = _inputs("bert")
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs))


@pytest.mark.parametrize("family", DECODER_FAMILIES[:1])
def test_compressing_a_compressed_model_again(family, tmp_path):
    pruned, report = _pruned(family, budget=0.7)
    out = statprune.save(pruned, tmp_path / "once", tokenizer=TOKENIZER, report=report)
    again, report2 = statprune.compress(
        statprune.load(out), TOKENIZER, tiny_texts(300), keep_flops=0.7, progress=False
    )
    out2 = statprune.save(again, tmp_path / "twice", report=report2)
    inputs = _inputs(family)
    torch.testing.assert_close(
        _logits(statprune.load(out2), inputs), _logits(again, inputs), rtol=0, atol=1e-6
    )
    assert report2.flops_before == report.flops_after


def test_a_folder_naming_a_head_it_does_not_ship_loads_as_the_base_model(tmp_path):
    """all-mpnet-base-v2 names MPNetForMaskedLM but ships the encoder alone: loading the named
    class would give a random LM head, whose gradients would then drive the calibration."""
    from transformers import MPNetConfig, MPNetModel

    from statprune.persist import HeadlessCheckpointWarning

    config = MPNetConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50
    )
    torch.manual_seed(0)
    encoder = MPNetModel(config).eval()
    encoder.save_pretrained(tmp_path / "st")
    saved = json.loads((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "st" / "config.json").write_text(json.dumps({**saved, "architectures": ["MPNetForMaskedLM"]}))
    with pytest.warns(HeadlessCheckpointWarning, match="no weights for its head .*loaded as MPNetModel"):
        model = statprune.load(tmp_path / "st")
    assert type(model).__name__ == "MPNetModel"
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, encoder(ids).last_hidden_state)
    # a checkpoint with its head loads as its task class, without the warning
    build_tiny_model("bert").save_pretrained(tmp_path / "cls")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadlessCheckpointWarning)
        assert type(statprune.load(tmp_path / "cls")).__name__ == type(build_tiny_model("bert")).__name__


_TOKENIZER_ONLY = """
import sys
from transformers import AutoTokenizer
kwargs = {} if sys.argv[2] == "default" else {"trust_remote_code": sys.argv[2] == "True"}
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], **kwargs)
print("ids", tokenizer("a b c")["input_ids"])
"""


def _load_tokenizer_plainly(folder, trust: str) -> subprocess.CompletedProcess:
    """``AutoTokenizer.from_pretrained(folder)`` with transformers alone, stdin closed."""
    return subprocess.run(
        [sys.executable, "-c", _TOKENIZER_ONLY, str(folder), trust],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def compressed_folder(tmp_path_factory):
    pruned, report = _pruned("llama", budget=0.5)
    return statprune.save(pruned, tmp_path_factory.mktemp("tok") / "out", tokenizer=TOKENIZER, report=report)


def test_plain_transformers_loads_the_tokenizer_as_the_card_says_without_a_prompt(compressed_folder):
    """The card's and README's line, ``AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)``:
    the saved tokenizer, no question asked (stdin closed)."""
    result = _load_tokenizer_plainly(compressed_folder, "True")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ids {TOKENIZER('a b c')['input_ids']}" in result.stdout
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    card = (compressed_folder / "README.md").read_text()
    assert 'AutoTokenizer.from_pretrained("out", trust_remote_code=True)' in card


@pytest.mark.xfail(
    strict=True,
    reason="transformers>=5 AutoTokenizer reads config.json through AutoConfig before "
    "tokenizer_config.json; a statprune_<type> model_type with an AutoConfig auto_map entry makes it "
    "ask (it still loads). Not fixable at save time without breaking trust_remote_code=True loads "
    "(no AutoConfig) or the stock loaders' refusal (stock model_type). Strict: passes once it is.",
)
def test_plain_transformers_loads_the_tokenizer_without_trust_remote_code_and_no_prompt(compressed_folder):
    result = _load_tokenizer_plainly(compressed_folder, "default")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
