"""The linear probe's training rules (issue 10): stop on validation loss, standardise robustly."""
import numpy as np
import torch

from geoindex.heads import fit_probe, robust_scale


def separated(n_per_class, dim, gap, rng):
    """Two far-apart clusters: accuracy is perfect at once, cross-entropy keeps falling for many epochs."""
    y = np.repeat([0, 1], n_per_class)
    x = rng.normal(size=(len(y), dim)) + gap * np.where(y[:, None] == 1, 1.0, -1.0)
    return x.astype(np.float32), y


def test_probe_keeps_training_while_val_loss_falls_after_accuracy_plateaus():
    rng = np.random.default_rng(0)
    x, y = separated(100, 16, 2.0, rng)
    xv, yv = separated(50, 16, 2.0, rng)
    head, history, best_epoch, best_acc = fit_probe(x, y, xv, y_val=yv, n_classes=2, epochs=40, lr=1e-3, patience=3)
    acc, loss = history["val_accuracy"].to_numpy(), history["val_loss"].to_numpy()
    # Accuracy saturates within the first epochs, so stopping on it (patience 3) would end by epoch ~5.
    assert acc[:2].max() == 1.0
    assert best_epoch > 10 and len(history) > 10
    assert best_epoch == int(history["epoch"][np.argmin(loss)])
    assert loss[best_epoch - 1] < 0.5 * loss[0]
    assert best_acc == acc[best_epoch - 1] == 1.0
    with torch.no_grad():  # the returned head is the one of the best epoch, not the last
        returned_loss = float(torch.nn.functional.cross_entropy(head(torch.as_tensor(xv)), torch.as_tensor(yv)))
    assert abs(returned_loss - loss[best_epoch - 1]) < 1e-5


def test_probe_stops_when_val_loss_rises():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 32)).astype(np.float32), rng.integers(0, 3, 60)
    xv, yv = rng.normal(size=(30, 32)).astype(np.float32), rng.integers(0, 3, 30)
    _, history, best_epoch, _ = fit_probe(x, y, xv, y_val=yv, n_classes=3, epochs=200, lr=1e-2, patience=3)
    assert len(history) == best_epoch + 3 < 200  # noise labels: val loss turns up and training ends


def test_near_constant_dimension_is_not_blown_up():
    rng = np.random.default_rng(2)
    x, y = separated(40, 8, 2.0, rng)
    xv, yv = separated(40, 8, 2.0, rng)
    x[:, 0] = 0.0           # constant on the tiny train split...
    xv[:, 0] = 0.05         # ...and slightly different on new photos
    scale = robust_scale(torch.as_tensor(x))
    assert float(scale[0]) >= 0.09 * float(scale[1:].min())
    head, _, _, best_acc = fit_probe(x, y, xv, y_val=yv, n_classes=2, epochs=30, lr=1e-2, patience=30)
    assert best_acc == 1.0  # dividing by std + 1e-6 made dimension 0 worth 5e4 and val accuracy ~chance
    with torch.no_grad():
        assert float(((torch.as_tensor(xv) - head.mean) / head.std).abs().max()) < 50


def test_robust_scale_keeps_ordinary_dimensions():
    x = torch.as_tensor(np.random.default_rng(3).normal(size=(500, 10)) * np.arange(1, 11), dtype=torch.float32)
    torch.testing.assert_close(robust_scale(x), x.std(0))
