"""COFS-DPO: OFS-DPO domain after domain, the best fast adapter of each kept, combined exactly, and the forgetting
report (docs/methods/ofs-dpo.md).

    prefuse train --loss_type ofs_dpo --use_peft --eval_fraction 0.2 --domains a.jsonl b.jsonl --output_dir out

    out/stage-{k}/               the run of domain k (its checkpoints; it starts from stage k-1's last adapters)
    out/stage-{k}/best_fast/     the adapter in the F role at the stage's best checkpoint (held-out accuracy on k)
    out/combined/                the adapter whose update is sum_k lambda_k B_k A_k of the best fast adapters
    out/forgetting.{json,md,png} each domain's held-out reward accuracy after each stage, and of the combination

"Best" is the highest held-out reward accuracy on the stage's own domain (the fraction of held-out pairs whose
implicit reward margin log pi/pi_ref(y_w) - log pi/pi_ref(y_l) is positive) among the stage's checkpoints (every
save_steps and the last), the later checkpoint on a tie. The combination is `prefuse merge-adapters`'
(engine/models/adapters.py): peft's "cat", exact, where "linear" is not. lambda_k: --domain_weights, default uniform.
Any LoRA objective runs domain by domain this way (plain DPO gives the sequential baseline); for objectives other
than ofs_dpo the fast adapter is the run's one adapter.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from prefuse.engine.checks import check_field
from prefuse.engine.train.config import TrainConfig


def check_domains(cfg: TrainConfig) -> list[float]:
    """The domains' settings; return the weights lambda_k."""
    domains = cfg.domains or []
    check_field(len(domains) >= 1, "domains", "give one or more preference files")
    for path in domains:
        check_field(Path(path).exists(), "domains", f"no such file or directory: {path}")
    check_field(cfg.use_peft, "use_peft", "COFS-DPO combines LoRA adapters: add --use_peft")
    check_field(cfg.eval_fraction > 0 and not cfg.eval_split, "eval_fraction",
                "COFS-DPO measures forgetting on each domain's held-out pairs: set eval_fraction > 0 (per domain)")
    check_field(not cfg.resume_from_checkpoint, "resume_from_checkpoint",
                "resume one stage with its own output_dir (out/stage-k); --domains starts from the first")
    check_field(not cfg.online, "online", "COFS-DPO trains on offline domains")
    weights = cfg.domain_weights or [1.0 / len(domains)] * len(domains)
    check_field(len(weights) == len(domains), "domain_weights",
                f"{len(weights)} weight(s) for {len(domains)} domain(s)")
    return [float(w) for w in weights]


