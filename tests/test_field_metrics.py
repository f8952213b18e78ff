"""The field's metrics (lumo_ray/eval/field_metrics.py): BLEU-4 and CIDEr-D equal the COCO caption
evaluation's reference code (pycocoevalcap 1.2) on small examples, CLIPScore with the tiny CLIP preset is
higher for matching image-caption pairs than for shuffled ones, and the Fréchet distance has its
properties."""
import numpy as np
import pytest

from lumo_ray.data import synth
from lumo_ray.eval.field_metrics import bleu, bleu4, caption_metrics, cider_d, clip_score, frechet_distance

# Values printed by pycocoevalcap 1.2 (Bleu(4).compute_score, Cider().compute_score; its bleu/ and cider/
# modules, run on these pre-tokenised strings) for the same references and captions.
CASES = [
    ([["a red circle on the left", "one red circle at the left side"],
      ["two blue squares at the top", "a pair of blue squares near the top"],
      ["three short high beeps", "three quick high pitched beeps"], ["one long low beep"],
      ["four green triangles in the center"]],
     ["One red circle on the left.", "two blue squares at the bottom", "three long high beeps", "a low beep",
      "four green triangles in the center"],
     [0.8454947063864049, 0.8061475719405926, 0.7707607354001188, 0.7449399269122768],
     5.036906203341543, [5.842732762520387, 4.38006527507646, 2.1811264740167173, 2.780606505094151, 10.0]),
    # short captions: the brevity penalty
    ([["two red circles on the left", "two red circles at the left"], ["one long low beep"],
      ["three yellow squares at the bottom"]],
     ["red circles", "one beep", "three yellow squares"],
     [0.27645304655057795, 0.23941536125357665, 0.25117426183838415, 0.008135545832082825],
     2.8024779186360367, [2.2491874088653487, 1.6722358879789976, 4.486010459063764]),
]


@pytest.mark.parametrize("refs,hyps,bleus,cider,per", CASES)
def test_bleu_and_cider_d_equal_the_reference_implementation(refs, hyps, bleus, cider, per):
    assert bleu(refs, hyps) == pytest.approx(bleus, rel=1e-12)
    assert bleu4(refs, hyps) == pytest.approx(bleus[3], rel=1e-12)
    score, scores = cider_d(refs, hyps)
    assert score == pytest.approx(cider, rel=1e-12) and scores == pytest.approx(per, rel=1e-12)
    m = caption_metrics(refs, hyps)
    assert m["n"] == len(hyps) and m["bleu4"] == pytest.approx(bleus[3]) and m["cider_d"] == pytest.approx(cider)


def test_caption_metrics_order_right_and_wrong_captions():
    refs = [[synth.image_caption(s, c, k, p)] for s, c, k, p in
            [("circle", "red", 2, "left"), ("square", "blue", 1, "top"), ("triangle", "green", 3, "center"),
             ("circle", "yellow", 4, "bottom")]]
    same = caption_metrics(refs, [r[0] for r in refs])
    assert same["bleu4"] == pytest.approx(1.0)
    wrong = caption_metrics(refs, [refs[(i + 1) % len(refs)][0] for i in range(len(refs))])
    assert wrong["bleu4"] < same["bleu4"] and wrong["cider_d"] < same["cider_d"]
    none = caption_metrics(refs, [None] * len(refs))  # undecodable captions score nothing
    assert none["bleu4"] < 1e-6 and none["cider_d"] == 0.0
    with pytest.raises(ValueError, match="reference sets"):
        bleu(refs, ["x"])


def test_clip_score_definition():
    e = np.eye(3, dtype=np.float32)
    assert clip_score(e, e) == pytest.approx(100.0)
    assert clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(0.0)  # orthogonal
    assert clip_score(e, -e) == 0.0  # negative cosines count as 0
    assert clip_score(2 * e[:1], np.array([[1.0, 1.0, 0.0]])) == pytest.approx(100 / np.sqrt(2))


def test_clip_score_is_higher_for_matching_pairs_with_the_tiny_clip():
    from PIL import Image

    from lumo_ray.codecs.clip import load_clip
    from lumo_ray.eval.field_metrics import t2i_metrics
    from lumo_ray.runtime import torch_threads

    clip = load_clip("tiny")
    scenes = [synth.draw_scene(np.random.default_rng([3, 0, i])) for i in range(24)]
    images = [np.asarray(synth.make_image(**a)) for a in scenes]
    caps = [synth.image_caption(a["shape"], a["colour"], a["count"], a["position"]) for a in scenes]
    shuffled = [(i + 7) % len(caps) for i in range(len(caps))]
    with torch_threads(1):  # the tiny CLIP is fastest on one thread of a busy CPU
        img, txt = clip.embed_images([clip.pixels(Image.fromarray(x)) for x in images]), clip.embed_texts(caps)
    match, other = clip_score(img, txt), clip_score(img, txt[shuffled])
    assert match > other + 5, (match, other)
    m = t2i_metrics(clip, images, images, caps, shuffled)  # "generated" = real: FD ~0, the same CLIPScores
    assert m["clipscore"]["generated"] == pytest.approx(match, abs=1e-3)
    assert m["clipscore"]["generated_swapped_caption"] == pytest.approx(other, abs=1e-3)
    assert m["frechet_clip"] == pytest.approx(0.0, abs=1e-6) and m["undecodable"] == 0
    gone = t2i_metrics(clip, [None] + images[1:], images, caps, shuffled)
    assert gone["undecodable"] == 1 and gone["frechet_clip"] > 0


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = rng.normal(size=8)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    b = rng.normal(size=(150, 8)) * 2.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8) and frechet_distance(a, b) > 0
    # 1-d: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    x, y = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-1.0, 0.5, size=(400, 1))
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-8)
    # fewer samples than dimensions (a singular covariance) stays finite and non-negative
    assert np.isfinite(frechet_distance(a[:5], b[:6])) and frechet_distance(a[:5], b[:6]) >= 0
    with pytest.raises(ValueError, match=">= 2 rows"):
        frechet_distance(a[:1], b)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 6)), rng.normal(0.3, 1.5, size=(250, 6)) @ rng.normal(size=(6, 6))
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    want = d @ d + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-7)
