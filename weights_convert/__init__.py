"""The only code that knows PyTorch key names and layouts: diffusers folders and single-file SD checkpoints
-> jaxdiff parameter pytrees (and Orbax checkpoints). Imports jaxdiff, never the other way round."""

from weights_convert.convert import ComponentRules, ConversionError, state_dict_to_params
from weights_convert.readers import CheckpointError, PickleNotAllowedError, read_checkpoint, read_safetensors

__all__ = ["ComponentRules", "ConversionError", "state_dict_to_params", "CheckpointError", "PickleNotAllowedError",
           "read_checkpoint", "read_safetensors"]
