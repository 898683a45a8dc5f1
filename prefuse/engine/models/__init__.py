"""Models: loading the policy and its reference (plain, LoRA, GGUF, vision-language), adapters, embedders."""
