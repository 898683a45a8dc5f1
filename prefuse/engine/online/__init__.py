"""Online training: prompts -> rollouts (the policy's own sampler or vLLM) -> judges -> batches, by iteration."""
