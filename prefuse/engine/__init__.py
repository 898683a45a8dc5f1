"""prefuse.engine: the training engine (data, model, loop, checkpoints)."""

from prefuse.engine.data import (
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
from prefuse.engine.checkpoint import (  # noqa: E402
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
