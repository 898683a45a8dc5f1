"""Drop-in front ends for other libraries' interfaces, computed by prefuse's fused head and objectives.

`prefuse.compat.liger`: Liger-Kernel's fused linear preference losses (DPO, ORPO, CPO, SimPO, KTO).
`prefuse.compat.trl`: `PrefuseDPOTrainer`, TRL's DPOTrainer with `PreferenceLoss` on hidden states (needs trl).
`prefuse.compat.trl_kto`: `PrefuseKTOTrainer`, TRL's KTOTrainer with prefuse's KTO objectives on the fused head.
`prefuse.compat.trl_grpo`: `PrefuseGRPOTrainer`, TRL's GRPOTrainer with its per-token log-probs from the fused head.
`prefuse.compat.trl_head`: what they share (hidden states, the lm_head gathered whole under FSDP2).
"""
