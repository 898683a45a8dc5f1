"""The data section of `prefuse train`'s settings: the training file, its held-out set, and the truncation of rows
(engine/data/tokenize.py's policy)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefuse.engine.checks import check_field, setting


@dataclass
class DataSettings:
    dataset_name: str = setting("", "local .jsonl/.json/.parquet file or save_to_disk folder in a TRL format")
    eval_split: str | None = setting(None, "held-out data: a file, or a split of a saved dataset folder")
    eval_fraction: float = setting(0.0, "held-out data: this fraction of the training examples")
    max_length: int | None = setting(1024, "prompt + response tokens kept per sequence (responses cut from the right)")
    max_prompt_length: int | None = setting(512, "prompt tokens kept (cut from the left: the text nearest the "
                                                 "response stays)")
    truncation: bool = setting(True, "cut rows over max_length / max_prompt_length; false: such a row is a bad row")
    skip_bad_rows: bool = setting(False, "skip bad rows and count them by kind, instead of stopping at the first")
    duplicate_rows: str = setting("keep", "rows repeating an earlier row's prompt and responses: keep (as TRL does; "
                                          "counted in one line), drop (counted) or refuse")
    padding_free: bool = setting(False, "run the decoders on each batch's sequences packed without padding "
                                        "(position ids restart per sequence; the attention stays within each); the "
                                        "losses and gradients are the padded batch's")
    padding_free_row_tokens: int | None = setting(None, "with padding_free: rows of at most N tokens (at least "
                                                        "max_length; N >= a batch's tokens: one row). Default: one "
                                                        "row under flash_attention_2, else rows no wider than the "
                                                        "padded batch (sdpa and eager compute a row's whole score "
                                                        "matrix)")

    def check(self) -> None:
        """One-line ValueErrors naming the field."""
        check_field(Path(self.dataset_name).exists(), "dataset_name", f"no such file or directory: {self.dataset_name}")
        check_field(self.max_length is None or self.max_length >= 2, "max_length",
                    f"must be >= 2, got {self.max_length}")
        check_field(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
                    f"must be >= 1, got {self.max_prompt_length}")
        check_field(self.duplicate_rows in ("keep", "drop", "refuse"), "duplicate_rows",
                    f"must be keep, drop or refuse, got {self.duplicate_rows!r}")
        check_held_out(self)
        check_field(self.padding_free_row_tokens is None or self.padding_free, "padding_free_row_tokens",
                    "sets the packed rows' width: add --padding_free")
        check_field(self.padding_free_row_tokens is None or self.max_length is None
                    or self.padding_free_row_tokens >= self.max_length, "padding_free_row_tokens",
                    f"must hold the longest sequence: at least max_length ({self.max_length}), got "
                    f"{self.padding_free_row_tokens}")


def check_held_out(cfg) -> None:
    """The held-out set (eval_split or eval_fraction) of any training config (TrainConfig, RewardModelConfig)."""
    check_field(0 <= cfg.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {cfg.eval_fraction}")
    check_field(not (cfg.eval_split and cfg.eval_fraction), "eval_split", "give eval_split or eval_fraction, not both")
    if cfg.eval_split and not Path(cfg.eval_split).exists():
        check_field(Path(cfg.dataset_name).is_dir(), "eval_split",
                    f"{cfg.eval_split!r} is not a file, and dataset_name is a single file with no other splits")
