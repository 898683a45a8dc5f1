"""RLHS, hindsight simulation (docs/methods/rlhs.md): preference labels from a toy consultancy environment, given
by an evaluator right after the dialogue (immediate feedback, foresight) or after seeing its outcome (hindsight).

    environment.py   scenarios (options with prices and hidden features, a customer's need and budget), the texts
                     every party reads, parsing of the consultant's responses, the true utility
    parties.py       the customer, the world model and the evaluator: interfaces and rule-based versions; what the
                     evaluator is shown under each feedback (immediate, partial, oracle)
    llm.py           local language models standing in for them (a causal LM customer and world model, any judge
                     of engine/judges as the evaluator)
    rollouts.py      the policy's responses (engine/online/rollout.py), played out: decision, outcome, ratings
    labels.py        two dialogues per scenario -> TRL pairs; which way a label set points, with intervals
    command.py       `prefuse rlhs`: pairs file + JSON report
    toy_policy.py    a tiny consultant LM warmed up on truthful and deceptive templated responses
The paper's direction end to end is a command above the engine: `python -m prefuse.commands.rlhs_direction`.
"""
from prefuse.engine.methods.rlhs.command import RLHSConfig, load_policy, rlhs_pairs, run_rlhs
from prefuse.engine.methods.rlhs.environment import Scenario, generate_scenarios, parse_response, policy_prompt, true_utility
from prefuse.engine.methods.rlhs.labels import dialogue_summary, label_pairs, label_summary, wilson_interval
from prefuse.engine.methods.rlhs.parties import (FEEDBACK, Customer, Evaluator, RuleCustomer, RuleEvaluator, RuleWorldModel,
                                         WorldModel, evaluator_view)
from prefuse.engine.methods.rlhs.rollouts import Dialogue, play, sample_responses

__all__ = ["RLHSConfig", "run_rlhs", "load_policy", "rlhs_pairs", "Scenario", "generate_scenarios",
           "parse_response", "policy_prompt", "true_utility", "dialogue_summary", "label_pairs", "label_summary",
           "wilson_interval", "FEEDBACK", "Customer", "WorldModel", "Evaluator", "RuleCustomer", "RuleWorldModel",
           "RuleEvaluator", "evaluator_view", "Dialogue", "play", "sample_responses"]
