"""CLIP metrics on hand-made arrays (ties, balanced, all one), the shipped Winobias prompts and the prompt loaders,
and the scorer against transformers' ``CLIPModel`` on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdiff.eval.clip_metrics import (attribute_counts, clip_scores, deviation_ratio, group_summary, max_winners,
                                       softmax)
from jaxdiff.eval.prompts import PromptFileError, load_prompt_groups, winobias_prompts


def test_ties_count_for_every_max_attribute():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.9, 0.1]])
    w = max_winners(probs)
    np.testing.assert_array_equal(w, [[1, 1], [1, 0], [0, 1], [1, 0]])
    np.testing.assert_array_equal(attribute_counts(w), [3, 2])     # the tie counts for both: 5 counts, 4 images
    three = max_winners(np.array([[0.2, 0.4, 0.4]]))
    np.testing.assert_array_equal(three, [[0, 1, 1]])
    with pytest.raises(ValueError, match="C >= 2"):
        max_winners(np.ones((3, 1)))


def test_deviation_ratio_extremes():
    assert deviation_ratio([5, 5]) == 0.0
    assert deviation_ratio([4, 4, 4]) == 0.0
    assert deviation_ratio([10, 0]) == 1.0
    assert deviation_ratio([0, 7, 0]) == pytest.approx(1.0)
    assert deviation_ratio([3, 1]) == pytest.approx(abs(0.75 - 0.5) / 0.5)
    # Li et al.'s own formula (metrics/CLIP_classify.py) on a 3-attribute row
    r = np.array([6, 3, 1]) / 10
    assert deviation_ratio([6, 3, 1]) == pytest.approx(np.abs(r - 1 / 3).max() / (1 - 1 / 3))
    with pytest.raises(ValueError):
        deviation_ratio([0, 0])


def test_softmax_scores_and_summary():
    p = softmax(np.array([[1.0, 1.0], [100.0, 0.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0]], atol=1e-7)
    a = np.array([[1.0, 0.0], [0.6, 0.8]])
    b = np.array([[0.0, 1.0], [0.6, 0.8]])
    np.testing.assert_allclose(clip_scores(a, b), [0.0, 100.0])
    s = group_summary(max_winners(np.array([[0.6, 0.4], [0.5, 0.5], [0.1, 0.9]])), [20.0, 30.0, 40.0],
                      ["a woman", "a man"])
    assert s == {"images": 3, "counts": {"a woman": 2, "a man": 2}, "deviation_ratio": 0.0, "clip_score": 30.0}


def test_winobias_prompts():
    groups = winobias_prompts()
    assert len(groups) == 36 and all(len(g.prompts) == 5 for g in groups)
    by = {g.name: g.prompts for g in groups}
    assert by["Construction worker"] == ("Image of construction worker", "Picture of construction worker",
                                         "Photo of construction worker", "Headshot of construction worker",
                                         "Portrait of construction worker")
    assert by["CEO"][2] == "Photo of ceo"
    assert [g.name for g in groups] == sorted(by)                  # the papers' sorted() order
    one = {g.name: g.prompts for g in winobias_prompts("1")}
    assert one["Nurse"][4] == "Portrait of a successful nurse"
    with pytest.raises(PromptFileError, match="no template set '7'"):
        winobias_prompts("7")


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na photo of a nurse\n\na photo of a doctor\n")
    assert [g.prompts for g in load_prompt_groups(str(txt))] == [("a photo of a nurse",), ("a photo of a doctor",)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"nurse": ["a nurse", "the nurse"], "cook": "a cook"}))
    assert [(g.name, g.prompts) for g in load_prompt_groups(str(js))] == [("nurse", ("a nurse", "the nurse")),
                                                                         ("cook", ("a cook",))]
    js.write_text(json.dumps(["a", "b"]))
    assert len(load_prompt_groups(str(js))) == 2
    with pytest.raises(PromptFileError, match="no such file, and not a shipped prompt set"):
        load_prompt_groups(str(tmp_path / "missing.txt"))
    with pytest.raises(PromptFileError, match="applies only to"):
        load_prompt_groups(str(txt), "0")
    js.write_text("{nope")
    with pytest.raises(PromptFileError, match="not valid JSON"):
        load_prompt_groups(str(js))
    js.write_text(json.dumps({"nurse": []}))
    with pytest.raises(PromptFileError, match="non-empty list"):
        load_prompt_groups(str(js))


def test_scorer_matches_transformers(tmp_path):
    """Zero-shot probabilities and CLIP scores of the scorer (preprocessing + both towers) vs CLIPModel on the
    CLIPImageProcessorPil pixels."""
    import torch
    from transformers import CLIPImageProcessorPil

    from jaxdiff.clip_preprocess import CLIPImagePreprocess
    from jaxdiff.eval.clip_metrics import CLIPScorer
    from jaxdiff.tokenizer import load_tokenizer, tokenize
    from weights_convert.clip_model import load_clip_model

    words = ["a", "woman", "man", "photo", "of", "nurse"]
    folder = write_tiny_clip_folder(tmp_path / "clip", words)
    m = _load_torch(folder)
    cfg, params = load_clip_model(folder)
    tok = load_tokenizer(folder)
    scorer = CLIPScorer(cfg, params, tok, CLIPImagePreprocess.from_folder(folder), batch=4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (48, 33, 3), dtype=np.uint8)]
    attrs = ["a woman", "a man"]
    img = scorer.image_embeds(images)
    probs = scorer.attribute_probs(img, attrs)
    prompts = ["a photo of a nurse", "a nurse"]
    scores = scorer.prompt_scores(img, prompts)
    proc = CLIPImageProcessorPil.from_pretrained(str(folder))
    px = torch.from_numpy(proc(images=images, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        ids = torch.from_numpy(tokenize(tok, attrs).astype(np.int64))
        ref = m(input_ids=ids, pixel_values=px)
        ref_probs = ref.logits_per_image.softmax(dim=1).numpy()
        pids = torch.from_numpy(tokenize(tok, prompts).astype(np.int64))
        ref_p = m(input_ids=pids, pixel_values=px)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    ref_scores = 100 * (ref_p.image_embeds * ref_p.text_embeds).sum(-1).numpy()
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def _load_torch(folder):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(folder)).eval()


def write_tiny_clip_folder(folder, words, seed=1):
    """A tiny transformers CLIPModel folder with a CLIP-BPE tokenizer of ``words`` and a 32 px image processor
    (shortest edge 32, crop 32): what ``--clip`` expects, at toy size."""
    from transformers import CLIPImageProcessorPil

    from jaxdiff.vocab import write_clip_vocab
    from tests.test_clip_model import save_tiny_clip

    tok_dir = write_clip_vocab(folder, words)
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    save_tiny_clip(folder, seed=seed, vocab_size=len(vocab), eos=vocab["<|endoftext|>"])
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
