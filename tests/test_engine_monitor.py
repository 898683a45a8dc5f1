"""The over-optimisation monitor (engine/methods/monitor.py, ALGORITHMS.md section 11): its indicators (k = 10 and the
extra k) against a float64 computation from the model's full logits, the EMA and turning-point rule (min_delta
included) on synthetic sequences, and `prefuse train` runs: one pushed into over-optimisation that early stopping
stops with best/ at the peak (and that a resume leaves stopped), one whose training the monitor must leave exactly
as it was (and whose monitor state a resume continues), the flags' parsing and bad flags."""
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from prefuse.cli import main  # noqa: E402
from prefuse.engine.data import collate_sequences, load_records, tokenize_preferences  # noqa: E402
from prefuse.engine.models.loading import Models  # noqa: E402
from prefuse.engine.methods.monitor import (MAX_TOP_K, HeldOut, Monitor, TurningPoint, build_monitor,  # noqa: E402
                                    held_out_prompts, indicator_for, indicators, load_monitor_prompts)
from prefuse.heads import head_of  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KEYS = ["monitor/topk_entropy", "monitor/topk_mass", "monitor/topk_entropy_unnormalized", "monitor/entropy",
        "monitor/topk_entropy_ema", "monitor/topk_mass_ema", "monitor/turned", "monitor/falls", "monitor/peak_step",
        "monitor/response_length", "monitor/chosen/topk_entropy", "monitor/chosen/topk_mass",
        *(f"monitor/{chosen}{name}@{k}" for chosen in ("", "chosen/") for name in ("topk_entropy", "topk_mass")
          for k in (5, 20, 50))]  # the default --monitor_extra_top_k
