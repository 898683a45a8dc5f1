"""Images of vision-language preference data (TRL's vision DPO format): an `images` column, read and checked per
row, each prompt tokenized by the model's processor with its images, and the pixel values of a batch's rows.

| column   | values                                                                                                |
|----------|-------------------------------------------------------------------------------------------------------|
| `images` | per row a list: image file paths (relative to the data file's folder, or absolute), or the images of a |
|          | `datasets` Image feature (a save_to_disk folder); `[]` for a row without images                        |
| `prompt` | text with one placeholder (the processor's image token, `<image>` for LLaVA) per image, in order; or   |
|          | messages whose content parts hold one `{"type": "image"}` per image (the processor's chat template    |
|          | writes the placeholders)                                                                              |

The processor expands each placeholder to the model's image tokens (LLaVA-1.5: 576), so truncation and labels
see the real lengths; image tokens are prompt tokens and get no label. Responses hold no image. An example keeps
its images as `ExampleImages` (the sources, not the pixels: a data set's pixels would not fit in memory) and a
batch's rows get their pixel values from `vision_inputs` when the batch is built, every row of an example
(chosen, rejected, ...) with its example's images.

A bad row raises BadRow (or is skipped with skip_bad_rows), e.g. `pairs.jsonl:3: field 'images': image 2:
/data/b.png does not exist`, `... does not decode as an image (...)`, `pairs.jsonl:4: field 'prompt': 1 image
placeholder ('<image>') for 2 images`.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import datasets
import torch

from prefuse.engine.data.errors import BadRow, DataError
from prefuse.engine.data.errors import source_of
from prefuse.engine.data.formats import RowIssue

IMAGES_COLUMN = "images"


def open_image(source: Any, number: int):
    """An image source (a path, a datasets `{"bytes", "path"}` dict, a PIL image) as an RGB PIL image, decoded
    now; raises RowIssue (field 'images') naming the image's number and file."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    data, path = (source.get("bytes"), source.get("path")) if isinstance(source, dict) else (None, source)
    name = str(path) if path else f"image {number}"
    if data is None and not (path and os.path.isfile(path)):
        raise RowIssue("bad_image", IMAGES_COLUMN, f"image {number}: {name} does not exist")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = type(error).__name__ if str(path) in str(error) else str(error) or type(error).__name__
        raise RowIssue("bad_image", IMAGES_COLUMN, f"image {number}: {name} does not decode as an image "
                                                   f"({' '.join(reason.split())})") from None


@dataclass(frozen=True, eq=False)
class ExampleImages:
    """The images of one example: sources (absolute paths, datasets `{"bytes", "path"}` dicts, PIL images), the
    processor whose image processor turns them into pixel values, and `where` (`<file>:<row>`) for errors."""

    sources: tuple
    processor: Any = field(repr=False)
    where: str = ""

    def __len__(self) -> int:
        return len(self.sources)

    def open(self) -> list:
        return [open_image(source, number) for number, source in enumerate(self.sources, start=1)]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The image processor's tensors for these images: pixel_values [n, ...] (and image_sizes, ...). An image
        that no longer opens raises BadRow naming the row."""
        try:
            images = self.open()
        except RowIssue as issue:
            raise BadRow(self.where, issue.problem) from None
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}

    def key(self) -> list[str]:
        """What identifies the images (for the reference cache): path, size and mtime of a file, a digest of an
        image held in memory."""
        keys = []
        for source in self.sources:
            if isinstance(source, str):
                stat = os.stat(source)
                keys.append(f"{source}:{stat.st_size}:{stat.st_mtime_ns}")
            else:
                data = source.get("bytes") if isinstance(source, dict) else None
                if data is None:
                    data = source.get("path", "").encode() if isinstance(source, dict) else source.tobytes()
                keys.append(hashlib.sha256(data).hexdigest())
        return keys


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors [n_i, ...] -> [sum n_i, ...], zero-padded to the largest trailing shape (LLaVA-Next's patch counts
    differ between images; its image_sizes say what is real)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    if all(list(t.shape[1:]) == shape for t in tensors):
        return torch.cat(tensors)
    out = tensors[0].new_zeros([sum(t.shape[0] for t in tensors), *shape])
    start = 0
    for t in tensors:
        out[(slice(start, start + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        start += t.shape[0]
    return out


def vision_inputs(rows: Sequence[ExampleImages | None]) -> dict[str, torch.Tensor]:
    """The model inputs of the images of N sequence rows, in row order (the order a LLaVA-style model fills its
    image tokens in): pixel_values [n_images, ...] of all rows' images (and image_sizes, ...); {} when no row has
    an image. Rows that share an example's images (chosen and rejected) share one processing of them."""
    done: dict[int, dict[str, torch.Tensor]] = {}
    parts = []
    for images in rows:
        if images is None or not len(images):
            continue
        if id(images) not in done:
            done[id(images)] = images.model_inputs()
        parts.append(done[id(images)])
    if not parts:
        return {}
    return {name: _concat([part[name] for part in parts]) for name in parts[0]}


