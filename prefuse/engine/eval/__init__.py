"""`prefuse eval`'s engine: answers, judged wins against a baseline, the win-rate statistics (stats.py: the Wilson
interval, AlpacaEval 2's length-controlled win rate) and the implicit-reward accuracy on held-out pairs (run.py)."""
from prefuse.engine.eval.run import EvalConfig, evaluate, implicit_reward_accuracy, judge_wins, markdown_table
from prefuse.engine.eval.stats import length_controlled, logistic_fit, score_wins, wilson_interval, win_rate

__all__ = [
           "EvalConfig",
           "evaluate",
           "implicit_reward_accuracy",
           "judge_wins",
           "length_controlled",
           "logistic_fit",
           "markdown_table",
           "score_wins",
           "wilson_interval",
           "win_rate",
]
