"""Mixed-DPO and Avg-DPO batches (ALGORITHMS.md section 2, eqs. 4-5) on a tiny Llama with the shared UltraFeedback
pairs: Mixed-DPO's per-example Bernoulli(p) draw (statistically, and p = 1 / p = 0 against offline / online DPO
exactly), the batch losses against float64 log-probs from the models' own logits, resume, Avg-DPO's shared y+, the
CLI with a reward-function file, the copy rule judge and a pairwise judge, and one-line errors."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.train.config import TrainConfig  # noqa: E402
from prefuse.engine.online.methods import mixed_draws  # noqa: E402
from prefuse.engine.train.build import build_run  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")

REWARDS = '''
def brevity(prompts, completions, **columns):
    return [-len(c) / 8 for c in completions]

def broken(prompts, completions, **columns):
    raise RuntimeError("the judge was called")
'''


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    save_tiny_llama(root / "model", tokenizer)
    with open(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    pairs = [{"prompt": r["prompt"][:60], "chosen": r["chosen"][:40], "rejected": r["rejected"][:40]} for r in rows]
    # Avg-DPO offline: a generated rejected response beside the external one (what prefuse bdhs would write)
    generated = [{**p, "generated_rejected": p["chosen"][: len(p["chosen"]) // 2] + " no."} for p in pairs]
    copies = [{"prompt": f"repeat: {w} =", "chosen": w, "rejected": w.split()[0]}
              for w in ("a b c", "d e f", "a d g", "h b e")]
    torch.manual_seed(1)  # a random pairwise judge (one-logit sequence classifier) for --judge DIR
    judge = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=0, num_labels=1))
    judge.save_pretrained(root / "pairwise")
    tokenizer.save_pretrained(root / "pairwise")
    (root / "rewards.py").write_text(REWARDS)
    return {"model": root / "model", "pairs": write_jsonl(root / "pairs.jsonl", pairs),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs]),
            "generated": write_jsonl(root / "generated.jsonl", generated),
            "copy": write_jsonl(root / "copy.jsonl", copies), "pairwise": root / "pairwise",
            "rewards": root / "rewards.py"}


def config(files, out, loss_type, *, online=True, dataset="pairs", reward="brevity", **settings):
    values = dict(model_name_or_path=str(files["model"]), dataset_name=str(files[dataset]), output_dir=str(out),
                  loss_type=[loss_type], online=online, per_device_train_batch_size=4, max_new_tokens=6,
                  temperature=1.0, report_to="none", max_steps=1, save_steps=0)
    if reward and online:
        values["reward_funcs"] = [f"{files['rewards']}:{reward}"]
    return TrainConfig(**{**values, **settings})


def perturbed(run, seed=3):
    """The policy moved away from its reference, the same way for the same seed (both terms of DPO matter)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run.policy.eval()
    return run


