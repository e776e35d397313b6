"""Checkpoint reading and writing for the backbones (not TokenSR's: that is `blink_jax.blink.checkpoint`).

Modules, lowest first:
  params         the model's parameter set: abstract structure, shapes, a model from a flat dict and back
  param_mapping  LLaVA's declarative key map between Hugging Face checkpoint keys and our parameter paths
  family         a model family (config, model, key map, key layouts); LLaVA's (Qwen2.5-VL's is beside its key map)
  orbax_io       this project's converted (orbax) directory: written streaming and atomically, read validated
  hf_reader      a Hugging Face directory's weights (safetensors or torch), validated, one tensor at a time
  hf_writer      a converted directory back to a Hugging Face directory (streaming safetensors)

`blink_jax.families` names the families by model_type, `blink_jax.loading` builds runnable models from them;
`checkpoints_conversion` is their command line.
"""
