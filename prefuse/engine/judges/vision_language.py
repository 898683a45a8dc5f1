"""A vision-language model as a judge: it reads the prompt with its images and a response, and is asked yes or no.

    VisionLanguageJudge(path)   AutoModelForImageTextToText + AutoProcessor from a local directory (a LLaVA-style
                                model): score = log P(" yes") - log P(" no") of its next token after
                                VLM_JUDGE_TEMPLATE; compare = sigmoid(score(first) - score(second))

The judge reads the images of each prompt from the `images` column the online source passes (per completion a
list of image sources: paths, datasets `{"bytes", "path"}` dicts or PIL images; `[]` or None for none) and the
prompt's placeholders (the processor's image token, `<image>` for LLaVA; a message list's `{"type": "image"}`
content parts become that token). It runs without gradient, in eval mode, batched and left-padded, so that every
row's answer is read at the last position. `--judge DIR` builds it when DIR holds a vision-language model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prefuse.engine.data.formats import RowIssue
from prefuse.engine.data.images import open_image
from prefuse.engine.judges.base import JudgeError, bradley_terry, check_rows, doubled, is_conversation
from prefuse.engine.models.vision import is_vision_language, load_processor

# The question after the prompt and the response; the judge's answer is its next token.
VLM_JUDGE_TEMPLATE = "{prompt}\nResponse: {response}\nIs the response correct and helpful? Answer yes or no.\nAnswer:"
ANSWERS = (" yes", " no")


def judge_prompt_text(prompt, image_token: str) -> str:
    """A prompt as the judge's text: a string as it is; a message list as "role: content" lines, content parts
    joined in order (an image part as `image_token`)."""
    if not is_conversation(prompt):
        return prompt
    lines = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(image_token if part.get("type") == "image" else part.get("text", "")
                              for part in content)
        lines.append(f"{message['role']}: {content}")
    return "\n".join(lines)


def answer_ids(tokenizer) -> tuple[int, int]:
    """The first token ids of " yes" and " no"; JudgeError when the tokenizer cannot tell them apart."""
    ids = [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in ANSWERS]
    if not all(ids) or ids[0][0] == ids[1][0]:
        raise JudgeError(f"judge: the tokenizer gives {ids} for {ANSWERS}; a vision-language judge needs two "
                         f"different first tokens")
    return ids[0][0], ids[1][0]


class VisionLanguageJudge:
    """score = log P(" yes") - log P(" no") of the model's next token after VLM_JUDGE_TEMPLATE (the log-odds of
    "yes" between the two answers), the prompt's images given to the model's vision tower."""

    flag = "judge"

    def __init__(self, path, device="cpu", batch_size: int = 8, dtype=None):
        import transformers


        if batch_size < 1:
            raise JudgeError(f"judge: batch_size {batch_size} must be at least 1")
        where = Path(path).expanduser()
        if not (where / "config.json").is_file():
            raise JudgeError(f"judge: {path} has no config.json (give the directory save_pretrained wrote)")
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
        if not is_vision_language(config):
            raise JudgeError(f"judge: {path} is not a vision-language model (its config has no vision_config)")
        processor = load_processor(str(where))
        if processor is None or getattr(processor, "image_token", None) is None:
            raise JudgeError(f"judge: {path} has no image processor (save the model's AutoProcessor beside it)")
        try:
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                where, local_files_only=True, **({"dtype": dtype} if dtype is not None else {}))
        except Exception as e:
            raise JudgeError(f"judge: loading {path} raised {type(e).__name__}: {' '.join(str(e).split())}") from e
        self.path, self.device, self.batch_size = str(path), torch.device(device), batch_size
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor, self.tokenizer = processor, processor.tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.yes_id, self.no_id = answer_ids(self.tokenizer)

    def texts(self, prompts: list, completions: list[str]) -> list[str]:
        token = self.processor.image_token
        return [VLM_JUDGE_TEMPLATE.format(prompt=judge_prompt_text(p, token), response=c)
                for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def score(self, prompts: list, completions: list[str], images=None, **columns) -> torch.Tensor:
        """[N] float32 log-odds of " yes"; images: per completion its prompt's image sources (or None)."""

        check_rows(prompts, completions, {**columns, **({"images": images} if images is not None else {})})
        texts = self.texts(prompts, completions)
        rows = [list(images[i] or []) if images is not None else [] for i in range(len(texts))]
        scores = torch.zeros(len(texts), dtype=torch.float32)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # every row's next token at the last position
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = range(start, min(start + self.batch_size, len(texts)))
                opened = []
                for i in batch:
                    try:
                        opened += [open_image(source, n) for n, source in enumerate(rows[i], start=1)]
                    except RowIssue as issue:
                        raise JudgeError(f"judge: completion {i}: field 'images': {issue}") from None
                inputs = self.processor(text=[texts[i] for i in batch], images=opened or None, padding=True,
                                        return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                logits = self.model(**inputs, use_cache=False).logits[:, -1].float()
                scores[list(batch)] = (logits[:, self.yes_id] - logits[:, self.no_id]).cpu()
        except JudgeError:
            raise
        except ValueError as error:  # the processor's placeholder / image count checks
            raise JudgeError(f"judge: {' '.join(str(error).split())}") from error
        finally:
            self.tokenizer.padding_side = side
        return scores

    def compare(self, prompts: list, first: list[str], second: list[str], **columns) -> torch.Tensor:
        check_rows(prompts, first, columns)
        check_rows(prompts, second, {})
        scores = self.score(list(prompts) * 2, list(first) + list(second), **doubled(columns))
        return bradley_terry(scores[: len(prompts)], scores[len(prompts):])
