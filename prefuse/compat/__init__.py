"""Drop-in front ends for other libraries' interfaces, computed by prefuse's fused head and objectives.

`prefuse.compat.liger`: Liger-Kernel's fused linear preference losses (DPO, ORPO, CPO, SimPO, KTO).
`prefuse.compat.trl`: `PrefuseDPOTrainer`, TRL's DPOTrainer with `PreferenceLoss` on hidden states (needs trl).
`prefuse.compat.trl_kto`: `PrefuseKTOTrainer`, TRL's KTOTrainer with prefuse's KTO objectives on the fused head.
`prefuse.compat.trl_grpo`: `PrefuseGRPOTrainer`, TRL's GRPOTrainer with its per-token log-probs from the fused head.
`prefuse.compat.trl_head`: what they share (the decoder's hidden states and the model's whole lm_head).
`prefuse.compat.sharding`: the lm_head gathered whole under FSDP2 (`full_head`), DeepSpeed ZeRO-3 refused.
"""
