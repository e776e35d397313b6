"""The LLaVA-1.5 instruction mix: a tfds builder (`llava_mix`) and the grain pipeline that feeds training."""
