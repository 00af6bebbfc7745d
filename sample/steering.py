"""The sampler's steering API lives in the core (:mod:`jaxdiff.steering`, importable by the steering methods of
:mod:`jaxdiff.steer`); re-exported here for the sampling library's users."""

from jaxdiff.steering import (Steering, StepContext, StepHook, as_steering, compose, cond_half_edits,  # noqa: F401
                              gate_edits, run_post_hooks, run_pre_hooks)