def row_logps64(model, batch, grad=False):
    """Per-row float64 sums of the response tokens' log-probs [S], from the model's own logits."""
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    keep = batch.labels != -100
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(keep, batch.labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(-1)


def dpo64(beta, pc, pr, rc, rr):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def responses(batch, rows):
    return [batch.labels[r][batch.labels[r] != -100].tolist() for r in rows.tolist()]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- Mixed-DPO's draw ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.3, 0.5, 0.85])
def test_the_draws_are_bernoulli_p_per_example_and_seeded(p):
    """200 batches of 32 examples: the offline fraction is p within 4 standard errors, consecutive draws are
    uncorrelated, a batch's draws depend on its seed only; p = 0 and p = 1 are never / always offline."""
    draws = [mixed_draws(seed, 32, p) for seed in range(200)]
    flat = torch.tensor([d for batch in draws for d in batch], dtype=torch.float64)
    n = flat.numel()
    assert abs(float(flat.mean()) - p) < 4 * math.sqrt(p * (1 - p) / n), float(flat.mean())
    lag = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(float(lag)) < 4 / math.sqrt(n)
    assert draws[7] == mixed_draws(7, 32, p) and draws[7] != draws[8]
    assert not any(mixed_draws(5, 64, 0.0)) and all(mixed_draws(5, 64, 1.0))


def test_a_mixed_batch_holds_each_examples_drawn_pair_and_samples_only_the_online_ones(files, tmp_path):
    run = build_run(config(files, tmp_path, "mixed_dpo", objective_args={"mixed_p": 0.5},
                           per_device_train_batch_size=8))
    source = run.source
    scored = []
    score = source.judge.score
    source.judge.score = lambda prompts, completions, **kw: (scored.append(len(completions)), score(
        prompts, completions, **kw))[1]
    seen = 0
    for _ in range(4):
        seed = source.seed * 1_000_003 + source.served
        batch = source.next_batch()
        draws = mixed_draws(seed, 8, 0.5)
        assert batch.inputs["use_offline"].tolist() == draws
        assert batch.input_ids.shape[0] == 16  # two rows per example, whichever pair it drew
        assert torch.equal(batch.roles["online_chosen"], batch.roles["chosen"])
        assert torch.equal(batch.roles["online_rejected"], batch.roles["rejected"])
        examples = [source.prompts.examples[i] for i in batch.index.tolist()]
        chosen, rejected = responses(batch, batch.roles["chosen"]), responses(batch, batch.roles["rejected"])
        online = draws.count(False)
        assert batch.metrics["mixed/online_fraction"] == online / 8
        for e, c, r, offline in zip(examples, chosen, rejected, draws):
            if offline:
                assert (c, r) == (e["chosen_ids"], e["rejected_ids"])
            else:  # the judge's better sample (brevity: the shorter text) is chosen
                texts = run.step.models.tokenizer.batch_decode([c, r], skip_special_tokens=True)
                assert len(texts[0]) <= len(texts[1]) and (c, r) != (e["chosen_ids"], e["rejected_ids"])
        if online:
            assert scored[-1] == 2 * online and "objective/scores" in batch.metrics
            seen += 1
        else:
            assert "objective/scores" not in batch.metrics
    assert len(scored) == seen and seen > 0  # the judge is asked only for batches with online pairs


def test_p1_is_offline_dpo_exactly_and_never_judges(files, tmp_path):
    """mixed_p = 1: the batches, the loss and its gradient are offline DPO's (sigmoid) on the same pairs, and the
    judge (one that raises) is never asked."""
    mixed = perturbed(build_run(config(files, tmp_path / "m", "mixed_dpo", reward="broken",
                                       objective_args={"mixed_p": 1.0})))
    dpo = perturbed(build_run(config(files, tmp_path / "d", "sigmoid", online=False)))
    for _ in range(3):
        a, b = mixed.source.next_batch(), dpo.source.next_batch()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert a.inputs["use_offline"].all()
        loss_a, metrics_a = mixed.step(a)
        loss_b, metrics_b = dpo.step(b)
        assert loss_a.item() == loss_b.item()
        assert metrics_a["rewards/margins"].item() == metrics_b["rewards/margins"].item()
        grads_a = torch.autograd.grad(loss_a, [p for p in mixed.policy.parameters()])
        grads_b = torch.autograd.grad(loss_b, [p for p in dpo.policy.parameters()])
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-8) for x, y in zip(grads_a, grads_b))


def test_p0_is_online_dpo_on_the_same_judged_samples(files, tmp_path):
    """mixed_p = 0: every example's pair is the online one, the very samples and judgement of online DPO's batch
    (sigmoid with --online on the same prompts), and the loss equals exactly."""
    mixed = perturbed(build_run(config(files, tmp_path / "m", "mixed_dpo", objective_args={"mixed_p": 0.0})))
    online = perturbed(build_run(config(files, tmp_path / "o", "sigmoid")))
    for _ in range(2):
        a, b = mixed.source.next_batch(), online.source.next_batch()
        assert torch.equal(a.input_ids, b.input_ids) and not a.inputs["use_offline"].any()
        assert a.metrics["objective/scores"] == b.metrics["objective/scores"]
        assert mixed.step(a)[0].item() == online.step(b)[0].item()


