"""Vision-language models in the engine: a tiny LLaVA (CLIP vision tower + Llama) built from configs with its
processor, synthetic PNG images. The fused head on the language model's hidden states against the model's own
logits, LoRA on the language model only, `prefuse train` end to end on image pairs, sampling with images, and the
one-line errors of bad image rows."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
PIL = pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from prefuse.cli import main  # noqa: E402
from prefuse.engine.data import BadRow, load_preference_data, load_records, tokenize_prompts  # noqa: E402
from prefuse.engine.models.loading import ModelConfig, decoder_hidden_states, load_models, reference_hidden_states  # noqa: E402
from prefuse.engine.core.objectives import objective_needs  # noqa: E402
from prefuse.engine.online.rollout import RolloutConfig, sample_policy  # noqa: E402
from prefuse.engine.core.sources import build_batch  # noqa: E402
from prefuse.heads import head_of, sequence_logps  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llava  # noqa: E402

IMAGE_TOKENS = 4  # a 16x16 image in 8x8 patches, the CLS feature dropped ("default")
CHAT_TEMPLATE = (  # the fixture's template, with content parts: an image part writes the placeholder
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
COLOURS = ["red", "green", "blue", "white", "black", "grey"]

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def _png(path, seed, size=(20, 24)):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny LLaVA and its processor in model/, PNGs in images/, and pair files: standard (relative paths, a
    row with two images, a row with none) and conversational (content parts, absolute paths)."""
    root = tmp_path_factory.mktemp("vlm")
    tokenizer = save_tiny_llava(root / "model", build_tokenizer(), chat_template=CHAT_TEMPLATE)
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    (root / "images").mkdir()
    for i in range(len(COLOURS)):
        _png(root / "images" / f"{i}.png", seed=i, size=(20 + i, 24))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    standard = [{"images": [f"images/{i}.png"], "prompt": f"<image>What colour is picture {i}?",
                 "chosen": f" It is {c}.", "rejected": f" It is {COLOURS[i - 1]}, I think."}
                for i, c in enumerate(COLOURS)]
    standard.append({"images": ["images/0.png", "images/1.png"], "prompt": "<image> or <image>: which is brighter?",
                     "chosen": " The first one.", "rejected": " Neither of them."})
    standard.append({"images": [], "prompt": "Say hello.", "chosen": " Hello!", "rejected": " No."})
    conversational = [{"images": [str(root / "images" / f"{i}.png")],
                       "prompt": [{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": "Which colour?"}]}],
                       "chosen": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
                       "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "purple"}]}]}
                      for i, c in enumerate(COLOURS[:4])]
    paths = {"root": root, "model": root / "model", "standard": root / "pairs.jsonl",
             "conversational": root / "conversational.jsonl", "image_id": image_id}
    write_jsonl(paths["standard"], standard)
    write_jsonl(paths["conversational"], conversational)
    paths["rows"] = standard
    return paths


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def logits_logps(model, batch) -> torch.Tensor:
    """The model's own path: the full forward with its lm_head, float64 log_softmax, gather, masked sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision).logits.double()
    mask = batch.labels != -100
    token = torch.log_softmax(logits, -1).gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1)


def pair_batch(models, path):
    data = load_preference_data(path, models.tokenizer, processor=models.processor)
    needs = objective_needs(["sigmoid"])
    indices = list(range(len(data)))
    return data, build_batch([data.examples[i] for i in indices], indices, needs, pad_id=0)


def test_fused_head_equals_the_logits_path_with_images(files):
    models = load_models(ModelConfig(str(files["model"]), use_peft=True, lora_r=4, lora_dropout=0.0))
    policy, image_id = models.policy, files["image_id"]
    with torch.no_grad():  # adapters away from their identity init: the policy differs from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    data, batch = pair_batch(models, files["standard"])
    n = len(data)
    assert [len(e["images"]) for e in data.examples] == [1] * 6 + [2, 0]
    # the processor expanded each placeholder; labels cover the responses only, never an image token
    per_row = (batch.input_ids == image_id).sum(-1).tolist()
    assert per_row == ([IMAGE_TOKENS] * 6 + [2 * IMAGE_TOKENS, 0]) * 2
    assert not (batch.labels == image_id).any()
    first = data.examples[0]
    assert first["prompt_ids"][:1 + IMAGE_TOKENS] == [1] + [image_id] * IMAGE_TOKENS  # BOS, then the image
    # chosen and rejected rows both carry their example's images, in row order
    assert batch.vision["pixel_values"].shape == (2 * 8, 3, 16, 16)
    torch.testing.assert_close(batch.vision["pixel_values"][:8], batch.vision["pixel_values"][8:])

    def refuse(module, args):
        raise AssertionError("lm_head called")

    hook = policy.get_output_embeddings().register_forward_pre_hook(refuse)
    with torch.no_grad():
        hidden = decoder_hidden_states(policy, batch.input_ids, batch.attention_mask, **batch.vision)
        ref_hidden = reference_hidden_states(models, batch.input_ids, batch.attention_mask, **batch.vision)
    hook.remove()
    assert hidden.shape == (2 * n, batch.input_ids.shape[1], 32)
    head = head_of(policy)
    with torch.no_grad():
        fused, counts = sequence_logps(hidden, head, batch.labels)
        ref_fused, _ = sequence_logps(ref_hidden, head, batch.labels)
        expected = logits_logps(policy, batch)
        with policy.disable_adapter():
            ref_expected = logits_logps(policy, batch)
    torch.testing.assert_close(fused.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref_fused.double(), ref_expected, atol=1e-4, rtol=1e-5)
    assert (fused - ref_fused).abs().max() > 1e-2  # the adapters are on for the policy, off for the reference
    assert counts.tolist() == [len(e["chosen_ids"]) for e in data.examples] + \
        [len(e["rejected_ids"]) for e in data.examples]

    # the images reach the language model: other pixels, other log-probs of the rows with images
    other = {"pixel_values": batch.vision["pixel_values"].flip(0)}
    with torch.no_grad():
        swapped, _ = sequence_logps(decoder_hidden_states(policy, batch.input_ids, batch.attention_mask, **other),
                                    head, batch.labels)
    moved = (swapped - fused).abs()
    assert moved[:6].min() > 1e-4 and moved[7] == 0  # the row without images does not see them
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        decoder_hidden_states(policy, batch.input_ids, batch.attention_mask)

    # conversational rows: content parts rendered by the processor's chat template, placeholders expanded
    conv, conv_batch = pair_batch(models, files["conversational"])
    assert conv.format == "conversational"
    assert ((conv_batch.input_ids == image_id).sum(-1) == IMAGE_TOKENS).all()
    with torch.no_grad():
        sums, _ = sequence_logps(decoder_hidden_states(policy, conv_batch.input_ids, conv_batch.attention_mask,
                                                       **conv_batch.vision), head, conv_batch.labels)
        torch.testing.assert_close(sums.double(), logits_logps(policy, conv_batch), atol=1e-4, rtol=1e-5)


def test_a_datasets_folder_of_pil_images_gives_the_same_batch(files, tmp_path):
    import datasets

    processor = transformers.AutoProcessor.from_pretrained(files["model"])
    rows = files["rows"][:3]
    folder = tmp_path / "saved"
    table = datasets.Dataset.from_dict({
        "images": [[Image.open(files["root"] / p) for p in r["images"]] for r in rows],
        "prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
        "rejected": [r["rejected"] for r in rows]})
    assert isinstance(table.features["images"].feature, datasets.Image)
    table.save_to_disk(str(folder))
    needs = objective_needs(["sigmoid"])
    batches = []
    for path in (folder, write_jsonl(files["root"] / "three.jsonl", rows)):
        data = load_preference_data(path, processor.tokenizer, processor=processor)
        batches.append(build_batch(data.examples, [0, 1, 2], needs, pad_id=0))
    folder_batch, file_batch = batches
    assert torch.equal(folder_batch.input_ids, file_batch.input_ids)
    torch.testing.assert_close(folder_batch.vision["pixel_values"], file_batch.vision["pixel_values"])
    assert folder_batch.vision["pixel_values"].shape[0] == 6 and folder_batch.vision["pixel_values"].std() > 0.1


def test_lora_and_full_fine_tuning_leave_the_vision_side_frozen(files):
    policy = load_models(ModelConfig(str(files["model"]), use_peft=True, lora_r=4), need_reference=False).policy
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    lora_layers = {n.split(".lora_")[0] for n in trainable}
    assert {n.rsplit(".", 1)[-1] for n in lora_layers} == {"q_proj", "v_proj"}  # peft's Llama defaults
    assert len(lora_layers) == 2 * 2  # both decoder layers; no q_proj/v_proj of the CLIP tower
    assert not any(".vision_tower." in n or "projector" in n for n, m in policy.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer))

    projector = load_models(ModelConfig(str(files["model"]), use_peft=True, lora_r=4, train_vision="projector",
                                        lora_target_modules=("all-linear",)), need_reference=False).policy
    names = [n for n, p in projector.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in names) and not any("vision_tower" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    full = load_models(ModelConfig(str(files["model"])), need_reference=False).policy
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in full.named_parameters() if "vision_tower" in n or "projector" in n}
    assert full.lm_head.weight.requires_grad

    lora_head = load_models(ModelConfig(str(files["model"]), use_peft=True, lora_target_modules=("q_proj", "lm_head")),
                            need_reference=False).policy
    assert head_of(lora_head).lora is not None  # the LLaVA's lm_head, beside its language model
    with pytest.raises(ValueError, match="lora_target_modules: \\['fc1'\\] are not linear layers of the language"):
        load_models(ModelConfig(str(files["model"]), use_peft=True, lora_target_modules=("fc1",)))


def args(files, out, data, **flags):
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(data), "--output_dir",
            str(out), "--report_to", "none", "--save_steps", "0", "--logging_steps", "1"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_trains_end_to_end_through_prefuse_train(files, tmp_path, monkeypatch):
    import prefuse.engine.train.build as setup

    loaded = []
    original = setup.load_models
    monkeypatch.setattr(setup, "load_models", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    flags = dict(loss_type="sigmoid", use_peft="true", lora_r=8, lora_dropout=0.0, learning_rate=3e-2,
                 per_device_train_batch_size=8, max_steps=8, lr_scheduler_type="constant", beta=0.5)
    assert main(args(files, tmp_path / "run", files["standard"], **flags)) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    first, last = records[0], records[-1]
    assert first["rewards/margins"] == 0.0  # policy == reference at step 1
    assert last["loss"] < first["loss"] - 0.1, (first["loss"], last["loss"])
    assert all(b["rewards/margins"] > a["rewards/margins"] for a, b in zip(records, records[1:]))
    assert last["rewards/margins"] > 0.3 and last["rewards/accuracies"] > 0.5

    # only the language model's LoRA weights moved: vision tower, projector and base weights as saved
    policy = loaded[0].policy
    base = transformers.AutoModelForImageTextToText.from_pretrained(files["model"]).state_dict()
    moved = set()
    for name, p in policy.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if "lora_" in name:
            assert ".language_model." in name
            if "lora_B" in name and p.abs().max() > 0:  # zero at init
                moved.add(name)
        else:
            assert torch.equal(p, base[key]), name
    assert len(moved) == 4  # q_proj and v_proj of both layers
    adapter = (tmp_path / "run" / "checkpoint-8" / "adapter_model.safetensors")
    from safetensors.torch import load_file

    assert all(".language_model." in key for key in load_file(str(adapter)))

    # the reference's log-probs precomputed (with the images) give the same run
    cached = dict(flags, max_steps=3, precompute_ref_log_probs="true")
    assert main(args(files, tmp_path / "cached", files["standard"], **cached)) == 0
    assert main(args(files, tmp_path / "plain", files["standard"], **dict(flags, max_steps=3))) == 0
    assert list((tmp_path / "cached").glob("ref_logps-train-*.safetensors"))
    for a, b in zip(read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "plain")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["step"] == b["step"]


def test_sample_policy_with_images(files):
    models = load_models(ModelConfig(str(files["model"]), use_peft=True, lora_r=4), need_reference=False)
    records = load_records(files["standard"]).select([0, 6, 7])  # one image, two images, none
    prompts = tokenize_prompts(records, models.tokenizer, processor=models.processor, source="pairs")
    assert [len(e["images"]) for e in prompts.examples] == [1, 2, 0]
    ids = [e["prompt_ids"] for e in prompts.examples]
    cfg = RolloutConfig(max_new_tokens=5, temperature=0, num_generations=2)
    samples = sample_policy(models, ids, cfg, seed=0, eos_id=None, pad_id=0,
                            images=[e["images"] for e in prompts.examples])
    assert samples.prompt_ids == [p for p in ids for _ in range(2)]
    for number, example in enumerate(prompts.examples):  # each prompt alone, with its pixels, greedily
        pixels = example["images"].model_inputs() if len(example["images"]) else {}
        prompt = torch.tensor([example["prompt_ids"]])
        with torch.no_grad():
            alone = models.policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                           max_new_tokens=5, pad_token_id=0, eos_token_id=None, **pixels)
        assert samples.completion_ids[2 * number] == samples.completion_ids[2 * number + 1]
        assert samples.completion_ids[2 * number] == alone[0, prompt.shape[1]:].tolist()
    with pytest.raises(ValueError, match="image tokens but no images"):
        sample_policy(models, ids, cfg, seed=0, eos_id=None, pad_id=0)


BAD_ROWS = [
    ({"images": ["images/missing.png"]}, "field 'images': image 1: .*missing.png does not exist"),
    ({"images": ["images/0.png", "images/broken.png"], "prompt": "<image><image>Two?"},
     "field 'images': image 2: .*broken.png does not decode as an image"),
    ({"images": ["images/0.png", "images/1.png"]}, "field 'prompt': 1 image placeholder \\('<image>'\\) for 2 images"),
    ({"prompt": "No placeholder here."}, "field 'prompt': 0 image placeholders \\('<image>'\\) for 1 image in"),
    ({"chosen": " It is <image>."}, "field 'chosen': holds an image placeholder"),
    ({"images": "images/0.png"}, "field 'images': expected a list, got str"),
]


@pytest.mark.parametrize("change, message", BAD_ROWS)
def test_bad_image_rows_are_one_line_errors(files, tmp_path, change, message):
    processor = transformers.AutoProcessor.from_pretrained(files["model"])
    tokenizer = processor.tokenizer
    rows = [dict(r) for r in files["rows"][:3]]
    rows[1].update(change)
    path = write_jsonl(files["root"] / f"bad_{tmp_path.name}.jsonl", rows)  # beside images/: relative paths
    with pytest.raises(BadRow, match=f"^{path}:2: {message}") as error:
        load_preference_data(path, tokenizer, processor=processor)
    assert "\n" not in str(error.value)
    kept = load_preference_data(path, tokenizer, processor=processor, skip_bad_rows=True)
    assert [e["where"] for e in kept.examples] == [f"{path}:1", f"{path}:3"] and kept.skipped.count == 1


def test_cli_errors_name_file_row_and_field(files, tmp_path, capsys):
    rows = [dict(r) for r in files["rows"][:2]]
    rows[1]["images"] = ["images/missing.png"]
    path = write_jsonl(files["root"] / "cli_bad.jsonl", rows)
    assert main(args(files, tmp_path / "bad", path, loss_type="sigmoid", use_peft="true", max_steps=1)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and f"prefuse train: error: {path}:2: field 'images': image 1: " in err[0]
    assert err[0].endswith("missing.png does not exist")

    # images with a text model: no processor to read them with
    text_model = tmp_path / "text"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(build_tokenizer()))).save_pretrained(text_model)
    build_tokenizer().save_pretrained(text_model)
    argv = args(files, tmp_path / "text_run", files["standard"], loss_type="sigmoid", max_steps=1)
    argv[argv.index("--model_name_or_path") + 1] = str(text_model)
    assert main(argv) == 2
    assert "column 'images' holds images, and the model has none of a processor's files" in capsys.readouterr().err
