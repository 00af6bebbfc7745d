"""``SchedulerConfig``: a validated, frozen view of a diffusers ``scheduler_config.json``.

diffusers builds a scheduler by passing the JSON's keys to the class's ``__init__``; keys the class does not take
are dropped and missing ones take that class's default (``ConfigMixin.from_config``). We do the same, with the
defaults of diffusers 0.42.1 written out below per class, so a config dict means the same thing here as there.
What differs: an option value we do not implement raises ``ValueError`` (naming the option, the value and the
supported values) instead of silently sampling something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from os import PathLike
from typing import Any, Mapping

DDIM = "DDIMScheduler"
DDPM = "DDPMScheduler"
PNDM = "PNDMScheduler"
EULER = "EulerDiscreteScheduler"
EULER_ANCESTRAL = "EulerAncestralDiscreteScheduler"
DPM = "DPMSolverMultistepScheduler"
KINDS = (DDIM, DDPM, PNDM, EULER, EULER_ANCESTRAL, DPM)

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon")

# Every keyword each diffusers 0.42.1 class takes, with its default (``inspect.signature`` of ``__init__``).
# Keys of the JSON outside a kind's table are ignored, as diffusers ignores them.
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    DDIM: dict(_COMMON, clip_sample=True, set_alpha_to_one=True, steps_offset=0, thresholding=False,
               dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
               timestep_spacing="leading", rescale_betas_zero_snr=False),
    DDPM: dict(_COMMON, variance_type="fixed_small", clip_sample=True, thresholding=False,
               dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
               timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False),
    PNDM: dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0),
    EULER: dict(_COMMON, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    EULER_ANCESTRAL: dict(_COMMON, timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False),
    DPM: dict(_COMMON, solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
              algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, euler_at_final=False,
              use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
              use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
              variance_type=None, timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
              use_dynamic_shifting=False, time_shift_type="exponential"),
}

_SPACINGS = ("leading", "trailing", "linspace")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTIONS = ("epsilon", "v_prediction", "sample")

# Option -> supported values, checked only for kinds whose diffusers class takes the option.
_SUPPORTED: dict[str, tuple] = {
    "beta_schedule": _BETA_SCHEDULES,
    "timestep_spacing": _SPACINGS,
    "thresholding": (False,),              # dynamic thresholding (Imagen) is unsuitable for latent diffusion
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero", "sigma_min"),
    "skip_prk_steps": (True,),             # SD's PLMS; the Runge-Kutta warm-up of full PNDM is not implemented
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
    "solver_order": (1, 2),
}
_SUPPORTED_BY_KIND: dict[tuple[str, str], tuple] = {
    (DDPM, "variance_type"): ("fixed_small", "fixed_small_log", "fixed_large"),
    (DPM, "variance_type"): (None,),
    (PNDM, "prediction_type"): ("epsilon", "v_prediction"),
    (EULER_ANCESTRAL, "prediction_type"): ("epsilon", "v_prediction"),
}
# Values diffusers' DPMSolverMultistepScheduler itself rewrites on construction (configs saved by DEIS/UniPC).
_DPM_ALIASES = {"algorithm_type": {"deis": "dpmsolver++"},
                "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}}


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler hyper-parameters, one field per diffusers option we implement (hashable: a static jit argument).

    Fields a kind's diffusers class does not take keep the neutral values below, so they change nothing.
    Build it with :meth:`from_diffusers` / :meth:`from_json` to get diffusers' per-class defaults.
    """

    kind: str
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = False          # DDIM, PNDM: alpha_cumprod "before" t=0 is 1 (else alphas_cumprod[0])
    clip_sample: bool = False               # DDIM, DDPM: clamp the x0 prediction to +-clip_sample_range
    clip_sample_range: float = 1.0
    variance_type: str | None = None        # DDPM
    skip_prk_steps: bool = True             # PNDM
    use_karras_sigmas: bool = False         # Euler, DPM
    sigma_min: float | None = None          # Euler (Karras sigmas)
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"         # Euler, DPM: last sigma 0 or sigma(t=0)
    interpolation_type: str = "linear"      # Euler
    algorithm_type: str = "dpmsolver++"     # DPM
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], kind: str | None = None) -> "SchedulerConfig":
        """From a ``scheduler_config.json`` dict. ``kind`` overrides ``_class_name`` (like diffusers'
        ``OtherScheduler.from_config(config)``: the dict's keys are reused, the class's defaults fill the rest)."""
        kind = kind if kind is not None else d.get("_class_name")
        if kind not in _DIFFUSERS_DEFAULTS:
            raise ValueError(f"unsupported scheduler _class_name {kind!r}; supported: {', '.join(KINDS)}")
        values = {k: d.get(k, default) for k, default in _DIFFUSERS_DEFAULTS[kind].items()}
        if kind == DPM:
            for k, aliases in _DPM_ALIASES.items():
                values[k] = aliases.get(values[k], values[k])
        for k, v in values.items():
            supported = _SUPPORTED_BY_KIND.get((kind, k), _SUPPORTED.get(k))
            if supported is not None and not (k == "beta_schedule" and values["trained_betas"] is not None) \
                    and v not in supported:
                raise ValueError(f"{kind}: unsupported {k}={v!r}; supported: {', '.join(map(repr, supported))}")
        if values["trained_betas"] is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in values.items() if k in names}
        for k, typ in (("num_train_timesteps", int), ("steps_offset", int), ("solver_order", int),
                       ("beta_start", float), ("beta_end", float), ("clip_sample_range", float),
                       ("lambda_min_clipped", float)):
            if k in kw:
                kw[k] = typ(kw[k])
        return cls(kind=kind, **kw)

    @classmethod
    def from_json(cls, path: str | PathLike, kind: str | None = None) -> "SchedulerConfig":
        """From a ``scheduler_config.json`` file (see :meth:`from_diffusers`)."""
        with open(path) as f:
            return cls.from_diffusers(json.load(f), kind=kind)
