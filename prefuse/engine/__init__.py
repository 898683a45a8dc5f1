"""prefuse.engine: the training engine (data, model, loop, checkpoints)."""

from prefuse.engine.data import (  # noqa: E402
    BadRow,
    DataError,
    PairBatches,
    TokenizedData,
    check_format_for,
    collate_pairs,
    collate_unpaired,
    detect_format,
    load_preference_data,
    load_records,
    tokenize_preferences,
)