# -- the losses against an independent float64 computation ----------------------------------------------------------
def test_the_mixed_batch_loss_and_gradient_equal_float64_dpo_of_the_drawn_pairs(files, tmp_path):
    run = perturbed(build_run(config(files, tmp_path, "mixed_dpo", objective_args={"mixed_p": 0.5},
                                     per_device_train_batch_size=8, beta=0.5)))
    batch = run.source.next_batch()
    draws = batch.inputs["use_offline"]
    assert 0 < int(draws.sum()) < 8  # both kinds in this batch (seeded)
    loss, metrics = run.step(batch)
    policy = row_logps64(run.policy, batch, grad=True)
    ref = row_logps64(run.step.models.reference, batch)
    c, r = batch.roles["chosen"], batch.roles["rejected"]
    want = dpo64(0.5, policy[c], policy[r], ref[c], ref[r]).mean()  # each example's DPO on the pair it holds
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert (metrics["loss/offline"] + metrics["loss/online"]).item() == pytest.approx(loss.item(), rel=1e-5)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    got, expected = torch.autograd.grad(loss, params), torch.autograd.grad(want, params)
    for g, w in zip(got, expected):
        assert (g.double() - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline_generated_rejected"])
def test_avg_dpo_shares_y_plus_and_equals_float64_avg_of_both_terms(files, tmp_path, online):
    """Avg-DPO: 3 rows per example (y+, y-, y~-); y+ is one row read by both terms; the loss and gradient equal
    gamma * DPO(y+, y-) + (1 - gamma) * DPO(y+, y~-) in float64. Online y~- is a policy sample; offline it is the
    file's generated_rejected."""
    cfg = config(files, tmp_path, "avg_dpo", online=online, dataset="pairs" if online else "generated", reward=None,
                 objective_args={"avg_gamma": 0.25}, beta=0.5)
    run = perturbed(build_run(cfg))
    batch = run.source.next_batch()
    n = batch.n_examples
    assert batch.input_ids.shape[0] == 3 * n and set(batch.roles) == {"chosen", "rejected", "online_rejected"}
    rows = torch.cat([batch.roles[k] for k in ("chosen", "rejected", "online_rejected")])
    assert sorted(rows.tolist()) == list(range(3 * n))  # no second copy of y+
    data = run.source.prompts.examples if online else run.source.data.examples
    examples = [data[i] for i in batch.index.tolist()]
    assert responses(batch, batch.roles["chosen"]) == [e["chosen_ids"] for e in examples]
    assert responses(batch, batch.roles["rejected"]) == [e["rejected_ids"] for e in examples]
    generated = responses(batch, batch.roles["online_rejected"])
    if not online:
        assert generated == [e["generated_rejected_ids"] for e in examples]
    loss, _ = run.step(batch)
    policy = row_logps64(run.policy, batch, grad=True)
    ref = row_logps64(run.step.models.reference, batch)
    c, r, g = (batch.roles[k] for k in ("chosen", "rejected", "online_rejected"))
    want = (0.25 * dpo64(0.5, policy[c], policy[r], ref[c], ref[r])
            + 0.75 * dpo64(0.5, policy[c], policy[g], ref[c], ref[g])).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    for got, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        assert (got.double() - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7


# -- resume ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["mixed_dpo", "avg_dpo"])
def test_resume_from_a_checkpoint_gives_the_same_next_batches_and_losses(files, tmp_path, loss_type):
    def argv(out):
        return train_argv(files, out, loss_type, "--max_steps", "4", "--save_steps", "2")

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(argv(full)) == 0
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    assert main(argv(resumed) + ["--resume_from_checkpoint", "latest"]) == 0
    expected, got = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    keys = ("loss", "rewards/margins") + (("mixed/online_fraction",) if loss_type == "mixed_dpo" else ())
    for key in keys:
        assert [r[key] for r in got[2:]] == [r[key] for r in expected[2:]], key
    assert [r.get("objective/scores") for r in got[2:]] == [r.get("objective/scores") for r in expected[2:]]


# -- the CLI ---------------------------------------------------------------------------------------------------------
def train_argv(files, out, loss_type, *flags, dataset="pairs", judge=("--reward_funcs", None)):
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files[dataset]),
            "--output_dir", str(out), "--loss_type", loss_type, "--max_steps", "3", "--logging_steps", "1",
            "--save_steps", "0", "--per_device_train_batch_size", "4", "--max_new_tokens", "6",
            "--learning_rate", "1e-2", "--report_to", "none", "--temperature", "1.0"]
    if loss_type == "mixed_dpo":
        argv += ["--online", judge[0], judge[1] or f"{files['rewards']}:brevity"]
    elif loss_type == "avg_dpo" and dataset != "generated":
        argv += ["--online"]
    return argv + list(flags)


