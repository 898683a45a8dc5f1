"""What single methods add to the engine: A-LoL's advantages and value head, OFS/COFS-DPO's adapters,
SRPO's revisions, SELM's data, the over-optimisation monitor, BDHS and RLHS."""
