"""Steering methods as pure functions: each hands the sampler a :class:`jaxdiff.steering.Steering`.

* :mod:`jaxdiff.steer.concepts`: concept tables (file format, multi-hot composition, the h-space edit);
* :mod:`jaxdiff.steer.objective`: the frozen-model diffusion objective the concept methods train with;
* :mod:`jaxdiff.steer.sdisc`: Li et al., CVPR 2024 (self-discovered spatial h-space vectors);
* :mod:`jaxdiff.steer.lwim`: LWIM, TMLR 2026 (attribute suppression, h attenuation, weighted loss, low-pass
  h re-injection);
* :mod:`jaxdiff.steer.respodiff`: RespoDiff, NeurIPS 2025 (two modules, score matching on the steered neutral
  trajectory, alternating optimizers);
* Learn-to-Steer, WACV 2026 (a learned relation loss for test-time latent optimisation):
  :mod:`~jaxdiff.steer.relation_prompts` (relation triplets from prompts, no spaCy),
  :mod:`~jaxdiff.steer.relation_maps` (words -> tokens -> per-object cross-attention maps, the channel layout),
  :mod:`~jaxdiff.steer.relation_classifier` (the classifier and its files),
  :mod:`~jaxdiff.steer.learn_to_steer` (the optimisation as a pre-step hook, and the centroid baseline).

Method code imports the core (``jaxdiff``), never ``sample`` or ``train``.
"""