EXTRA = (5, 20, 50)

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def rows(name, start, stop):
    with open(DATA_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f][start:stop]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama warmed up on the REJECTED responses of 16 pandalm pairs (a peaked model with a habit DPO then
    unlearns, so the sample entropy first rises), the pairs, and 16 held-out pairs of other rows."""
    root = tmp_path_factory.mktemp("monitor")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = save_tiny_llama(root / "random", tokenizer, tie_word_embeddings=False)
    paths = {"random": root / "random", "model": root / "model",
             "train": write_jsonl(root / "train.jsonl", rows("pandalm_testset_v1_human.jsonl", 0, 16)),
             "eval": write_jsonl(root / "eval.jsonl", rows("pandalm_testset_v1_human.jsonl", 16, 32))}
    examples = tokenize_preferences(load_records(paths["train"]), tokenizer, max_length=96,
                                    max_prompt_length=48).examples
    batch = collate_sequences([e["prompt_ids"] for e in examples], [e["rejected_ids"] for e in examples], 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # the habit is learned: a peaked distribution
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    return paths


def args(files, out, **flags) -> list[str]:
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["train"]),
            "--eval_split", str(files["eval"]), "--output_dir", str(out), "--max_length", "96",
            "--max_prompt_length", "48", "--report_to", "none", "--eval_steps", "1000"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def monitored(out) -> list[dict]:
    return [r for r in read_metrics(out) if "monitor/topk_entropy" in r]


def weights(path) -> dict:
    name = "adapter_model.safetensors" if (Path(path) / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(Path(path) / name))


# -- the indicators ------------------------------------------------------------------------------------------------

def float64_indicators(model, prompts, responses, k, extra=()) -> dict[str, float]:
    """From the model's full logits, in float64: per response the mean over the positions that predict its tokens,
    then the mean over responses; topk_entropy@j and topk_mass@j for each j of `extra`."""
    per_response = {}
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
        p = torch.softmax(logits[positions], -1)

        def top_k(j):  # (renormalized entropy, mass, unnormalized entropy) over the j most likely tokens
            top = p.topk(j, -1).values
            mass = top.sum(-1)
            q = top / mass[:, None]
            return -(q * q.log()).sum(-1), mass, -(top * top.log()).sum(-1)

        entropy, mass, unnormalized = top_k(k)
        values = {"topk_entropy": entropy, "topk_mass": mass, "topk_entropy_unnormalized": unnormalized,
                  "entropy": -(p * p.log()).sum(-1)}
        for j in extra:
            values[f"topk_entropy@{j}"], values[f"topk_mass@{j}"], _ = top_k(j)
        for name, value in values.items():
            per_response.setdefault(name, []).append(float(value.mean()))
    return {name: sum(v) / len(v) for name, v in per_response.items()}


@pytest.mark.parametrize("peft, k", [(False, 10), (True, 5)])
def test_indicators_equal_float64_from_the_full_logits(files, peft, k):
    """The monitor's generations (T = 1, its seed, under a forked RNG), then the fused head's statistics on them
    and on the chosen responses, equal the float64 statistics of the model's own logits on the same tokens: for
    the rule's k and for each extra k (5, 20, 50; with k = 5 the extra 5 repeats the main one)."""
    tokenizer = build_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
        with torch.no_grad():  # a non-zero update, so the adapter matters
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    examples = tokenize_preferences(load_records(files["eval"]), tokenizer, max_length=96,
                                    max_prompt_length=48).examples
    held_out = held_out_prompts(examples, 3)
    monitor = Monitor(Models(model, None, tokenizer), held_out, Path("unused"), every=1, indicator="entropy",
                      top_k=k, extra_top_k=EXTRA, max_new_tokens=12, seed=5, pad_id=0, eos_id=2, batch_size=2)

    rng = torch.get_rng_state()
    responses = monitor.generate()
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is not touched
    assert responses == monitor.generate()  # the same seed every evaluation: the same samples
    assert len(responses) == 3 and all(1 <= len(r) <= 12 for r in responses)
    options = dict(top_k=k, extra_top_k=EXTRA, pad_id=0, batch_size=2)
    got = indicators(model, head_of(model), held_out.prompts, responses, **options)
    expected = float64_indicators(model, held_out.prompts, responses, k, EXTRA)
    assert sorted(got) == sorted(expected) and len(expected) == 4 + 2 * len(EXTRA)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert 0 < got["topk_mass"] < 1 and 0 < got["topk_entropy"] < torch.log(torch.tensor(float(k)))
    # the extra k are their own numbers: the mass and the (renormalized) entropy grow with k
    masses = [got[f"topk_mass@{j}"] for j in EXTRA]
    entropies = [got[f"topk_entropy@{j}"] for j in EXTRA]
    assert masses == sorted(masses) and len(set(masses)) == 3 and masses[-1] < 1
    assert entropies == sorted(entropies) and entropies[-1] < torch.log(torch.tensor(50.0))
    if k in EXTRA:
        assert got[f"topk_mass@{k}"] == pytest.approx(got["topk_mass"], rel=1e-6)

    chosen = indicators(model, head_of(model), held_out.prompts, held_out.chosen, **options)
    expected_chosen = float64_indicators(model, held_out.prompts, held_out.chosen, k, EXTRA)
    assert sorted(chosen) == sorted(expected_chosen)
    for name in expected_chosen:
        assert chosen[name] == pytest.approx(expected_chosen[name], rel=1e-5, abs=1e-6), name

    values = monitor.evaluate()  # what a training step logs: the same numbers under the monitor/ names
    assert values["monitor/topk_entropy"] == pytest.approx(got["topk_entropy"], rel=1e-6)
    assert values["monitor/chosen/topk_mass"] == pytest.approx(chosen["topk_mass"], rel=1e-6)
    for j in EXTRA:
        assert values[f"monitor/topk_entropy@{j}"] == pytest.approx(got[f"topk_entropy@{j}"], rel=1e-6)
        assert values[f"monitor/chosen/topk_mass@{j}"] == pytest.approx(chosen[f"topk_mass@{j}"], rel=1e-6)
    assert values["monitor/response_length"] == sum(map(len, responses)) / 3


