"""Training of the ShapesWorld model (issue 5, part 3): ``python -m train`` (see :mod:`train.main`).

Modules: :mod:`config` (frozen plans), :mod:`architecture` (diffusers config dicts, vocabulary),
:mod:`init` (from-scratch initialisation), :mod:`data` (scene batches by step, latent dataset),
:mod:`loop` (jitted step, EMA, mesh, Orbax resume, progress), :mod:`vae_stage`, :mod:`unet_stage`,
:mod:`export_shapesworld` (diffusers folder + sampler choice), :mod:`calibrate` (timings for sizing a plan).
"""