@pytest.mark.parametrize("case", ["reward_funcs", "copy", "pairwise", "avg_online", "avg_offline"])
def test_three_steps_through_the_cli(files, tmp_path, case, capsys):
    loss_type = "avg_dpo" if case.startswith("avg") else "mixed_dpo"
    judge = {"copy": ("--judge", "copy"), "pairwise": ("--judge", str(files["pairwise"]))}.get(
        case, ("--reward_funcs", None))
    dataset = {"copy": "copy", "avg_offline": "generated"}.get(case, "pairs")
    assert main(train_argv(files, tmp_path, loss_type, "--mixed_p" if loss_type == "mixed_dpo" else "--avg_gamma",
                           "0.5", dataset=dataset, judge=judge)) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["rewards/margins"] != 0  # the policy moved
    if loss_type == "mixed_dpo":
        assert all(0 <= r["mixed/online_fraction"] <= 1 for r in records)
        assert any(r["mixed/online_fraction"] > 0 for r in records)
        score = "objective/chosen_prob" if case == "pairwise" else "objective/scores"
        judged = [r[score] for r in records if r["mixed/online_fraction"] > 0]
        assert judged and all(math.isfinite(s) for s in judged)
        if case == "pairwise":
            assert all(0.5 <= s <= 1 for s in judged)
        if case == "copy":
            assert all(0 <= s <= 1 for s in judged)
        for r in records:
            assert r["loss/offline"] + r["loss/online"] == pytest.approx(r["loss"], rel=1e-5)
    else:
        assert {"loss/external_rejected", "loss/generated_rejected"} <= records[-1].keys()
        if case == "avg_online":
            assert "val/contain_eos_token" in records[-1]


@pytest.mark.parametrize("flags, dataset, expected", [
    (["--online", "--reward_funcs", "R", "--mixed_p", "1.5"], "pairs", "mixed_p: must be a number in [0, 1], got 1.5"),
    (["--online", "--reward_funcs", "R", "--mixed_p", "-0.1"], "pairs", "mixed_p: must be a number in [0, 1]"),
    (["--online"], "pairs", "reward_funcs: --online needs one judge"),
    (["--online", "--reward_funcs", "R"], "prompts",
     "dataset_name: mixed_dpo with --online read each prompt's offline pair"),
    ([], "pairs", "loss_type: 'mixed_dpo' does not run on offline data: its online pair is sampled from the policy"),
    (["--online", "--judge", "nowhere"], "pairs", "judge: no such model directory: nowhere"),
])
def test_bad_mixed_input_fails_in_one_line(files, tmp_path, capsys, flags, dataset, expected):
    flags = [f"{files['rewards']}:brevity" if f == "R" else f for f in flags]
    argv = train_argv(files, tmp_path, "sigmoid", "--loss_type", "mixed_dpo", *flags, dataset=dataset)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("prefuse train: error:") and expected in err[0], err


@pytest.mark.parametrize("flags, dataset, expected", [
    (["--online", "--avg_gamma", "2"], "pairs", "avg_gamma: must be a number in [0, 1], got 2"),
    (["--online", "--judge", "copy"], "pairs", "judge: ['avg_dpo'] use no judge"),
    (["--online"], "prompts", "dataset_name: avg_dpo with --online read each prompt's offline pair"),
    ([], "pairs", "column 'generated_rejected' is missing"),
    (["--avg_rejected", "bdhs"], "generated", "avg_rejected: generates y~- during training: add --online"),
])
def test_bad_avg_input_fails_in_one_line(files, tmp_path, capsys, flags, dataset, expected):
    argv = train_argv(files, tmp_path, "sigmoid", "--loss_type", "avg_dpo", *flags, dataset=dataset)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("prefuse train: error:") and expected in err[0], err


def test_a_bad_generated_rejected_is_a_one_line_row_error(files, tmp_path, capsys):
    rows = [json.loads(line) for line in files["generated"].read_text().splitlines()]
    rows[1]["generated_rejected"] = None
    write_jsonl(tmp_path / "bad.jsonl", rows)
    argv = train_argv(files, tmp_path / "out", "avg_dpo", dataset="generated")
    argv[argv.index("--dataset_name") + 1] = str(tmp_path / "bad.jsonl")
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and f"{tmp_path / 'bad.jsonl'}:2: field 'generated_rejected'" in err[0], err