def test_held_out_prompts_are_distinct_fixed_and_carry_the_chosen_responses(files, tmp_path):
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [7], "rejected_ids": [8]},
             {"prompt_ids": [1, 5], "chosen_ids": [9], "rejected_ids": [8]},  # the same prompt: read once
             {"prompt_ids": [1, 6], "chosen_ids": [10], "rejected_ids": [11]},
             {"prompt_ids": [1, 4], "chosen_ids": [12], "rejected_ids": [13]}]
    assert held_out_prompts(pairs, 2) == HeldOut([[1, 5], [1, 6]], [[7], [10]])
    unpaired = [{"prompt_ids": [3], "completion_ids": [4], "label": False},
                {"prompt_ids": [3], "completion_ids": [5], "label": True}]
    assert held_out_prompts(unpaired, 4) == HeldOut([[3]], [[5]])
    assert held_out_prompts(unpaired[:1], 4) == HeldOut([[3]], None)  # no desirable response: prompts only

    class Settings:
        max_length, max_prompt_length, truncation, skip_bad_rows, monitor_samples = 96, 48, True, False, 3

    tokenizer = build_tokenizer()
    prompts_only = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in
                                                             rows("ultrafeedback_binarized_sample_eval.jsonl", 0, 5)])
    held_out = load_monitor_prompts(str(prompts_only), tokenizer, Settings)
    assert len(held_out.prompts) == 3 and held_out.chosen is None
    paired = load_monitor_prompts(str(files["eval"]), tokenizer, Settings)
    assert len(paired.prompts) == len(paired.chosen) == 3 and paired.chosen[0]


@pytest.mark.parametrize("loss_type, args_, expected", [
    (["sigmoid"], {}, "entropy"), (["ipo"], {}, "entropy"), (["hinge"], {}, "mass"), (["slic"], {}, "mass"),
    (["cpo"], {"loss_type": "hinge"}, "mass"), (["sigmoid", "sft"], {}, "entropy"),
])
def test_the_indicator_follows_the_objective(loss_type, args_, expected):
    assert indicator_for(loss_type, args_) == expected


# -- the EMA and the turning-point rule ----------------------------------------------------------------------------

def run_rule(values, decay=0.0, patience=3, min_delta=0.0):
    rule = TurningPoint(decay, patience, min_delta)
    peaks, fired_at = [], None
    for step, value in enumerate(values, start=1):
        if rule.update(value, step):
            peaks.append(step)
        if rule.turned and fired_at is None:
            fired_at = step
    return rule, peaks, fired_at


def test_the_rule_fires_after_patience_falls_from_the_peak():
    rule, peaks, fired_at = run_rule([1.0, 2.0, 3.0, 4.0, 3.5, 3.0, 2.5, 2.0])
    assert peaks == [1, 2, 3, 4] and rule.peak_step == 4 and rule.peak == 4.0
    assert fired_at == 7 and rule.turn_step == 7 and rule.falls == 3
    # latched: later values neither move the peak nor clear the flag
    assert not rule.update(10.0, 9) and rule.turned and rule.peak_step == 4 and rule.ema == 10.0
    assert run_rule([1.0, 2.0, 3.0, 4.0, 3.5, 3.0, 2.5, 2.0], patience=4)[2] == 8
    assert run_rule([5.0, 4.0, 3.0, 2.0])[2] == 4  # falling from the first evaluation: the peak is the first


def test_the_rule_smooths_with_the_ema():
    rule = TurningPoint(decay=0.5, patience=3)
    rule.update(1.0, 1)
    rule.update(3.0, 2)
    assert rule.ema == 2.0  # 0.5 * 1 + 0.5 * 3
    # raw: up, then one sharp dip and up again: the EMA falls once only, no turn
    rule, peaks, fired_at = run_rule([1.0, 2.0, 3.0, 4.0, 2.0, 4.5, 5.0, 5.5], decay=0.5)
    assert fired_at is None and peaks[-1] == 8
    # a steady decline after the peak, under smoothing: falls at 5, 6, 7 -> fires at 7
    rule, peaks, fired_at = run_rule([1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0], decay=0.5)
    assert peaks[-1] == 4 and fired_at == 7


def test_noise_that_recovers_does_not_fire():
    # two falls, a rise below the peak (resets the count), a new peak, two falls, a new peak
    rule, peaks, fired_at = run_rule([1.0, 2.0, 3.0, 2.5, 2.4, 2.9, 3.2, 3.1, 3.0, 3.3, 3.25])
    assert fired_at is None and not rule.turned and rule.peak_step == 10 and rule.falls == 1
    # a flat evaluation is not a fall either
    assert run_rule([3.0, 2.0, 1.0, 1.0, 0.5, 0.4])[2] is None


