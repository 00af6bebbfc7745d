"""Evaluation protocols of the steering papers on real checkpoints: prompt sets (:mod:`prompts`) and CLIP-based
metrics (:mod:`clip_metrics`: zero-shot attribute classification, deviation ratio, CLIP score / WinoAlign)."""