class ImageRows:
    """What tokenizing rows with images adds (tokenize_preferences, tokenize_prompts): each row's images read and
    checked, its prompt tokenized by the processor with them, responses and truncation kept off the image tokens."""

    def __init__(self, processor, base_dir: Path):
        self.processor, self.base_dir = processor, base_dir
        self.image_token = processor.image_token
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def of(cls, dataset: datasets.Dataset, processor, source: str) -> "ImageRows | None":
        """The hook for a dataset with an `images` column (None without one); DataError when there is no
        processor to read them with. Relative image paths start from the folder of the file the rows came from
        (their `__where__`), else of `source`."""
        if IMAGES_COLUMN not in dataset.column_names:
            return None
        if processor is None:
            raise DataError(f"{source}: column 'images' holds images, and the model has none of a processor's files "
                            f"(preprocessor_config.json): train a vision-language model saved with its processor")
        if getattr(processor, "image_token", None) is None:
            raise DataError(f"{source}: column 'images' holds images, and the model's {type(processor).__name__} "
                            f"has no image_token to mark them in the prompt")
        base = Path(source_of(dataset) or source)
        return cls(processor, base if base.is_dir() else base.parent)

    def prepare(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """A datasets Image feature kept encoded (`{"bytes", "path"}`): examples hold the bytes, decoded per batch."""
        feature = dataset.features[IMAGES_COLUMN]
        inner = getattr(feature, "feature", None)
        if isinstance(inner, datasets.Image) and inner.decode:
            return dataset.cast_column(IMAGES_COLUMN, datasets.List(datasets.Image(decode=False)))
        return dataset

    def read(self, row: dict[str, Any], where: str) -> ExampleImages:
        """The row's images, each file checked to exist (decoded when the prompt is tokenized); raises RowIssue."""
        value = row.get(IMAGES_COLUMN)
        if value is None:
            raise RowIssue("missing", IMAGES_COLUMN, "missing (a list of image files; [] for none)")
        if not isinstance(value, (list, tuple)):
            raise RowIssue("wrong_type", IMAGES_COLUMN, f"expected a list of images, got {type(value).__name__}")
        sources = []
        for number, item in enumerate(value, start=1):
            if isinstance(item, str):
                path = Path(item).expanduser()
                path = path if path.is_absolute() else self.base_dir / path
                if not path.is_file():
                    raise RowIssue("bad_image", IMAGES_COLUMN, f"image {number}: {path} does not exist")
                sources.append(str(path))
            elif isinstance(item, dict) and (item.get("bytes") is not None or item.get("path")):
                sources.append(item)
            elif hasattr(item, "convert") and hasattr(item, "tobytes"):  # a PIL image
                sources.append(item)
            else:
                raise RowIssue("wrong_type", IMAGES_COLUMN,
                               f"image {number}: expected a file path or an image, got {type(item).__name__}")
        return ExampleImages(tuple(sources), self.processor, where)

    def prompt_ids(self, prompt_text: str, images: ExampleImages, special_tokens: bool) -> list[int] | None:
        """The prompt's ids with every placeholder expanded to the image's tokens (None for a row without images:
        its text ids stand); raises RowIssue when placeholders and images differ in number or an image does not
        decode."""
        placeholders = prompt_text.count(self.image_token)
        if placeholders != len(images):
            raise RowIssue("image_mismatch", "prompt", f"{placeholders} image placeholder"
                           f"{'s' if placeholders != 1 else ''} ({self.image_token!r}) for {len(images)} image"
                           f"{'s' if len(images) != 1 else ''} in '{IMAGES_COLUMN}'")
        if not len(images):
            return None
        out = self.processor(text=[prompt_text], images=images.open(), add_special_tokens=special_tokens)
        return list(out["input_ids"][0])

    def tokenize(self, ids: dict, texts: dict, row_images: dict, names: list[str], bad: dict, wheres: dict,
                 special_tokens: bool) -> dict:
        """tokenize_preferences' {index: (prompt ids, [completion ids])} with each prompt that has images tokenized
        by the processor; rows whose images or placeholders are wrong go to `bad`."""
        out = {}
        for index, (prompt_ids, completion_ids) in ids.items():
            try:
                expanded = self.prompt_ids(texts[index][0], row_images[index], special_tokens)
                for name, completion in zip(names, completion_ids):
                    self.check_response(completion, name)
            except RowIssue as issue:
                bad[index] = (wheres[index], issue.problem)
                continue
            out[index] = (prompt_ids if expanded is None else expanded, completion_ids)
        return out

    def check_response(self, ids: list[int], name: str) -> None:
        if self.image_token_id in ids:
            raise RowIssue("image_mismatch", name, f"holds an image placeholder ({self.image_token!r}); images "
                                                   f"belong in the prompt")

    def check_cut(self, prompt_ids: list[int], kept_ids: list[int]) -> None:
        """Truncation may cut a prompt's text, never its image tokens (the model needs all of an image's)."""
        before, after = prompt_ids.count(self.image_token_id), kept_ids.count(self.image_token_id)
        if after != before:
            raise RowIssue("too_long", "prompt", f"{len(prompt_ids)} tokens with {before} image tokens; cutting it "
                                                 f"to fit would cut into an image: raise --max_prompt_length and "
                                                 f"--max_length")