def test_a_fall_is_a_drop_by_more_than_min_delta():
    rise = [1.0, 2.0, 3.0, 4.0]
    drift = rise + [4.0 - 0.01 * i for i in range(1, 11)]  # ten evaluations of a slow drift down
    assert run_rule(drift)[2] == 7  # min_delta 0: any drop is a fall
    rule, peaks, fired_at = run_rule(drift, min_delta=0.02)
    assert fired_at is None and rule.falls == 0 and peaks == [1, 2, 3, 4]  # a drift below min_delta never fires
    steep = rise + [3.9, 3.8, 3.7, 3.6]  # drops of 0.1 > 0.05
    assert run_rule(steep, min_delta=0.05)[2] == 7
    # a small drop between two large ones is no fall and resets the count: the turn comes three large drops later
    mixed = rise + [3.9, 3.8, 3.79, 3.7, 3.6, 3.5]
    assert run_rule(mixed, min_delta=0.05)[2] == 10 and run_rule(mixed)[2] == 7
    assert run_rule(rise + [3.5, 3.0, 2.5], min_delta=0.5)[2] is None  # "more than": a drop of exactly 0.5 is none
    # on the EMA's drops, not the raw values': one raw drop of 0.3, then flat, is EMA drops of about 0.14, 0.07,
    # 0.036, 0.018 under decay 0.5
    step_down = rise + [4.0] * 6 + [3.7] * 4
    assert run_rule(step_down, decay=0.5, min_delta=0.05)[2] is None
    assert run_rule(step_down, decay=0.5, min_delta=0.03)[2] == 13


def test_a_resumed_rule_keeps_its_state_and_takes_this_runs_settings():
    def monitor(**settings):
        return Monitor(Models(torch.nn.Linear(2, 2), None, None), HeldOut([[1]], None), Path("unused"), every=1,
                       indicator="entropy", **settings)

    first = monitor(patience=3, decay=0.0)
    for step, value in enumerate([1.0, 2.0, 1.5], start=1):
        first.rule.update(value, step)
    state = json.loads(json.dumps(first.state_dict()))  # as the trainer state stores it
    assert state["rule"]["min_delta"] == 0.0 and state["stopped_early"] is False
    second = monitor(patience=5, decay=0.25, min_delta=0.3)
    second.load_state_dict(state)
    assert (second.rule.peak, second.rule.peak_step, second.rule.falls) == (2.0, 2, 1)
    assert (second.rule.patience, second.rule.decay, second.rule.min_delta) == (5, 0.25, 0.3)
    del state["rule"]["min_delta"]  # a checkpoint from before --monitor_min_delta
    second.load_state_dict(state)
    assert second.rule.min_delta == 0.3 and second.rule.falls == 1


def test_best_is_replaced_whole_or_not_at_all(tmp_path):
    """best/ comes from the checkpoint writer through a staging folder: a save that dies half-way leaves the old
    best/ as it was; one killed between the two renames of the replacement is finished by the next monitor."""
    from prefuse.engine.checkpoint import load_checkpoint, save_checkpoint

    def monitor():
        return Monitor(Models(torch.nn.Linear(2, 2), None, None), HeldOut([[1]], None), tmp_path, every=1,
                       indicator="entropy", keep_best=True)

    def save(step, value):
        model = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(model.weight, value)
        return lambda directory: save_checkpoint(directory, step, model=model, trainer_state={"step": step})

    def best_step():
        model = torch.nn.Linear(2, 2)
        state = load_checkpoint(tmp_path / "best", model=model, restore_rng=False)
        return state["step"], float(model.weight[0, 0])

    monitor().save_best(save(2, 2.0))
    assert best_step() == (2, 2.0)

    def dies_half_way(directory):  # as a writer killed mid-write leaves it: a temporary folder, half written
        torn = directory / ".tmp-checkpoint-4-1"
        torn.mkdir(parents=True)
        (torn / "model.safetensors").write_bytes(b"torn")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        monitor().save_best(dies_half_way)
    assert best_step() == (2, 2.0)

    save(6, 6.0)(tmp_path / ".best-staging")  # complete, then killed after best/ was moved aside
    shutil.rmtree(tmp_path / "best")
    monitor()
    assert best_step() == (6, 6.0) and not (tmp_path / ".best-staging").exists()


# -- prefuse train -------------------------------------------------------------------------------------------------

