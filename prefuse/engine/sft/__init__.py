"""Supervised fine-tuning (`prefuse sft`) on the fused cross-entropy: TRL's SFT data formats (data.py) trained
through `prefuse train`'s loop with an SFT batch source and step (train.py)."""
from prefuse.engine.sft.data import SFTData, sft_format, tokenize_sft
from prefuse.engine.sft.train import SFTConfig, SFTStep, build_sft_run, train_sft

__all__ = ["SFTConfig", "SFTData", "SFTStep", "build_sft_run", "sft_format", "tokenize_sft", "train_sft"]
