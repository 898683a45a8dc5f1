"""The pieces `prefuse train-rm` plugs into `prefuse train`'s loop, without a model: the pairs' batch source
(resumable, as OfflineSource is), the Batch of a pair list, the step's held-out reduction and the report's lines."""
import torch

from prefuse.engine.reward.pairs import PairSource, RewardPairs, pair_batch, walk_pairs
from prefuse.engine.reward.train import RewardModelConfig, RewardReport, RewardStep, pair_loss, pair_metrics
from prefuse.engine.train.distributed import World


def pairs(n: int) -> RewardPairs:
    return RewardPairs(kind="bradley_terry", first=[[1, 2 + i] * (1 + i % 3) for i in range(n)],
                       second=[[3, 4 + i] for i in range(n)], where=[f"f:{i}" for i in range(n)])


def test_pair_batch_rows_are_the_firsts_then_the_seconds():
    data = pairs(5)
    batch = pair_batch(data, [4, 1], pad_id=0)
    assert batch.n_examples == 2
    assert batch.roles["first"].tolist() == [0, 1] and batch.roles["second"].tolist() == [2, 3]
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    assert rows == [data.first[4], data.first[1], data.second[4], data.second[1]]
    assert batch.n_tokens == sum(len(r) for r in rows) and batch.index.tolist() == [4, 1]
    assert (batch.labels == -100).all()  # a reward model reads whole sequences: no response labels


def test_pair_source_resumes_where_it_stopped_across_epochs():
    data = pairs(7)
    source = PairSource(data, batch_size=3, seed=5, pad_id=0)
    assert source.batches_per_epoch == 3
    served = [source.next_batch().index.tolist() for _ in range(4)]
    assert sorted(i for b in served[:3] for i in b) == list(range(7))  # one epoch: every pair once
    state, epoch = source.state_dict(), source.epoch
    after = [source.next_batch().index.tolist() for _ in range(3)]
    resumed = PairSource(data, batch_size=3, seed=5, pad_id=0)
    resumed.load_state_dict(state)
    assert resumed.epoch == epoch and [resumed.next_batch().index.tolist() for _ in range(3)] == after
    assert [b.index.tolist() for b in walk_pairs(data, batch_size=3, pad_id=0)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_held_out_metrics_are_means_over_pairs_and_min_max_over_all():
    step = RewardStep(model=None, cfg=RewardModelConfig())
    chunks = [(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])),
              (torch.tensor([-3.0]), torch.tensor([4.0]))]
    parts = [(len(first), pair_loss(step.cfg, first, second), pair_metrics(first, second)) for first, second in chunks]
    scores = step.held_out_metrics(parts, World())
    first, second = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    both = torch.cat([first, second])
    assert abs(scores["loss"] - float(pair_loss(step.cfg, first, second))) < 1e-6
    assert abs(scores["accuracy"] - 0.5) < 1e-7 and abs(scores["margin"] - float((first - second).mean())) < 1e-6
    assert scores["min_reward"] == float(both.min()) == -3.0 and scores["max_reward"] == float(both.max()) == 4.0
    assert abs(scores["mean_reward"] - float(both.mean())) < 1e-6


def test_report_lines_are_train_rms():
    report = RewardReport()
    record = {"loss": 0.69312, "accuracy": 0.5, "margin": 0.00123, "learning_rate": 1e-3}
    assert report.step_line(3, 10, record) == "step 3/10  loss 0.6931  accuracy 0.500  margin +0.0012  lr 1.00e-03"
    scores = {"eval_loss": 0.7, "eval_accuracy": 0.25, "eval_margin": -0.5}
    assert report.eval_line(3, 10, scores) == ("step 3/10  eval_loss 0.7000  eval_accuracy 0.250  "
                                               "eval_margin -0.5000")