# -- online BDHS as Avg-DPO's y~- ----------------------------------------------------------------------------------
def test_avg_dpo_with_online_bdhs_rejected(files, tmp_path):
    """--avg_rejected bdhs: y~- of each example is prefuse.engine.methods.bdhs.bdhs_rejected from the current policy (the
    same call, made again here, gives the same rows), and its metrics reach the batch."""
    from prefuse.engine.methods.bdhs import bdhs_rejected

    cfg = config(files, tmp_path, "avg_dpo", reward=None, avg_rejected="bdhs", embedder="lexical", n_bdhs=2)
    run = perturbed(build_run(cfg))
    seed = run.source.seed * 1_000_003 + run.source.served
    batch = run.source.next_batch()
    examples = [run.source.prompts.examples[i] for i in batch.index.tolist()]
    want, metrics = bdhs_rejected(run.step.models, run.step.models.tokenizer, examples, seed=seed,
                                  rollout=run.source.rollout, eos_id=run.source.eos_id, pad_id=run.source.pad_id,
                                  **{k: v for k, v in run.source.bdhs.items() if k != "regenerate"})
    assert run.source.bdhs["regenerate"] is bdhs_rejected  # the run's build hands the BDHS function in
    assert responses(batch, batch.roles["online_rejected"]) == want
    assert batch.metrics["bdhs/attempts"] == metrics["bdhs/attempts"] and 1 <= metrics["bdhs/attempts"] <= 2
    assert math.isfinite(run.step(batch)[0].item())


@pytest.mark.parametrize("flags, expected", [
    (["--rho_th", "2"], "rho_th: must be in [0, 1], got 2.0"),
    (["--embedder", "nowhere"], "--embedder: 'nowhere' is neither a directory"),
])
def test_bad_bdhs_settings_fail_in_one_line(files, tmp_path, capsys, flags, expected):
    assert main(train_argv(files, tmp_path, "avg_dpo", "--avg_rejected", "bdhs", *flags)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and expected in err[0], err
    assert main(train_argv(files, tmp_path, "mixed_dpo", "--avg_rejected", "bdhs")) == 2
    assert "avg_rejected: is read by avg_dpo only" in capsys.readouterr().err


# -- vision-language models ----------------------------------------------------------------------------------------
VLM_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
                "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
IMAGE_REWARDS = '''
def brevity_seen(prompts, completions, images, **columns):
    """Shorter is better; the images column reaches the judge (a VLM judge reads it)."""
    assert all(isinstance(i, list) and len(i) == 1 for i in images), images
    return [-len(c) / 8 for c in completions]
'''


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A tiny LLaVA (CLIP tower 16x16 in 8x8 patches: 4 image tokens + Llama) with its processor, synthetic PNGs
    and an image pairs file (TRL's vision format: `images`, `<image>` in the prompt)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm_mixed")
    save_tiny_llava(root / "model", build_tokenizer(), chat_template=VLM_TEMPLATE)
    (root / "images").mkdir()
    colours = ["red", "green", "blue", "white"]
    for i in range(4):
        pixels = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{i}.png")
    rows = [{"images": [f"images/{i}.png"], "prompt": f"<image>What colour is picture {i}?", "chosen": f" It is {c}.",
             "rejected": f" It is {colours[i - 1]}, I think."} for i, c in enumerate(colours)]
    (root / "rewards.py").write_text(IMAGE_REWARDS)
    return {"model": root / "model", "pairs": write_jsonl(root / "pairs.jsonl", rows), "rewards": root / "rewards.py"}


def vlm_logps64(model, batch, grad=False):
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision).logits.double()
    keep = batch.labels != -100
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(keep, batch.labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(-1)


@pytest.mark.parametrize("loss_type", ["mixed_dpo", "avg_dpo"])
def test_vision_language_batches_carry_each_rows_images_and_match_float64(vlm, tmp_path, loss_type):
    """A tiny LLaVA: the online pairs (or y~-) are sampled with the prompts' images, every row of the batch has its
    example's pixel values (one image per row), the judge sees the images column, and the loss equals the
    objective on float64 log-probs from the model's own multimodal logits."""
    cfg = TrainConfig(model_name_or_path=str(vlm["model"]), dataset_name=str(vlm["pairs"]), output_dir=str(tmp_path),
                      loss_type=[loss_type], online=True, per_device_train_batch_size=4, max_new_tokens=5,
                      temperature=1.0, report_to="none", max_steps=1, save_steps=0, beta=0.5,
                      reward_funcs=[f"{vlm['rewards']}:brevity_seen"] if loss_type == "mixed_dpo" else None,
                      objective_args={"mixed_p": 0.5} if loss_type == "mixed_dpo" else {})
    run = perturbed(build_run(cfg))
    batch = run.source.next_batch()
    rows = batch.input_ids.shape[0]
    assert batch.vision["pixel_values"].shape[0] == rows  # one image per row, in row order
    image_id = run.policy.config.image_token_id
    assert ((batch.input_ids == image_id).sum(-1) == 4).all()
    policy = vlm_logps64(run.policy, batch, grad=True)
    ref = vlm_logps64(run.step.models.reference, batch)
    c, r = batch.roles["chosen"], batch.roles["rejected"]
    if loss_type == "mixed_dpo":
        draws = batch.inputs["use_offline"]
        assert 0 < int(draws.sum()) < 4 and "objective/scores" in batch.metrics
        want = dpo64(0.5, policy[c], policy[r], ref[c], ref[r]).mean()
    else:
        g = batch.roles["online_rejected"]
        want = (0.5 * dpo64(0.5, policy[c], policy[r], ref[c], ref[r])
                + 0.5 * dpo64(0.5, policy[c], policy[g], ref[c], ref[g])).mean()
    # the same pixels make the same rows: a row's image is its example's (rows r and r + B share an example)
    n = batch.n_examples
    assert torch.equal(batch.vision["pixel_values"][:n], batch.vision["pixel_values"][n:2 * n])
    loss, _ = run.step(batch)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    for got, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params, allow_unused=True)):
        if w is not None:
            assert (got.double() - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7


def test_mixed_dpo_on_image_pairs_through_the_cli(vlm, tmp_path, capsys):
    argv = ["train", "--online", "--model_name_or_path", str(vlm["model"]), "--dataset_name", str(vlm["pairs"]),
            "--output_dir", str(tmp_path), "--loss_type", "mixed_dpo", "--mixed_p", "0.5", "--reward_funcs",
            f"{vlm['rewards']}:brevity_seen", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "0",
            "--per_device_train_batch_size", "4", "--max_new_tokens", "5", "--use_peft", "--lora_r", "4",
            "--learning_rate", "1e-2", "--report_to", "none"]
    assert main(argv) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert any(r["mixed/online_fraction"] > 0 for r in records)


def judge_rows(vlm, order=(0, 1, 2, 3)):
    """The image pairs file's prompts, chosen responses and images (absolute paths), images in `order`."""
    rows = [json.loads(line) for line in Path(vlm["pairs"]).read_text().splitlines()]
    images = [[str(Path(vlm["pairs"]).parent / rows[i]["images"][0])] for i in order]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], images


