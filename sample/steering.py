"""The sampler's steering API lives in the core (:mod:`jaxdiff.steering`, importable by the steering methods of
:mod:`jaxdiff.steer`); re-exported here for the sampling library's users."""

from jaxdiff.steering import (Steering, StepContext, StepHook, as_steering, compose, gate_edits,  # noqa: F401
                              run_post_hooks, run_pre_hooks)
