"""needle-lm end to end: train, resume, evaluate and generate on a tiny corpus, and every bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

import needle as ndl
from needle.data import Corpus
from needle.lm import Checkpoint, load_checkpoint, save_checkpoint
from needle.lm.__main__ import main
from needle.lm.checkpoint import named_parameters
from needle.lm.commands import format_ppl
from needle.lm.config import BUILTIN
from needle.lm.corpus import build_vocab, read_splits
from needle.lm.corpus_builtin import builtin_lines
from needle.models import LanguageModel

METRIC_KEYS = {"epoch", "train_loss", "train_ppl", "valid_loss", "valid_ppl", "lr", "seconds", "tokens_per_s"}
TINY = ["--embedding-size", "12", "--hidden-size", "16", "--seq-len", "8", "--batch-size", "4",
        "--lr", "0.01", "--dropout", "0.2", "--seed", "3"]


def _sentences(rng, n):
    subjects = ["the cat", "the dog", "a bird", "my friend", "the child"]
    verbs = ["sees", "likes", "chases", "finds"]
    objects = ["the ball", "a mouse", "the tree", "some food", "the river"]
    lines = []
    for _ in range(n):
        words = [subjects[rng.integers(5)], verbs[rng.integers(4)], objects[rng.integers(5)]]
        if rng.random() < 0.3:
            words.append("again")
        lines.append(" ".join(words) + " .")
    return lines


def _write_corpus(directory, train=240, valid=40, test=40):
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for name, n in (("train", train), ("valid", valid), ("test", test)):
        if n is not None:
            with open(os.path.join(directory, f"{name}.txt"), "w") as f:
                f.write("\n".join(_sentences(rng, n)) + "\n")
    return str(directory)


def _cli(capsys, *argv):
    """(exit status, stdout, stderr) of one in-process run."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _metrics(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


def _epochs(run):
    """metrics.json's rows of the epochs (without the last one, of the test split)."""
    return [row for row in _metrics(run) if row["epoch"] != "test"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """An uninterrupted two-epoch run on the tiny corpus."""
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--data", corpus, "--out", out, "--epochs", "2", *TINY]) == 0
    return out


# ---- train ----------------------------------------------------------------------------------------

def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "needle.lm", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "generate"):
        assert command in result.stdout