def train_domains(cfg: TrainConfig) -> dict:
    """Run COFS-DPO as the module docstring says; return the forgetting report (as written to forgetting.json)."""
    from prefuse.engine.checkpoint import list_checkpoints
    from prefuse.engine.models.adapters import merge_adapters
    from prefuse.engine.train.loop import train

    weights = check_domains(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage_cfgs, best, previous = [], [], cfg.init_adapters
    for k, domain in enumerate(cfg.domains):
        stage = dataclasses.replace(cfg, dataset_name=str(domain), output_dir=str(out / f"stage-{k}"), domains=None,
                                    domain_weights=None, init_adapters=previous, objective_args=dict(
                                        cfg.objective_args))
        print(f"COFS-DPO stage {k}: {domain}", flush=True)
        train(stage)
        checkpoints = list_checkpoints(stage.output_dir)
        scores = HeldOut(stage).accuracies([fast_adapter(c) for c in checkpoints], [stage])[:, 0]
        pick = max(range(len(checkpoints)), key=lambda i: (float(scores[i]), i))
        best.append(copy_adapter(fast_adapter(checkpoints[pick]), out / f"stage-{k}" / "best_fast"))
        print(f"COFS-DPO stage {k}: best fast adapter {checkpoints[pick].name} (held-out accuracy "
              f"{float(scores[pick]):.3f})", flush=True)
        stage_cfgs.append(stage)
        previous = str(checkpoints[-1])
    combined = merge_adapters([str(b) for b in best], weights, str(out / "combined"), base=cfg.model_name_or_path)
    table = HeldOut(stage_cfgs[0]).accuracies([*best, combined], stage_cfgs)
    return write_report(out, [str(d) for d in cfg.domains], table, weights)


def fast_adapter(checkpoint: Path) -> Path:
    """The directory of the adapter in the F role in a checkpoint: "default" at its top, "slow" in slow/."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    role = (state.get("step_state") or {}).get("fast_role", "default")
    return checkpoint if role == "default" else checkpoint / role


def copy_adapter(source: Path, target: Path) -> Path:
    """The adapter's two files (peft's layout) into `target`, written beside it and renamed into place."""
    temp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(source / name, temp / name)
    shutil.rmtree(target, ignore_errors=True)
    temp.rename(target)
    return target


class HeldOut:
    """Held-out reward accuracy of LoRA adapters on the base model of `cfg`: one model, each adapter loaded in
    turn, the reference the base model (adapters disabled)."""

    def __init__(self, cfg: TrainConfig):
        from prefuse.engine.core.objectives import objective_needs
        from prefuse.engine.core.step import Step
        from prefuse.engine.models.loading import load_models
        from prefuse.preference import PreferenceLoss

        self.cfg = cfg
        self.needs = objective_needs(["sigmoid"])
        self.models = load_models(cfg.model_config(), device=_device(cfg), need_reference=True)
        self.step = Step(self.models, PreferenceLoss("sigmoid", beta=cfg.beta), self.needs, bf16=cfg.bf16)
        tokenizer = self.models.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def held_out(self, cfg: TrainConfig):
        from prefuse.engine.train.build import load_data

        return load_data(cfg, self.models.tokenizer, self.needs)[1]  # the same split as the stage's training run

    def accuracies(self, adapters: list[Path], domains: list[TrainConfig]) -> torch.Tensor:
        """[len(adapters), len(domains)]: each adapter's reward accuracy on each domain's held-out pairs."""
        from prefuse.engine.core.sources import batches

        policy = self.models.policy
        sets = [self.held_out(d) for d in domains]
        table = torch.zeros(len(adapters), len(domains), dtype=torch.float64)
        policy.eval()
        for i, adapter in enumerate(adapters):
            name = f"held_out_{i}"
            policy.load_adapter(str(adapter), adapter_name=name)
            policy.set_adapter(name)
            for j, data in enumerate(sets):
                right, count = 0.0, 0
                with torch.no_grad():
                    for batch in batches(data, self.needs, batch_size=self.cfg.per_device_eval_batch_size,
                                         pad_id=self.pad_id, max_length=self.cfg.max_length):
                        _, metrics = self.step(batch.to(policy.device))
                        right += float(metrics["rewards/accuracies"]) * batch.n_examples
                        count += batch.n_examples
                table[i, j] = right / count
            policy.set_adapter("default")
            policy.delete_adapter(name)
        return table


def _device(cfg: TrainConfig) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)


def write_report(out: Path, domains: list[str], table: torch.Tensor, weights: list[float]) -> dict:
    """forgetting.json, forgetting.md and forgetting.png: rows = after stage k, and the combination."""
    names = [Path(d).stem for d in domains]
    rows = [f"after stage {k} ({names[k]})" for k in range(len(domains))] + ["combined " + " + ".join(
        f"{w:g}*{n}" for w, n in zip(weights, names))]
    report = {"domains": domains, "weights": weights, "rows": rows,
              "held_out_accuracy": [[float(v) for v in row] for row in table]}
    (out / "forgetting.json").write_text(json.dumps(report, indent=1))
    lines = ["| adapter | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
              for row, values in zip(rows, report["held_out_accuracy"])]
    (out / "forgetting.md").write_text("Held-out reward accuracy of each domain (columns)\n\n" + "\n".join(lines)
                                       + "\n")
    print("\n".join(lines), flush=True)
    _plot(out / "forgetting.png", names, rows, table)
    return report


def _plot(path: Path, names: list[str], rows: list[str], table: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 1.0 + 0.5 * len(rows)))
    image = ax.imshow(table.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(names)):
            ax.text(j, i, f"{float(table[i, j]):.2f}", ha="center", va="center", color="w")
    fig.colorbar(image, ax=ax, label="held-out reward accuracy")
    ax.set_title("COFS-DPO: forgetting across domains")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
