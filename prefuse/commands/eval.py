"""`prefuse eval`: a model against a baseline on held-out prompts (win rate, its 95% interval, the
length-controlled win rate, answer lengths) and, on held-out pairs, the implicit-reward accuracy of a policy
against its reference. The work is engine/eval/ (run.py, stats.py); this module is the flags."""
from __future__ import annotations

NAME = "eval"
HELP = "win rate of a model against a baseline (Wilson interval, length-controlled); implicit-reward accuracy"
DESCRIPTION = ("Answers every prompt of --prompts with the model and the baseline (--baseline_model, or the answers "
               "in --baseline_column), judges each pair of answers with one judge (--reward_funcs, "
               "--reward_model_path or --judge), and reports the win rate with its 95% Wilson interval, AlpacaEval "
               "2's length-controlled win rate and the mean answer lengths; with --pairs, the implicit-reward "
               "accuracy against the reference. JSON to --output, a markdown table printed (and to --markdown). "
               "See docs/eval.md.")

BASELINE_MODEL_FLAGS = ("baseline_model", "reference_model")


def add_arguments(parser) -> None:
    from prefuse.commands.flags import add_config_file, config_flags
    from prefuse.commands.models import add_gguf_file
    from prefuse.engine.eval import EvalConfig

    add_config_file(parser)
    config_flags(parser, EvalConfig)
    add_gguf_file(parser)


def run(args) -> int:
    """`prefuse eval`: the flags -> EvalConfig -> evaluate(); GGUF files become their plain copies first."""
    from prefuse.commands.flags import config_values
    from prefuse.commands.models import plain_models, settings
    from prefuse.engine.eval import EvalConfig, evaluate
    from prefuse.engine.models.gguf import is_gguf, plain_directory

    names = {}  # the output names the models as given (a GGUF file, not its plain copy)
    if isinstance(getattr(args, "model_name_or_path", None), str):
        gguf_file = getattr(args, "gguf_file", None)
        names["model"] = f"{args.model_name_or_path}/{gguf_file}" if gguf_file else args.model_name_or_path
    if isinstance(getattr(args, "baseline_model", None), str):
        names["baseline_model"] = args.baseline_model
    plain_models(args)
    for name in BASELINE_MODEL_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and is_gguf(value):
            setattr(args, name, plain_directory(value, field=name))
    result = evaluate(EvalConfig(**config_values(EvalConfig, settings(args))), names)
    print(result["markdown"], end="")
    return 0