def test_train_writes_its_files_and_the_loss_falls(corpus, run):
    for name in ("checkpoint.safetensors", "best.safetensors", "metrics.json", "perplexity.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    assert not [name for name in os.listdir(run) if name.endswith(".tmp")]
    metrics = _epochs(run)
    assert [row["epoch"] for row in metrics] == [1, 2]
    for row in metrics:
        assert set(row) == METRIC_KEYS
        assert row["train_ppl"] == pytest.approx(math.exp(row["train_loss"]))
        assert row["valid_ppl"] == pytest.approx(math.exp(row["valid_loss"]))
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    with open(os.path.join(run, "perplexity.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    checkpoint = load_checkpoint(run)
    assert checkpoint.epoch == 2 and checkpoint.metrics == metrics
    assert checkpoint.config["data"] == os.path.abspath(corpus)
    assert checkpoint.config["hidden_size"] == 16 and checkpoint.config["optimizer"] == "adam"


def test_train_prints_one_line_per_epoch(corpus, tmp_path, capsys):
    status, out, err = _cli(capsys, "train", "--data", corpus, "--out", tmp_path, "--epochs", "2", *TINY)
    assert status == 0
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "ppl" in lines[0] and "tok/s" in lines[0]
    assert "tok/s" in err and "ppl=" in err  # the progress bar


def test_same_seed_gives_identical_numbers(corpus, run, tmp_path, capsys):
    assert _cli(capsys, "train", "--data", corpus, "--out", tmp_path, "--epochs", "2", *TINY)[0] == 0
    drop = ("seconds", "tokens_per_s")
    strip = lambda rows: [{k: v for k, v in row.items() if k not in drop} for row in rows]  # noqa: E731
    assert strip(_metrics(tmp_path)) == strip(_metrics(run))
    a, b = load_checkpoint(tmp_path), load_checkpoint(run)
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])


def test_resume_ends_where_an_uninterrupted_run_ends(corpus, run, tmp_path, capsys):
    assert _cli(capsys, "train", "--data", corpus, "--out", tmp_path, "--epochs", "1", *TINY)[0] == 0
    assert len(_epochs(tmp_path)) == 1
    status, out, err = _cli(capsys, "train", "--out", tmp_path, "--resume", "--epochs", "2")
    assert status == 0 and "resuming" in out and "warning" not in err
    resumed, whole = load_checkpoint(tmp_path), load_checkpoint(run)
    assert resumed.epoch == 2
    assert list(resumed.weights) == list(whole.weights)
    for name in whole.weights:
        np.testing.assert_array_equal(resumed.weights[name], whole.weights[name])
    assert sorted(resumed.optimizer_state) == sorted(whole.optimizer_state)
    for key, value in whole.optimizer_state.items():
        np.testing.assert_array_equal(resumed.optimizer_state[key], value)
    np.testing.assert_array_equal(resumed.rng_state[1], whole.rng_state[1])
    assert resumed.rng_state[2:] == whole.rng_state[2:]
    for a, b in zip(_epochs(tmp_path), _epochs(run), strict=True):
        for key in ("epoch", "train_loss", "train_ppl", "valid_loss", "valid_ppl", "lr"):
            assert a[key] == b[key]
    assert _metrics(tmp_path)[-1] == _metrics(run)[-1]  # the test split, once, last
    assert [row["epoch"] for row in _metrics(tmp_path)].count("test") == 1


def test_resume_keeps_the_checkpoint_configuration(run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    status, stdout, err = _cli(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--lr", "0.5",
                               "--hidden-size", "16")
    assert status == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--lr 0.5" in warnings[0] and "hidden" not in warnings[0]
    checkpoint = load_checkpoint(out)
    assert checkpoint.epoch == 3 and checkpoint.config["lr"] == 0.01 and checkpoint.config["epochs"] == 3
    assert [row["epoch"] for row in _metrics(out)] == [1, 2, 3, "test"]
    status, stdout, _ = _cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert status == 0 and "nothing to train" in stdout and load_checkpoint(out).epoch == 3


def test_fresh_run_replaces_a_checkpoint(corpus, run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    status, _, err = _cli(capsys, "train", "--data", corpus, "--out", out, "--epochs", "1", *TINY)
    assert status == 0 and "replaces" in err
    assert load_checkpoint(out).epoch == 1 and len(_epochs(out)) == 1


def test_zero_epochs_saves_the_initial_model(corpus, tmp_path, capsys):
    assert _cli(capsys, "train", "--data", corpus, "--out", tmp_path, "--epochs", "0", *TINY)[0] == 0
    assert load_checkpoint(tmp_path).epoch == 0 and _metrics(tmp_path) == []
    assert _cli(capsys, "evaluate", tmp_path)[0] == 0


def test_without_valid_txt_it_validates_on_test(tmp_path, capsys):
    data = _write_corpus(tmp_path / "data", valid=None)
    status, out, err = _cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", *TINY)
    assert status == 0 and "validating on the test split" in err and "test loss" in out
    status, _, err = _cli(capsys, "evaluate", tmp_path / "run", "--split", "valid")
    assert status == 2 and "no valid split" in err


def test_gru_rnn_and_tied_weights_train_and_reload(corpus, tmp_path, capsys):
    for model in ("gru", "rnn"):
        args = ["train", "--data", corpus, "--out", tmp_path / model, "--epochs", "1", "--model", model, *TINY]
        assert _cli(capsys, *args)[0] == 0
        assert _cli(capsys, "evaluate", tmp_path / model)[0] == 0
    args = ["train", "--data", corpus, "--out", tmp_path / "tied", "--epochs", "1", *TINY,
            "--embedding-size", "16", "--tie-weights", "--optimizer", "sgd", "--lr", "1"]
    assert _cli(capsys, *args)[0] == 0
    checkpoint = load_checkpoint(tmp_path / "tied")
    assert checkpoint.config["tie_weights"] and "linear.weight" not in checkpoint.weights
    assert _cli(capsys, "generate", tmp_path / "tied", "--tokens", "3", "--seed", "0")[0] == 0


# ---- evaluate and generate ---------------------------------------------------------------------

def test_evaluate_prints_the_perplexity(run, capsys):
    status, out, _ = _cli(capsys, "evaluate", run)
    assert status == 0 and out.startswith("test: loss") and "perplexity" in out
    status, out, _ = _cli(capsys, "evaluate", os.path.join(run, "checkpoint.safetensors"), "--split", "valid",
                          "--json")
    assert status == 0
    result = json.loads(out)
    assert set(result) == {"loss", "perplexity", "accuracy", "tokens"}
    # the same split, batch size and weights as the last epoch's validation
    assert result["loss"] == pytest.approx(_epochs(run)[-1]["valid_loss"], rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 0 <= result["accuracy"] <= 1 and isinstance(result["tokens"], int) and result["tokens"] > 0


def test_evaluate_on_other_data_warns_once_about_unknown_words(run, tmp_path, capsys):
    data = tmp_path / "other"
    data.mkdir()
    (data / "train.txt").write_text("the cat sees the ball .\n" * 20)
    (data / "test.txt").write_text("the zebra sees the quokka .\nthe zebra likes a yak .\n" * 10)
    status, out, err = _cli(capsys, "evaluate", run, "--data", data, "--json")
    assert status == 0 and json.loads(out)["tokens"] > 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "3 unknown words (40 occurrences)" in warnings[0] and "'zebra'" in warnings[0]


def test_generate_is_deterministic_given_a_seed(run, capsys):
    args = ["generate", run, "--prompt", "the cat", "--tokens", "12", "--seed", "7"]
    status, first, err = _cli(capsys, *args)
    assert status == 0 and err == ""
    assert first == _cli(capsys, *args)[1]
    words = first.split()
    assert words[:2] == ["the", "cat"] and len(words) == 14
    vocab = set(load_checkpoint(run).vocab)
    assert set(words) <= vocab
    assert _cli(capsys, "generate", run, "--tokens", "5", "--seed", "1")[1].count(" ") == 4
    assert _cli(capsys, "generate", run, "--prompt", "the dog", "--tokens", "0")[1] == "the dog\n"
    cold = _cli(capsys, "generate", run, "--tokens", "30", "--seed", "2", "--temperature", "0.01")[1].split()
    assert "<eos>" in cold  # near argmax on a corpus of short lines


def test_generate_warns_once_about_unknown_prompt_words(run, capsys):
    status, out, err = _cli(capsys, "generate", run, "--prompt", "the zebra chases a yak", "--tokens", "3",
                            "--seed", "0")
    assert status == 0 and out.startswith("the zebra chases a yak ")
    assert err.count("warning") == 1 and "2 unknown words" in err and "'zebra', 'yak'" in err


# ---- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_round_trips_exactly(run, tmp_path):
    first = load_checkpoint(run)
    save_checkpoint(tmp_path / "again.safetensors", first)
    second = load_checkpoint(tmp_path / "again.safetensors")
    assert (first.config, first.vocab, first.epoch, first.metrics) == \
           (second.config, second.vocab, second.epoch, second.metrics)
    assert list(first.weights) == list(second.weights)
    for name, array in first.weights.items():
        assert second.weights[name].dtype == np.float32
        np.testing.assert_array_equal(second.weights[name], array)
    assert first.optimizer_state.keys() == second.optimizer_state.keys()
    for key, value in first.optimizer_state.items():
        np.testing.assert_array_equal(second.optimizer_state[key], value)
    assert first.rng_state[0] == second.rng_state[0] and first.rng_state[2:] == second.rng_state[2:]
    np.testing.assert_array_equal(first.rng_state[1], second.rng_state[1])
    assert second.rng_state[1].dtype == np.uint32
    with open(os.path.join(run, "checkpoint.safetensors"), "rb") as a, \
            open(tmp_path / "again.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_weights_are_named_by_attribute_path():
    model = LanguageModel(4, 10, 6, num_layers=2, seq_model="lstm")
    named = named_parameters(model)
    assert [p for _, p in named] == model.parameters()
    names = [name for name, _ in named]
    assert names[0] == "embedding.weight" and "seq.lstm_cells.1.W_hh" in names and names[-1] == "linear.bias"
    checkpoint = Checkpoint.capture(model, ndl.optim.SGD(model.parameters()), {}, [], 0, [])
    assert list(checkpoint.weights) == names


# ---- bad input ---------------------------------------------------------------------------------------

def _rewrite(source, target, edit):
    """Copy a checkpoint, letting `edit(tensors, meta)` change its tensors and needle-lm metadata."""
    with open(source, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + size])["__metadata__"]
    meta = json.loads(metadata["needle-lm"])
    tensors = load_tensors(data)
    edit(tensors, meta)
    metadata["needle-lm"] = json.dumps(meta)
    with open(target, "wb") as f:
        f.write(save_tensors(tensors, metadata=metadata))
    return target


def _bad_checkpoints(run, directory):
    source = os.path.join(run, "checkpoint.safetensors")
    with open(source, "rb") as f:
        data = f.read()
    paths = {}
    for name, content in (("truncated", data[: len(data) // 2]), ("tiny", b"abc"),
                          ("random", np.random.default_rng(0).bytes(5000)),
                          ("plain", save_tensors({"w": np.zeros(3, np.float32)}, metadata={"a": "b"}))):
        paths[name] = directory / f"{name}.safetensors"
        paths[name].write_bytes(content)

    def wrong_size(tensors, meta):
        meta["config"]["hidden_size"] = 8

    def missing_weight(tensors, meta):
        del tensors["weight.linear.bias"]
        meta["weights"].remove("linear.bias")

    def bad_config(tensors, meta):
        meta["config"]["layers"] = 0

    for edit in (wrong_size, missing_weight, bad_config):
        paths[edit.__name__] = _rewrite(source, directory / f"{edit.__name__}.safetensors", edit)
    return paths


BAD_TRAIN = [
    (["--embedding-size", "0"], "--embedding-size must be a whole number of at least 1, got 0"),
    (["--hidden-size", "-3"], "--hidden-size must be"),
    (["--layers", "0"], "--layers must be"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--seq-len", "0"], "--seq-len must be"),
    (["--epochs", "-1"], "--epochs must be a whole number of at least 0"),
    (["--lr", "0"], "--lr must be a number above 0"),
    (["--lr", "-0.1"], "--lr must be"),
    (["--lr", "nan"], "--lr must be"),
    (["--dropout", "1"], "--dropout must lie in [0, 1)"),
    (["--dropout", "-0.5"], "--dropout must lie"),
    (["--clip", "-1"], "--clip must be"),
    (["--max-lines", "0"], "--max-lines must be"),
    (["--seed", "-1"], "--seed must be"),
    (["--anneal", "0.5"], "--anneal must be a number of at least 1 (1: keep the learning rate), got 0.5"),
    (["--anneal", "inf"], "--anneal must be"),
    (["--patience", "-1"], "--patience must be a whole number of at least 0 (0: never stop early), got -1"),
    (["--tie-weights"], "--tie-weights needs --embedding-size equal to --hidden-size, got 12 and 16"),
    (["--batch-size", "5000"], "the train split is too short"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_options(corpus, tmp_path, capsys, extra, message):
    status, _, err = _cli(capsys, "train", "--data", corpus, "--out", tmp_path, *TINY, *extra)
    assert status == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("needle-lm: error: ") and message in lines[0], err
    assert not os.path.exists(tmp_path / "checkpoint.safetensors")


def test_bad_input_is_one_line_and_status_2(corpus, run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("\n\n")
    (empty / "test.txt").write_text("a b\n")
    no_test = tmp_path / "no_test"
    no_test.mkdir()
    (no_test / "train.txt").write_text("a b\n")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "train.txt").write_bytes(b"\xff\xfe\x00 bad")
    (binary / "test.txt").write_text("a b\n")
    bad = _bad_checkpoints(run, tmp_path)
    cases = [
        (["train", "--data", tmp_path / "nowhere"], "data directory not found"),
        (["train", "--data", no_test], "missing file"),
        (["train", "--data", empty], "empty corpus: the train split"),
        (["train", "--data", binary], "cannot read the corpus"),
        (["train", "--out", tmp_path / "fresh", "--resume"], "--resume: no checkpoint in"),
        (["train", "--data", corpus, "--out", no_test / "train.txt"], "cannot create the output directory"),
        (["evaluate", tmp_path / "missing.safetensors"], "checkpoint not found"),
        (["evaluate", tmp_path / "nothing_here"], "checkpoint not found"),
        (["evaluate", bad["truncated"]], "corrupt or foreign checkpoint"),
        (["evaluate", bad["tiny"]], "too short to be a safetensors file"),
        (["evaluate", bad["random"]], "corrupt or foreign checkpoint"),
        (["generate", bad["plain"]], "a safetensors file without needle-lm metadata"),
        (["evaluate", bad["wrong_size"]], "has shape"),
        (["evaluate", bad["missing_weight"]], "missing ['linear.bias']"),
        (["generate", bad["bad_config"]], "bad configuration: --layers must be"),
        (["evaluate", run, "--data", tmp_path / "nowhere"], "data directory not found"),
        (["evaluate", run, "--data", empty, "--split", "test"], None),
        (["generate", run, "--tokens", "-1"], "--tokens must be a whole number of at least 0"),
        (["generate", run, "--temperature", "0"], "--temperature must be a number above 0"),
        (["generate", run, "--temperature", "-2"], "--temperature must be"),
    ]
    if not ndl.cuda().enabled():
        cases.append((["train", "--data", corpus, "--out", tmp_path / "gpu", "--device", "cuda"],
                      "device cuda is not available"))
    for argv, message in cases:
        status, out, err = _cli(capsys, *argv)
        if message is None:  # a valid run on odd but usable data
            assert status == 0, err
            continue
        assert status == 2, (argv, err)
        assert "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("needle-lm: error: ") and message in lines[0], (argv, err)


def test_argparse_errors_also_exit_2(capsys):
    for argv in (["train", "--layers", "two"], ["evaluate"], ["train", "--model", "transformer"], [],
                 ["generate", "x", "--tokens", "1.5"]):
        status, _, err = _cli(capsys, *argv)
        assert status == 2 and "Traceback" not in err and "error:" in err.splitlines()[-1]


# ---- the built-in corpus and data reading ---------------------------------------------------------------

def test_builtin_corpus_is_deterministic_and_small():
    first, second = builtin_lines(), builtin_lines()
    assert first == second
    assert all(first[name] for name in ("train", "valid", "test"))
    assert len(first["train"]) > 5 * len(first["valid"])
    splits = read_splits(BUILTIN)
    vocab = build_vocab(splits)
    assert "<unk>" in vocab and "<eos>" in vocab and len(vocab) == len(set(vocab))
    assert 500 < len(vocab) < 5000
    assert set(splits["valid"]) <= set(vocab) and set(splits["test"]) <= set(vocab)
    assert all(word == word.lower() for word in vocab)
    limited = builtin_lines(max_lines=7)
    assert all(len(limited[name]) == 7 for name in limited) and limited["train"] == first["train"][:7]


def test_directories_are_read_like_needle_data_corpus(corpus):
    reference = Corpus(corpus, max_lines=50)
    splits = read_splits(corpus, max_lines=50)
    vocab = build_vocab(splits)
    assert vocab == reference.dictionary.idx2word + ["<unk>"]
    for name in ("train", "valid", "test"):
        assert [vocab.index(w) for w in splits[name]] == getattr(reference, name)


def test_short_training_run_on_the_builtin_corpus(tmp_path, capsys):
    status, out, _ = _cli(capsys, "train", "--out", tmp_path, "--max-lines", "40", "--epochs", "1",
                          "--embedding-size", "8", "--hidden-size", "8", "--batch-size", "4")
    assert status == 0 and "epoch   1/1" in out
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.config["data"] == BUILTIN and checkpoint.config["max_lines"] == 40
    assert len(_epochs(tmp_path)) == 1
    status, out, _ = _cli(capsys, "evaluate", tmp_path, "--json")
    assert status == 0 and json.loads(out)["tokens"] > 0
    status, out, _ = _cli(capsys, "generate", tmp_path, "--prompt", "The", "--tokens", "4", "--seed", "0")
    assert status == 0 and len(out.split()) == 5


# ---- --grad-flow --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "reference"])
def test_grad_flow_writes_json_and_heat_map(corpus, tmp_path, capsys, monkeypatch, fused):
    monkeypatch.setenv("NEEDLE_FUSED", fused)
    out = tmp_path / "gf"
    status, _, err = _cli(capsys, "train", "--data", corpus, "--out", out, "--epochs", "2", "--layers", "2",
                          "--grad-flow", *TINY)
    assert status == 0, err
    with open(out / "grad_flow.json") as f:
        rows = json.load(f)
    assert [r["epoch"] for r in rows] == [1, 2]
    flow = np.array(rows[0]["grad_flow"])
    assert flow.shape == (2, 8) and (flow > 0).all() and rows[0]["first_nonfinite"] is None
    assert (out / "grad_flow.png").stat().st_size > 1000
    # --resume keeps the earlier epochs' records
    status, _, err = _cli(capsys, "train", "--out", out, "--epochs", "3", "--resume", "--grad-flow")
    assert status == 0, err
    with open(out / "grad_flow.json") as f:
        assert [r["epoch"] for r in json.load(f)] == [1, 2, 3]


def test_first_nonfinite_names_the_earliest_step_and_layer():
    from needle.lm.grad_flow import first_nonfinite
    flow = np.ones((3, 6))
    assert first_nonfinite(flow) is None
    flow[2, 1] = np.inf
    flow[1, 4] = np.nan
    flow[0, 1] = np.nan
    assert first_nonfinite(flow) == {"step": 1, "layer": 0}


def test_exploding_gradients_are_reported(corpus, tmp_path, capsys):
    """A huge learning rate drives the weights to inf; the run names where dL/dh_t first went bad."""
    out = tmp_path / "boom"
    status, _, err = _cli(capsys, "train", "--data", corpus, "--out", out, "--epochs", "2", "--grad-flow",
                          "--model", "rnn", "--optimizer", "sgd", "--lr", "1e30", "--clip", "0", *TINY[:8])
    assert status == 0, err
    with open(out / "grad_flow.json") as f:
        rows = json.load(f)
    bad = [r for r in rows if r["first_nonfinite"] is not None]
    assert bad, rows
    assert "turned NaN or infinite first at step" in err


# ---- long runs: best.safetensors, --anneal, --patience, the test split, divergence ------------------------

# SGD at a high rate on the tiny corpus: the valid loss falls, rises, falls again and rises at the end
BOUNCY = ["--embedding-size", "12", "--hidden-size", "16", "--seq-len", "8", "--batch-size", "4",
          "--optimizer", "sgd", "--lr", "20", "--dropout", "0.3", "--seed", "3"]
TIMINGS = ("seconds", "tokens_per_s")


def _child(*argv, timeout=120):
    """(exit status, stdout, stderr) of `python -m needle.lm ...` in a child process (PYTHONPATH inherited)."""
    result = subprocess.run([sys.executable, "-m", "needle.lm", *map(str, argv)], capture_output=True,
                            text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def _error_line(err):
    """The one `needle-lm: error:` line of stderr (tqdm's bars end in carriage returns, not newlines)."""
    lines = [line.rpartition("\r")[2] for line in err.split("\n") if "needle-lm: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _strict_json(path):
    """metrics.json read as standard JSON: NaN and Infinity are not JSON."""
    with open(path) as f:
        return json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


def _all_finite(checkpoint):
    return all(np.isfinite(w).all() for w in checkpoint.weights.values())


@pytest.fixture(scope="module")
def bouncy(corpus, tmp_path_factory):
    """Six epochs whose valid loss does not always improve: (output directory, stdout)."""
    out = tmp_path_factory.mktemp("bouncy")
    status, stdout, err = _child("train", "--data", corpus, "--out", out, "--epochs", "6", *BOUNCY)
    assert status == 0, err
    return str(out), stdout


def test_best_checkpoint_and_the_learning_rate_follow_the_valid_loss(bouncy):
    out, stdout = bouncy
    rows = _epochs(out)
    valid = [row["valid_loss"] for row in rows]
    best_epoch = 1 + valid.index(min(valid))
    assert best_epoch < len(rows) == 6, "the run should end on an epoch that is not the best"
    best, last = load_checkpoint(os.path.join(out, "best.safetensors")), load_checkpoint(out)
    assert best.epoch == best_epoch and best.metrics == rows[:best_epoch]
    assert last.epoch == 6 and last.metrics == rows
    assert any((best.weights[k] != last.weights[k]).any() for k in best.weights)
    lr = 20.0  # divided by --anneal (4) after every epoch whose valid loss is not below all before it
    for i, row in enumerate(rows):
        assert row["lr"] == lr, (i, [r["lr"] for r in rows], valid)
        if i and valid[i] >= min(valid[:i]):
            lr /= 4
    assert lr < 20 and last.lr == lr and best.lr == rows[best_epoch - 1]["lr"]
    verdicts = [line.rpartition("| ")[2] for line in stdout.splitlines() if line.startswith("epoch")]
    assert verdicts.count("best so far") == sum(1 for i, v in enumerate(valid) if not i or v < min(valid[:i]))
    assert any(v.startswith("lr -> ") for v in verdicts)


def test_evaluate_and_generate_on_a_directory_use_best_safetensors(bouncy, capsys):
    out, _ = bouncy
    rows = _epochs(out)
    best = min(rows, key=lambda row: row["valid_loss"])
    status, stdout, _ = _cli(capsys, "evaluate", out, "--split", "valid", "--json")
    assert status == 0 and json.loads(stdout)["loss"] == pytest.approx(best["valid_loss"], rel=1e-12)
    status, stdout, _ = _cli(capsys, "evaluate", os.path.join(out, "checkpoint.safetensors"), "--split", "valid",
                             "--json")
    assert json.loads(stdout)["loss"] == pytest.approx(rows[-1]["valid_loss"], rel=1e-12)
    args = ["--tokens", "8", "--seed", "4"]
    assert _cli(capsys, "generate", out, *args)[1] == \
        _cli(capsys, "generate", os.path.join(out, "best.safetensors"), *args)[1]


def test_the_best_weights_are_evaluated_on_the_test_split_at_the_end(bouncy, capsys):
    out, stdout = bouncy
    metrics = _metrics(out)
    test = metrics[-1]
    assert set(test) == {"epoch", "test_loss", "test_ppl"} and test["epoch"] == "test"
    assert [row["epoch"] for row in metrics].count("test") == 1
    assert test["test_ppl"] == pytest.approx(math.exp(test["test_loss"]))
    status, evaluated, _ = _cli(capsys, "evaluate", out, "--split", "test", "--json")
    assert status == 0 and json.loads(evaluated)["loss"] == test["test_loss"]  # exactly what evaluate gives
    best_epoch = load_checkpoint(os.path.join(out, "best.safetensors")).epoch
    line = stdout.splitlines()[-1]
    assert line.startswith(f"test loss {test['test_loss']:.3f} ppl ") and f"epoch {best_epoch}" in line


def test_resume_with_an_annealed_rate_ends_where_an_uninterrupted_run_ends(bouncy, corpus, tmp_path):
    out, _ = bouncy
    status, _, err = _child("train", "--data", corpus, "--out", tmp_path, "--epochs", "3", *BOUNCY)
    assert status == 0, err
    assert load_checkpoint(tmp_path).lr < 20 or _epochs(tmp_path)[-1]["lr"] < 20, "no annealing before the resume"
    status, stdout, err = _child("train", "--out", tmp_path, "--resume", "--epochs", "6")
    assert status == 0 and "resuming" in stdout, err
    assert _untimed(_metrics(tmp_path)) == _untimed(_metrics(out))  # losses, rates and the test, exactly
    for name in ("checkpoint.safetensors", "best.safetensors"):
        resumed, whole = load_checkpoint(tmp_path / name), load_checkpoint(os.path.join(out, name))
        assert (resumed.epoch, resumed.lr) == (whole.epoch, whole.lr)
        for key in whole.weights:
            np.testing.assert_array_equal(resumed.weights[key], whole.weights[key])


def test_patience_stops_after_epochs_without_improvement(bouncy, corpus, tmp_path, capsys):
    out, _ = bouncy
    valid = [row["valid_loss"] for row in _epochs(out)]
    first_worse = next(i for i in range(1, len(valid)) if valid[i] >= min(valid[:i])) + 1
    status, stdout, err = _child("train", "--data", corpus, "--out", tmp_path, "--epochs", "6", "--patience", "1",
                                 *BOUNCY)
    assert status == 0, err
    assert f"(--patience 1): stopping after epoch {first_worse}" in stdout
    assert _untimed(_epochs(tmp_path)) == _untimed(_epochs(out))[:first_worse]
    assert _metrics(tmp_path)[-1]["epoch"] == "test" and load_checkpoint(tmp_path).epoch == first_worse
    # resuming a run that ran out of patience trains nothing more
    status, stdout, _ = _cli(capsys, "train", "--out", tmp_path, "--resume", "--epochs", "6")
    assert status == 0 and "stopping after epoch" in stdout and load_checkpoint(tmp_path).epoch == first_worse


def test_a_nan_loss_stops_the_run_with_status_3(corpus, tmp_path):
    status, stdout, err = _child("train", "--data", corpus, "--out", tmp_path, "--epochs", "3", "--lr", "1e38",
                                 "--clip", "0", "--grad-flow", *TINY[:8])
    assert status == 3
    line = _error_line(err)
    assert line.startswith("needle-lm: error: training diverged at epoch 1, batch ") and " of " in line
    assert "the training loss is NaN" in line and "--lr (this run: 1e+38)" in line and "--clip" in line
    assert "keeps epoch 0" in line and "epoch   1/3" not in stdout
    checkpoint = load_checkpoint(tmp_path)  # the initial weights: the last finite epoch
    assert checkpoint.epoch == 0 and _all_finite(checkpoint)
    assert not os.path.exists(tmp_path / "best.safetensors") and _strict_json(tmp_path / "metrics.json") == []
    assert [row["epoch"] for row in _strict_json(tmp_path / "grad_flow.json")] == [1]  # its first batch


def test_divergence_in_a_later_epoch_keeps_both_files_at_the_last_finite_one(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _metrics(out)

    def blow_up(tensors, meta):  # the next epoch trains at an absurd rate, unclipped
        meta["lr"], meta["config"]["clip"] = 1e38, 0
    _rewrite(out / "checkpoint.safetensors", out / "checkpoint.safetensors", blow_up)
    status, _, err = _child("train", "--out", out, "--resume", "--epochs", "4")
    assert status == 3
    line = _error_line(err)
    assert "training diverged at epoch 3, batch " in line and "keeps epoch 2" in line
    assert "(this run: 1e+38)" in line and "a --clip such as 0.25" in line
    for name in ("checkpoint.safetensors", "best.safetensors"):
        checkpoint = load_checkpoint(out / name)
        assert checkpoint.epoch == 2 and _all_finite(checkpoint)
    assert _strict_json(out / "metrics.json") == before


def test_detect_anomaly_names_the_op_and_exits_3(corpus, tmp_path):
    status, _, err = _child("train", "--data", corpus, "--out", tmp_path, "--epochs", "1", "--lr", "1e38",
                            "--clip", "0", "--detect-anomaly", *TINY[:8])
    assert status == 3
    line = _error_line(err)
    assert "training diverged at epoch 1, batch " in line
    assert "LSTM produced NaN in its forward (called at needle/nn/nn_sequence.py:" in line, line
    assert load_checkpoint(tmp_path).epoch == 0


def test_huge_losses_print_inf_perplexities_and_write_null(corpus, tmp_path, capsys):
    status, stdout, err = _cli(capsys, "train", "--data", corpus, "--out", tmp_path, "--epochs", "2", "--lr", "1e9",
                               "--clip", "0", *TINY[:8])
    assert status == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "ppl      inf" in lines[0]
    rows = _strict_json(tmp_path / "metrics.json")
    assert rows[0]["train_loss"] > 1e6 and rows[0]["train_ppl"] is None and rows[-1]["epoch"] == "test"
    assert load_checkpoint(tmp_path).metrics == rows[:-1]


def test_perplexities_of_a_million_and_above_print_in_scientific_notation():
    assert format_ppl(12.3456) == "12.35" and format_ppl(999_999.0) == "999999.00"
    assert format_ppl(1.23e15) == "1.2e+15" and format_ppl(1e6) == "1.0e+06"
    assert format_ppl(math.inf) == "inf" and format_ppl(math.nan) == "nan"
    from needle.training import perplexity
    assert perplexity(2.0) == math.exp(2.0) and perplexity(1e4) == math.inf and math.isnan(perplexity(math.nan))


def test_a_kill_9_never_leaves_a_corrupt_file(corpus, tmp_path, capsys):
    """Killed right after an epoch's line (while its files are being written) or later in the next epoch."""
    for delay in (0.0, 0.15):
        out = tmp_path / f"killed{delay}"
        child = subprocess.Popen([sys.executable, "-m", "needle.lm", "train", "--data", corpus, "--out", str(out),
                                  "--epochs", "4", *BOUNCY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
        try:
            for line in child.stdout:
                if line.startswith("epoch   2/4"):
                    break
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=60)
        checkpoint = load_checkpoint(out)
        assert 1 <= checkpoint.epoch <= 4
        assert load_checkpoint(out / "best.safetensors").epoch <= checkpoint.epoch + 1
        assert len(_epochs(out)) in (checkpoint.epoch - 1, checkpoint.epoch)
        status, _, err = _cli(capsys, "train", "--out", out, "--resume", "--epochs", "4")
        assert status == 0, err


def test_a_fresh_run_removes_an_earlier_best(run, corpus, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    assert (out / "best.safetensors").exists()
    assert _cli(capsys, "train", "--data", corpus, "--out", out, "--epochs", "0", *TINY)[0] == 0
    assert not (out / "best.safetensors").exists() and load_checkpoint(out).epoch == 0
    status, stdout, _ = _cli(capsys, "evaluate", out, "--json")  # the checkpoint, now that there is no best
    assert status == 0 and json.loads(stdout)["loss"] > 2