def test_early_stopping_keeps_the_checkpoint_from_before_the_turn(files, tmp_path, capsys):
    """DPO at a large learning rate from the peaked warm-up: the sample entropy rises while DPO unlearns the habit
    (a rise of several tenths, on any CPU), then drifts down as the policy settles on the chosen style, its sampled
    values noisy. Where the turn comes moves with the CPU's rounding (the samples do), so the run has ample
    max_steps headroom and the test replays the rule on the logged EMA: the run stops at the first evaluation
    where `patience` falls in a row follow the running peak, and best/ is that peak step's checkpoint (its weights
    equal checkpoint-{peak}'s). Resuming the stopped run (latest) trains nothing: one line says where it stopped
    and what best/ holds, and no step, checkpoint or log record is added; without --early_stopping a resume
    trains on."""
    out = tmp_path / "dpo"
    max_steps, every, patience = 200, 2, 3
    flags = dict(loss_type="sigmoid", beta=0.1, learning_rate=1e-2, lr_scheduler_type="constant",
                 per_device_train_batch_size=16, max_steps=max_steps, logging_steps=100, save_steps=every,
                 monitor_steps=every, monitor_samples=8, monitor_max_new_tokens=16, monitor_ema=0.5,
                 monitor_patience=patience)
    assert main(args(files, out, **flags, early_stopping="true")) == 0
    records = monitored(out)
    steps = [r["step"] for r in records]
    assert steps == list(range(every, steps[-1] + 1, every))
    for key in KEYS:
        assert all(key in r for r in records), key
    values = [r["monitor/topk_entropy"] for r in records]
    emas = [r["monitor/topk_entropy_ema"] for r in records]
    print("\nstep  topk_entropy  ema    topk_mass  turned")
    for r in records:
        print(f"{r['step']:4d}  {r['monitor/topk_entropy']:.4f}  {r['monitor/topk_entropy_ema']:.4f}  "
              f"{r['monitor/topk_mass']:.4f}  {r['monitor/turned']:.0f}")
    # the EMA (decay 0.5) of the logged values, and the rule replayed on it: a new running peak resets the falls,
    # an EMA below the previous one counts a fall, anything else resets them; it fires at `patience` falls
    replayed = [values[0]]
    for value in values[1:]:
        replayed.append(0.5 * replayed[-1] + 0.5 * value)
    assert emas == pytest.approx(replayed, rel=1e-12)
    peak, falls, turn = 0, 0, None
    for i in range(1, len(emas)):
        if emas[i] > emas[peak]:
            peak, falls = i, 0
        else:
            falls = falls + 1 if emas[i] < emas[i - 1] else 0
        if falls == patience:
            turn = i
            break
    assert turn is not None, "the rule never fired"  # max_steps is far enough that it does
    peak_step, stop_step = steps[peak], steps[turn]
    assert turn == len(records) - 1 and stop_step < max_steps  # the run stopped at the rule's first firing
    assert all(later < earlier for earlier, later in zip(emas[turn - patience:turn], emas[turn - patience + 1:]))
    # the indicator rose (DPO unlearning the habit) before it turned
    assert peak > 2 and emas[peak] > emas[0] + 0.2
    assert [r["monitor/turned"] for r in records] == [0.0] * (len(records) - 1) + [1.0]
    assert [r["monitor/peak_step"] for r in records] == [float(steps[max(range(i + 1), key=emas.__getitem__)])
                                                         for i in range(len(records))]
    assert records[-1]["monitor/topk_entropy"] < records[peak]["monitor/topk_entropy"]
    assert read_metrics(out)[-1]["step"] == stop_step  # nothing trained or logged after the stop

    best = out / "best"
    manifest = json.loads((best / "checkpoint.json").read_text())
    state = json.loads((best / "trainer_state.json").read_text())
    assert manifest["step"] == state["step"] == peak_step
    assert state["monitor"]["rule"]["peak_step"] == peak_step and not state["monitor"]["rule"]["turned"]
    at_peak, at_stop = weights(out / f"checkpoint-{peak_step}"), weights(out / f"checkpoint-{stop_step}")
    kept = weights(best)
    assert kept.keys() == at_peak.keys()
    assert all(torch.equal(kept[name], at_peak[name]) for name in kept)
    assert not all(torch.equal(kept[name], at_stop[name]) for name in kept)  # training went on after the peak
    assert not (out / f"checkpoint-{stop_step + every}").exists() and not (out / ".best-staging").exists()
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert (out / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stopped = json.loads((out / f"checkpoint-{stop_step}" / "trainer_state.json").read_text())["monitor"]
    assert stopped["stopped_early"] is True and stopped["rule"]["turn_step"] == stop_step
    assert state["monitor"]["stopped_early"] is False  # best/ is from before the turn

    # resume the stopped run: nothing trained, one line, exit 0
    before = {path.name for path in out.iterdir()}
    log_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args(files, out, **flags, early_stopping="true", resume_from_checkpoint="latest")) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [line for line in printed if "stopped early" in line]
    assert len(lines) == 1, printed
    assert f"stopped early at step {stop_step}" in lines[0] and f"holds step {peak_step}" in lines[0], lines[0]
    assert not any(line.startswith(("training ", "step ")) for line in printed), printed
    assert {path.name for path in out.iterdir()} == before  # no checkpoint-{stop_step + 1}
    assert (out / "metrics.jsonl").read_text() == log_before
    assert json.loads((out / "best" / "checkpoint.json").read_text())["step"] == peak_step

    # without --early_stopping the resumed run trains on (the monitor only logs): two more steps
    onward = tmp_path / "onward"
    shutil.copytree(out, onward)
    assert main(args(files, onward, **{**flags, "max_steps": stop_step + 2},
                     resume_from_checkpoint="latest")) == 0
    assert (onward / f"checkpoint-{stop_step + 2}").is_dir()
    assert [r["step"] for r in monitored(onward)] == steps + [stop_step + 2]
    assert json.loads((onward / "best" / "checkpoint.json").read_text())["step"] == peak_step


