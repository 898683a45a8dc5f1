"""prefuse demo --real's parts that need no model: the prompts and the reward it writes for prefuse train."""
import importlib.util

from prefuse.commands import demo_real


def test_held_out_prompts_ask_about_topics_training_never_sees():
    train, held = demo_real.prompts(seed=0, held_out=12)
    assert len(held) == 12 and len(train) == (len(demo_real.TOPICS) - 12) * len(demo_real.TEMPLATES)
    held_topics = {t for t in demo_real.TOPICS if any(t in q for q in held)}
    assert len(held_topics) == 12 and not any(t in q for q in train for t in held_topics)
    assert demo_real.prompts(seed=0, held_out=12) == (train, held) and demo_real.prompts(1, 12)[1] != held


def test_the_written_reward_scores_words_over_the_limit(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(demo_real.REWARD_TEXT.format(brief=5, missing_end=2.0))
    spec = importlib.util.spec_from_file_location("reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    replies = ["one two three", "one two three four five six seven", [{"role": "assistant", "content": "a b c d e f"}]]
    assert module.brevity(["q"] * 3, replies) == [0.0, -0.2, -0.1]  # 7 words: 2 over; 6: 1 over
    answers = [{"words": 3, "ended": True, "reward": 0.0}, {"words": 30, "ended": False, "reward": -2.5}]
    assert demo_real.summary(answers) == {"mean_words": 16.5, "brief_share": 0.5, "mean_reward": -1.25}
