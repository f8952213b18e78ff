"""The pixel CNN of the fidelity probe (lumo_ray/eval/pixel_probe.py): deterministic, and it reads count
from pixels where a linear probe on colour histograms cannot. No Ray, no codec: synthetic scenes drawn
as lumo data synth draws them, at the tiny codec's 32 px."""
import numpy as np
import pytest
import torch

from lumo_ray.data.synth import _rng, draw_scene, make_image
from lumo_ray.eval.fidelity import CLASSES, fit_attribute, pixel_features
from lumo_ray.eval.pixel_probe import fit_pixel_probe


def draw(n: int, seed: int):
    ims, labels = [], {a: [] for a in CLASSES["image"]}
    for i in range(n):
        a = draw_scene(_rng(seed, 0, i))
        ims.append(np.asarray(make_image(**a).convert("RGB").resize((32, 32))))
        for k in labels:
            labels[k].append(a[k])
    return np.stack(ims), labels


@pytest.fixture(scope="module")
def scenes():
    return draw(192, 3), draw(128, 4)


def test_the_fit_is_deterministic_and_leaves_the_process_rng_alone(scenes):
    (x, y), (xt, _) = scenes
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = fit_pixel_probe(x, y, CLASSES["image"], 0)
    assert torch.equal(torch.rand(3), before)  # the fit seeds its own stream and gives the process's back
    b = fit_pixel_probe(x, y, CLASSES["image"], 0)
    assert a.digest == b.digest and a.predict(list(xt)) == b.predict(list(xt))
    got = a.predict([None, xt[0], xt[0][:16]])  # no image, an image, an image of another size
    assert all(v[0] is None and v[1] is not None and v[2] is None for v in got.values())


def test_it_counts_shapes_a_linear_probe_on_colours_cannot(scenes):
    (x, y), (xt, yt) = scenes
    cnn = fit_pixel_probe(x, y, CLASSES["image"], 0).predict(list(xt))["count"]
    acc = float(np.mean([p == t for p, t in zip(cnn, yt["count"])]))
    feats = np.stack([pixel_features(im) for im in np.concatenate([x, xt])])
    feats -= feats[: len(x)].mean(0)
    lin = fit_attribute(feats[: len(x)], y["count"], CLASSES["image"]["count"], 0, {"pixels": np.arange(feats.shape[1])})
    lin_pred = [lin.classes[i] for i in lin.predict(feats[len(x):])]
    lin_acc = float(np.mean([p == t for p, t in zip(lin_pred, yt["count"])]))
    print(f"count on 128 held-out scenes: CNN {acc:.3f}, linear on colour histograms {lin_acc:.3f}")
    assert acc >= 0.9 and acc > lin_acc + 0.2
