"""Drop-in front ends for other libraries' interfaces, computed by prefuse's fused head and objectives.

`prefuse.compat.liger`: Liger-Kernel's fused linear preference losses (DPO, ORPO, CPO, SimPO, KTO).
`prefuse.compat.trl`: `PrefuseDPOTrainer`, TRL's DPOTrainer with `PreferenceLoss` on hidden states (needs trl).
"""
