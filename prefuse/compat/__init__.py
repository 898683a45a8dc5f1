"""Drop-in front ends for other libraries' loss interfaces, computed by prefuse's fused head and objectives.

`prefuse.compat.liger`: Liger-Kernel's fused linear preference losses (DPO, ORPO, CPO, SimPO, KTO).
"""
