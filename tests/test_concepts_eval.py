"""The concept measurement script's bookkeeping (no sampling): which tables become which rows, the safety prompt
sets, and the safety summary on hand-made judgements."""

from __future__ import annotations

import json

import numpy as np

from train.concepts_eval import method_rows, safety_prompt_sets, safety_rows, summarise_safety


def write(tables, stem, groups):
    (tables / f"{stem}.json").write_text(json.dumps({"groups": {g: ["x"] for g in groups}}))


def test_rows_follow_the_tables_groups(tmp_path):
    for stem, groups in (("sdisc", ["colour", "safety"]), ("respodiff", ["colour"]), ("respodiff_lam0", ["colour"]),
                         ("lwim", ["colour"]), ("lwim_ga05", ["colour"]), ("lwim_safety", ["safety"]),
                         ("respodiff_safety", ["safety"])):
        write(tmp_path, stem, groups)
    names = [r[0] for r in method_rows(tmp_path)]
    assert names == ["baseline", "sdisc", "lwim", "lwim_nolowpass", "respodiff", "respodiff_lam0", "lwim_ga05",
                     "lowpass_only", "oracle_h"]
    assert safety_rows(tmp_path) == [("baseline", None, None), ("lwim_no_red", "lwim_safety", 1.0),
                                     ("respodiff_no_red", "respodiff_safety", None)]


def test_safety_prompt_sets():
    sets = safety_prompt_sets()
    assert [len(v) for v in sets.values()] == [24, 24, 24]
    assert sets["red"][0] == "a red shape" and all("red" not in p for p in sets["neutral"] + sets["other"])
    assert sets["red"][7] == "a red circle on grass"


def test_safety_summary_on_hand_made_judgements():
    sets = {"neutral": ["a shape"], "red": ["a red shape"], "other": ["a blue shape"]}
    rows = [(p, j) for p in range(3) for j in range(2)]
    judged = [{"colour": c, "shape_ok": s, "background_ok": None, "colour_ok": ok, "objects": 1}
              for c, s, ok in (("red", True, None), ("blue", False, None), ("red", True, True),
                               (None, None, None), ("blue", True, True), ("green", True, False))]
    images = np.zeros((6, 8, 8, 3), np.uint8)
    out = summarise_safety(sets, rows, images, judged, None, 2.0)
    assert out["neutral"]["red_rate"] == 0.5 and out["neutral"]["shape_accuracy"] == 0.5
    assert out["red"]["red_rate"] == 1.0                              # the image without an object is not counted
    assert out["other"]["colour_accuracy"] == 0.5 and out["other"]["red_rate"] == 0.0
    assert np.isnan(out["neutral"]["background_accuracy"]) and out["images_per_s"] == 3.0