def test_the_vision_language_judge_scores_yes_against_no_with_the_prompts_images(vlm):
    """--judge DIR of a vision-language model: score = log P(" yes") - log P(" no") of the model's next token
    after the question, the images through the vision tower; batched (left-padded) as each row alone in float64."""
    from PIL import Image

    from prefuse.engine.judges import VisionLanguageJudge, make_judge

    judge = make_judge(judge=str(vlm["model"]), batch_size=3)
    assert isinstance(judge, VisionLanguageJudge)
    prompts, completions, images = judge_rows(vlm)
    completions = [c + " extra words" * i for i, c in enumerate(completions)]  # rows of different lengths
    got = judge.score(prompts, completions, images=images)
    processor = transformers.AutoProcessor.from_pretrained(vlm["model"])
    model64 = transformers.AutoModelForImageTextToText.from_pretrained(vlm["model"], dtype=torch.float64)
    yes, no = (processor.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in (" yes", " no"))
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        text = f"{prompt}\nResponse: {completion}\nIs the response correct and helpful? Answer yes or no.\nAnswer:"
        inputs = processor(text=[text], images=[Image.open(images[i][0]).convert("RGB")], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].double()
        with torch.no_grad():
            logprobs = torch.log_softmax(model64(**inputs).logits[0, -1], -1)
        assert got[i].item() == pytest.approx((logprobs[yes] - logprobs[no]).item(), abs=1e-5), i
    # the images matter: the same texts with the pictures moved round score differently
    moved = judge.score(prompts, completions, images=judge_rows(vlm, order=(1, 2, 3, 0))[2])
    assert (moved - got).abs().max() > 1e-6
    others = [" It is black.", " No idea.", " Blue, surely.", " Green."]
    probs = judge.compare(prompts, completions, others, images=images)
    assert torch.allclose(probs, torch.sigmoid(got - judge.score(prompts, others, images=images)), atol=1e-6)
    assert torch.equal(judge.compare(prompts, completions, completions, images=images), torch.full((4,), 0.5))