def test_the_monitor_leaves_training_as_it_was_and_resumes_exactly(files, tmp_path):
    """LoRA with dropout (the training draws random numbers): the weights after 8 steps are the same with and
    without the monitor; a run resumed from checkpoint-4 logs the same monitor records (EMA, peak, falls) as the
    uninterrupted one, since the monitor's state is part of the checkpoint."""
    flags = dict(loss_type="ipo", beta=0.1, learning_rate=3e-3, use_peft="true", lora_r=4, lora_dropout=0.1,
                 per_device_train_batch_size=4, max_steps=8, logging_steps=2, save_steps=4)
    monitor = dict(monitor_steps=2, monitor_samples=4, monitor_max_new_tokens=8, monitor_keep_best="true")
    assert main(args(files, tmp_path / "plain", **flags)) == 0
    assert main(args(files, tmp_path / "monitored", **flags, **monitor)) == 0
    plain, watched = weights(tmp_path / "plain" / "checkpoint-8"), weights(tmp_path / "monitored" / "checkpoint-8")
    assert all(torch.equal(plain[name], watched[name]) for name in plain)
    records = monitored(tmp_path / "monitored")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert (tmp_path / "monitored" / "best" / "checkpoint.json").is_file()  # --monitor_keep_best
    assert not any("monitor/topk_entropy" in r for r in read_metrics(tmp_path / "plain"))

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "monitored", resumed)
    shutil.rmtree(resumed / "checkpoint-8")
    assert main(args(files, resumed, **flags, **monitor, resume_from_checkpoint="checkpoint-4")) == 0
    again = monitored(resumed)
    assert [r["step"] for r in again] == [2, 4, 6, 8]
    for before, after in zip(records, again):
        assert {k: v for k, v in before.items() if k.startswith("monitor/")} == \
               {k: v for k, v in after.items() if k.startswith("monitor/")}
    assert records[2]["monitor/topk_entropy_ema"] != records[2]["monitor/topk_entropy"]  # the EMA carries over
    state = json.loads((resumed / "checkpoint-8" / "trainer_state.json").read_text())["monitor"]
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]


