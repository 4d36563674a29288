"""The one training loop (geoindex.training) on a tiny model: exact resume after a kill at any epoch, early
stopping that keeps the best epoch's weights, a pluggable higher-is-better criterion, history and curves."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from geoindex.errors import GeoindexError
from geoindex.training import VAL_ACCURACY, Checkpointing, LoopSettings, StopOn, TrainingLoop

REPO = Path(__file__).resolve().parents[1]

# A small classifier with dropout (it draws from the global RNG, as augmentations do) on noisy data, batches
# of 8 in an order drawn per epoch: a resumed run that drew anything otherwise would end with other weights.
TRAIN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from geoindex.training import Checkpointing, LoopSettings, TrainingLoop, epoch_generator

    folder, epochs = Path(sys.argv[1]), int(sys.argv[2])
    data = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 10, generator=data), torch.randint(0, 3, (64,), generator=data)
    xv, yv = torch.randn(32, 10, generator=data), torch.randint(0, 3, (32,), generator=data)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    loss_fn = nn.CrossEntropyLoss()

    def batches(epoch):
        order = torch.randperm(len(x), generator=epoch_generator(0, epoch))
        for start in range(0, len(order), 8):
            yield x[order[start:start + 8]], y[order[start:start + 8]]

    def validate():
        logits = model(xv)
        return {"loss": float(loss_fn(logits, yv)), "accuracy": float((logits.argmax(1) == yv).float().mean())}

    loop = TrainingLoop(model, optimizer, LoopSettings("tiny", epochs, patience=epochs, progress=False),
                        folder=folder, title="tiny", log=print,
                        checkpoint=Checkpointing("tiny training", "loop-epoch", plan={"lr": 3e-2}))
    result = loop.run(batches, loss_fn, validate)
    torch.save(model.state_dict(), folder / "final.pt")
    (folder / "result.json").write_text(json.dumps({"best_epoch": result.best_epoch}))
""")
EPOCHS = 4


def train(folder: Path, fault: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GEOINDEX_FAULT", None)
    if fault:
        env["GEOINDEX_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", TRAIN, str(folder), str(EPOCHS)], capture_output=True, text=True,
                          env=env, timeout=300)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_after_any_epoch_the_rerun_ends_bit_for_bit_as_an_uninterrupted_run(tmp_path):
    plain = train(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    expected = pd.read_csv(tmp_path / "plain" / "history.csv").drop(columns="seconds")
    assert len(expected) == EPOCHS
    best_epoch = json.loads((tmp_path / "plain" / "result.json").read_text())["best_epoch"]
    for kill_after in range(1, EPOCHS):
        folder = tmp_path / f"killed-{kill_after}"
        killed = train(folder, f"loop-epoch:{kill_after}")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert not (folder / "final.pt").exists()
        resumed = train(folder)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resuming the tiny training after epoch {kill_after}" in resumed.stdout
        assert f"tiny epoch  {kill_after}:" not in resumed.stdout  # the epochs done are not trained again
        assert same_weights(tmp_path / "plain" / "final.pt", folder / "final.pt"), f"killed after epoch {kill_after}"
        history = pd.read_csv(folder / "history.csv").drop(columns="seconds")
        pd.testing.assert_frame_equal(history, expected)
        assert json.loads((folder / "result.json").read_text())["best_epoch"] == best_epoch
        assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


class Scripted:
    """A validation that reports the figures it is given, epoch by epoch, and remembers the weights it saw."""

    def __init__(self, model, **figures):
        self.model, self.figures, self.seen = model, figures, []

    def __call__(self):
        self.seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        epoch = len(self.seen) - 1
        return {name: values[epoch] for name, values in self.figures.items()}


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), (lambda epoch: [(x, y)]), nn.CrossEntropyLoss()


def test_early_stopping_keeps_the_best_epochs_weights_and_says_why():
    model, optimizer, batches, loss_fn = tiny()
    validate = Scripted(model, loss=[1.0, 0.5, 0.7, 0.8, 0.9, 0.1], accuracy=[0.5, 0.6, 0.9, 0.9, 0.9, 1.0])
    lines = []
    result = TrainingLoop(model, optimizer, LoopSettings("tiny", 6, patience=2, progress=False),
                          log=lines.append).run(batches, loss_fn, validate)
    assert result.best_epoch == 2 and list(result.history["epoch"]) == [1, 2, 3, 4] and result.stopped_early
    assert all(torch.equal(model.state_dict()[k], validate.seen[1][k]) for k in validate.seen[1])
    assert not torch.equal(model.weight, validate.seen[3]["weight"])  # not the last epoch's weights
    assert lines[-1] == "early stop: no lower validation loss for 2 epochs"
    summary = result.summary()
    assert summary.startswith("kept epoch 2 of 4, the one with the lowest validation loss (0.5000)")
    assert "epoch 3 reached 0.900" in summary  # a more accurate epoch is named, and why it was not kept