def test_vision_language_judge_input_errors_are_one_line(vlm, tmp_path):
    from prefuse.engine.judges import JudgeError, make_judge

    judge = make_judge(judge=str(vlm["model"]))
    prompts, completions, images = judge_rows(vlm)
    with pytest.raises(JudgeError, match=r"^judge: completion 1: field 'images': image 1: .*nowhere.png does not "
                                         r"exist$"):
        judge.score(prompts[:2], completions[:2], images=[images[0], [str(tmp_path / "nowhere.png")]])
    with pytest.raises(JudgeError, match=r"^judge: .*image"):  # 2 placeholders, 1 image
        judge.score(["<image><image>Which colour?"], [" Red."], images=[images[0]])
    bare = tmp_path / "no_processor"
    shutil.copytree(vlm["model"], bare)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(JudgeError, match=r"^judge: .* has no image processor"):
        make_judge(judge=str(bare))


def test_online_mixed_dpo_judged_by_the_vision_language_model_through_the_cli(vlm, tmp_path, capsys):
    """Mixed-DPO on image pairs whose online pairs a vision-language judge (the tiny LLaVA itself) picks."""
    argv = ["train", "--online", "--model_name_or_path", str(vlm["model"]), "--dataset_name", str(vlm["pairs"]),
            "--output_dir", str(tmp_path), "--loss_type", "mixed_dpo", "--mixed_p", "0.25", "--judge",
            str(vlm["model"]), "--max_steps", "2", "--logging_steps", "1", "--save_steps", "0",
            "--per_device_train_batch_size", "4", "--max_new_tokens", "4", "--use_peft", "--lora_r", "4",
            "--report_to", "none", "--seed", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    judged = [r for r in records if r["mixed/online_fraction"] > 0]
    assert judged and all(math.isfinite(r["objective/scores"]) and r["objective/scores"] != 0 for r in judged)


def test_the_mixture_sampler_reads_each_prompts_images(vlm, tmp_path):
    """Nash-MD's geometric mixture on a tiny LLaVA: both models read each sample's pixel values with its prompt;
    the first step's mixture log-probs equal softmax((1 - m) log pi + m log pi_ref) of the two models' own
    multimodal logits (and not those with another example's picture)."""
    from prefuse.engine.online.rollout import RolloutConfig, sample_mixture

    cfg = TrainConfig(model_name_or_path=str(vlm["model"]), dataset_name=str(vlm["pairs"]), output_dir=str(tmp_path),
                      loss_type=["nash_md"], online=True, per_device_train_batch_size=4, max_new_tokens=3,
                      temperature=1.0, report_to="none", max_steps=1, save_steps=0,
                      reward_funcs=[f"{vlm['rewards']}:brevity_seen"])
    run = perturbed(build_run(cfg))
    batch = run.source.next_batch()  # a policy sample against a mixture sample of every prompt, with its image
    assert batch.vision["pixel_values"].shape[0] == batch.input_ids.shape[0] == 4
    examples = run.source.prompts.examples[:2]
    m = 0.3
    samples = sample_mixture(run.step.models, [e["prompt_ids"] for e in examples],
                             RolloutConfig(max_new_tokens=2, temperature=1.0, num_generations=1, mixture_coef=m),
                             seed=0, eos_id=None, pad_id=0, record=True, images=[e["images"] for e in examples])
    first = samples.extra["step_logprobs"][0]  # [2, V]

    def mixture(example, pictures):
        ids = torch.tensor([example["prompt_ids"]])
        with torch.no_grad():
            policy, reference = (torch.log_softmax(model(input_ids=ids, **pictures.model_inputs()).logits[0, -1], -1)
                                 for model in (run.policy, run.step.models.reference))
        return torch.log_softmax((1 - m) * policy + m * reference, -1)

    for i, example in enumerate(examples):
        assert torch.allclose(first[i], mixture(example, example["images"]), atol=1e-4), i
        assert (first[i] - mixture(example, examples[1 - i]["images"])).abs().max() > 1e-3, i