def test_extra_k_and_min_delta_flags_reach_the_monitor(files, tmp_path):
    """--monitor_extra_top_k: numbers (distinct, sorted), none or nothing (off), the default 5 20 50; YAML lists
    too; --monitor_min_delta: the rule's min_delta."""
    from prefuse.cli import _train_config, build_parser
    from prefuse.engine.train.config import TrainConfig

    def config(*flags):
        cfg = _train_config(build_parser().parse_args(args(files, tmp_path, max_steps=1, monitor_steps=2)
                                                      + list(flags)))
        return cfg.validate()

    assert config().monitor_extra_top_k == [5, 20, 50] and config().monitor_min_delta == 0.0
    assert config("--monitor_extra_top_k", "50", "5", "5").monitor_extra_top_k == [5, 50]
    assert config("--monitor_extra_top_k", "none").monitor_extra_top_k == []
    assert config("--monitor_extra_top_k").monitor_extra_top_k == []
    assert config("--monitor_extra_top_k", str(MAX_TOP_K)).monitor_extra_top_k == [MAX_TOP_K]
    for value, expected in (([20, 5], [5, 20]), (None, []), ("none", []), ([], []), (7, [7])):  # YAML's forms
        cfg = TrainConfig.from_dict({**config().to_dict(), "monitor_extra_top_k": value}).validate()
        assert cfg.monitor_extra_top_k == expected, value

    cfg = config("--monitor_extra_top_k", "20", "5", "--monitor_min_delta", "0.05")
    tokenizer = build_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    examples = tokenize_preferences(load_records(files["eval"]), tokenizer, max_length=96,
                                    max_prompt_length=48).examples
    monitor = build_monitor(cfg, Models(model, None, tokenizer), type("Data", (), {"examples": examples}),
                            tmp_path, pad_id=0)
    assert monitor.extra_top_k == (5, 20) and monitor.rule.min_delta == 0.05 and monitor.top_k == 10


def test_max_top_k_is_the_kernels():
    triton_ops = pytest.importorskip("prefuse.kernels.triton_ops")
    assert MAX_TOP_K == triton_ops.MAX_TOP_K


@pytest.mark.parametrize("flags, expected", [
    (dict(early_stopping="true"), "early_stopping: needs --monitor_steps N > 0"),
    (dict(monitor_keep_best="true"), "monitor_keep_best: needs --monitor_steps N > 0"),
    (dict(monitor_steps=-1), "monitor_steps: must be >= 0"),
    (dict(monitor_steps=2, monitor_ema=1.0), "monitor_ema: must be in [0, 1)"),
    (dict(monitor_steps=2, monitor_patience=0), "monitor_patience: must be at least 1"),
    (dict(monitor_steps=2, monitor_top_k=0), "monitor_top_k: must be at least 1"),
    (dict(monitor_steps=2, monitor_top_k=65), "monitor_top_k: must be at most 64"),
    (dict(monitor_steps=2, monitor_extra_top_k=0), "monitor_extra_top_k: each k must be in [1, 64]"),
    (dict(monitor_steps=2, monitor_extra_top_k=100), "monitor_extra_top_k: each k must be in [1, 64]"),
    (dict(monitor_steps=2, monitor_extra_top_k="five"),
     "monitor_extra_top_k: expected a list of whole numbers or none, got ['five']"),
    (dict(monitor_steps=2, monitor_extra_top_k=-5), "monitor_extra_top_k: expected whole numbers (or none)"),
    (dict(monitor_steps=2, monitor_min_delta=-0.1), "monitor_min_delta: must be >= 0"),
    (dict(monitor_steps=2, monitor_min_delta="nan"), "monitor_min_delta: must be >= 0"),
    (dict(monitor_steps=2, monitor_samples=0), "monitor_samples: must be at least 1"),
    (dict(monitor_steps=2, monitor_indicator="margin"), "monitor_indicator: 'margin' is not entropy or mass"),
    (dict(monitor_steps=2, monitor_prompts="/nonexistent/prompts.jsonl"), "monitor_prompts: no such file"),
    (dict(monitor_steps=2, eval_split=None, eval_steps=None),
     "monitor_steps: needs held-out prompts: set --monitor_prompts FILE"),
])
def test_bad_monitor_flags_exit_with_one_line(files, tmp_path, capsys, flags, expected):
    argv = args(files, tmp_path, max_steps=1)
    for key, value in flags.items():
        if value is None:
            at = argv.index(f"--{key}")
            del argv[at:at + 2]
        else:
            argv += [f"--{key}", str(value)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("prefuse train: error:"), err
    assert expected in errors[0], errors[0]