def test_a_higher_is_better_metric_function_chooses_the_epoch():
    model, optimizer, batches, loss_fn = tiny()
    # The loss falls throughout; the recall peaks at epoch 2: the criterion, not the loss, picks the epoch.
    validate = Scripted(model, loss=[0.9, 0.8, 0.7, 0.6, 0.5], recall=[0.2, 0.6, 0.5, 0.55, 0.58])
    recall = StopOn(lambda row: row["val_recall"], higher_is_better=True, label="validation recall")
    lines = []
    result = TrainingLoop(model, optimizer, LoopSettings("places", 5, patience=3, stop_on=recall,
                                                         track_accuracy=False, progress=False),
                          log=lines.append).run(batches, loss_fn, validate)
    assert result.best_epoch == 2 and result.best_value == 0.6 and len(result.history) == 5
    assert all(torch.equal(model.state_dict()[k], validate.seen[1][k]) for k in validate.seen[1])
    assert "recall 0.600" in lines[1] and "acc" not in lines[1]
    assert "early stop: no higher validation recall for 3 epochs" in lines
    assert result.summary().startswith("kept epoch 2 of 5, the one with the highest validation recall (0.6000)")


def test_history_and_curves_are_written_and_training_figures_never_stored_as_validation_ones(tmp_path):
    for validated in (True, False):
        folder = tmp_path / str(validated)
        model, optimizer, batches, loss_fn = tiny()
        settings = LoopSettings("tiny", 3, patience=3, stop_on=VAL_ACCURACY, validated=validated, progress=False)
        lines = []
        result = TrainingLoop(model, optimizer, settings, folder=folder, title="tiny", log=lines.append,
                              checkpoint=Checkpointing("tiny training", "loop-epoch")).run(
            batches, loss_fn, lambda: {"loss": 1.0, "accuracy": 1.0})
        history = pd.read_csv(folder / "history.csv")
        assert list(history.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                         "seconds"]
        assert list(history["epoch"]) == [1, 2, 3] and (folder / "curves.png").read_bytes()[:4] == b"\x89PNG"
        assert (folder / "checkpoint.pt").is_file()
        if validated:
            assert (history["val_accuracy"] == 1.0).all() and result.best_value == 1.0
            assert "val loss 1.0000 acc 1.000" in lines[0]
        else:  # chosen on the training photos, yet no figure measured there is kept or said as a validation one
            assert history["val_accuracy"].isna().all() and result.best_value is None
            assert result.figure("val_accuracy") is None and result.best_epoch == 1
            assert "train (no val split) loss" in lines[0] and "val loss" not in lines[0]
            assert result.summary().startswith("no validation split: kept epoch 1 of 3, chosen on the training photos")


def test_a_checkpoint_is_refused_unless_resumed_and_one_of_another_plan_starts_over(tmp_path):
    model, optimizer, batches, loss_fn = tiny()
    run = dict(settings=LoopSettings("tiny", 2, patience=2, progress=False))
    TrainingLoop(model, optimizer, run["settings"], folder=tmp_path,
                 checkpoint=Checkpointing("tiny training", "loop-epoch", plan={"lr": 0.1})).run(
        batches, loss_fn, lambda: {"loss": 1.0})
    with pytest.raises(GeoindexError, match="a tiny training checkpoint exists.*--resume"):
        TrainingLoop(model, optimizer, run["settings"], folder=tmp_path,
                     checkpoint=Checkpointing("tiny training", "loop-epoch", resume=False))
    lines = []
    other = TrainingLoop(model, optimizer, run["settings"], folder=tmp_path, log=lines.append,
                         checkpoint=Checkpointing("tiny training", "loop-epoch", plan={"lr": 0.2}))
    assert lines == ["a tiny training checkpoint of other settings was found; starting over"]
    assert other.start_epoch == 1 and not other.finished
    same = TrainingLoop(model, optimizer, run["settings"], folder=tmp_path, log=lines.append,
                        checkpoint=Checkpointing("tiny training", "loop-epoch", plan={"lr": 0.1}))
    assert same.finished and lines[-1] == "resuming the tiny training after epoch 2"
    # A file that is not a checkpoint of this loop is refused by name, never resumed as if it were.
    torch.save({"model": {}, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(GeoindexError, match="refusing tiny training checkpoint"):
        TrainingLoop(model, optimizer, run["settings"], folder=tmp_path,
                     checkpoint=Checkpointing("tiny training", "loop-epoch", resume=True))


def test_a_batch_of_only_unreadable_examples_is_skipped_not_learned_as_nan():
    """Label -1 marks a photo that no longer decodes: a batch of nothing else has no loss (the mean over no
    example is NaN, and before the shared loop the fine-tuning stepped on it, turning every weight to NaN)."""
    model, optimizer, _, _ = tiny()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    seen = []
    batches = lambda epoch: [(x, y), (x, torch.full((8,), -1)), (x, y)]  # noqa: E731
    result = TrainingLoop(model, optimizer, LoopSettings("tiny", 2, patience=2, progress=False)).run(
        batches, nn.CrossEntropyLoss(ignore_index=-1), lambda: {"loss": 1.0}, on_batch=seen.append)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history["train_loss"].notna().all() and seen == [8, 8, 8, 8]
