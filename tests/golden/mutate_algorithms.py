"""Systematic mutation run over every module of prefuse/algorithms/: generate mutants from the AST, run a fast test
subset against each, report killed / survived / equivalent.

    .venv/bin/python tests/golden/mutate_algorithms.py                      # every mutant of every module
    .venv/bin/python tests/golden/mutate_algorithms.py --files online.py kto.py
    .venv/bin/python tests/golden/mutate_algorithms.py --sample 100 --seed 3
    .venv/bin/python tests/golden/mutate_algorithms.py --list               # the mutants, without running them
    .venv/bin/python tests/golden/mutate_algorithms.py -k detach --jobs 2 --json /tmp/mutants.json

Mutation operators (each mutant changes one place):
    binop      + <-> -, * <-> /, ** -> *, | <-> &
    compare    < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in (each operator of a chain)
    boolop     and <-> or
    not        `not x` -> `x`;  `if c:` / `a if c else b` with the condition negated
    neg        unary minus dropped (`-x` -> `x`); added to the argument of logsigmoid, sigmoid, exp, log, ...
               (`F.logsigmoid(z)` -> `F.logsigmoid(-z)`), to an assigned arithmetic value and to a returned value
    const      numbers: an int c -> c + 1; a float c -> c + 1 and c / 2 (0.5 -> 0.25); True <-> False
    choice     a string default of a hyper-parameter (a function default or a value in an options dict) that is one
               of a tuple of accepted values -> the next accepted value ("reinforce_rloo" -> "reinforce_nobaseline")
    detach     `x.detach()` -> `x` and -> `x.clone()`
    reduce     `.mean(...)` <-> `.sum(...)`; torch.min <-> torch.max (and minimum/maximum); clamp(min=) <-> clamp(max=)
    dictswap   the values of two adjacent keys of a dict literal with string keys swapped (metric names, defaults)
    argswap    two adjacent positional arguments of a call swapped (`torch.where(m, a, b)` -> `torch.where(m, b, a)`)
Never mutated: strings, docstrings, f-strings, `raise` statements (error messages), annotations, imports,
`__all__`. A mutant whose AST equals the original's is dropped; the ones listed in EQUIVALENT below (each with the
reason it cannot change behaviour) are not run and are reported as "equivalent".

A mutant is named by a key that does not hold a line number (other edits move lines):
    <module>::<function>::<kind>: <original> -> <mutated>[ #n for the n-th identical one in that function]

The source tree is never touched: prefuse/, tests/ and pyproject.toml are copied to a temporary folder (one per job),
the copy's module is mutated, and pytest runs there in a child forked from this process with that folder first on
sys.path; the child checks that the mutated module it imported is the copy's (a mismatch stops the run). The
unmutated copy must pass first. Each mutant runs the test subset with -x under a timeout (a mutant that times out
counts as killed: it made the tests hang). Exit code 0 when killed / (total - equivalent) >= --min-kill-rate.
tests/test_algorithm_mutations.py runs it when PREFUSE_MUTATIONS=1 is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors; and no thread pool may exist when we fork

import argparse  # noqa: E402
import ast  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402,F401  (imported once here, so each forked test run starts with it loaded)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "prefuse/algorithms"

# The fast subset: the objective tests that run in seconds, the most targeted first (-x stops at the first failure).
TESTS = [
    "tests/test_algorithms_mutants.py",
    "tests/test_algorithms_reference.py",
    "tests/test_algorithms_seed_golden.py",
    "tests/test_algorithms_hypo_kl.py",
    "tests/test_algorithms_policy_gradient.py",
    "tests/test_algorithms_trl_golden.py",
    "tests/test_algorithms_trl_pg_golden.py",
    "tests/test_algorithms_api.py",
]

# key -> why the mutant cannot change what any caller observes. Not run; reported as "equivalent".
_REDUNDANT_DETACH = "a second detach: every value reaching it is detached already"
_SAME_MARGIN = ("the same DPO margin regrouped: (pc - rc) - (pr - rr) = (pc - pr) - (rc - rr); only the float "
                "rounding (1 ulp) differs")
_LOG1MEXP = ("both branches compute log(1 - e^x) exactly in real arithmetic; the switch only picks the accurate one, "
             "and between -log 2 and -log 2 / 2 both are accurate to about 1e-16 (1 - e^x >= 0.29, no cancellation)")
_DPO = "_dpo(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)"
_DPO_SWAPPED = "_dpo(beta, policy_chosen_logps, ref_chosen_logps, policy_rejected_logps, ref_rejected_logps)"
EQUIVALENT: dict[str, str] = {
    "alol::_metrics::detach: weights.detach() -> weights": (
        "every caller's weights are built from detached values (clipped_ratio, advantages/rewards .detach())"),
    "alol::_metrics::detach: weights.detach() -> weights.clone()": (
        "every caller's weights are built from detached values (clipped_ratio, advantages/rewards .detach())"),
    "loss::objective_loss::detach: losses.detach() -> losses": (
        "the loss/<name> metric goes through reduce_metrics, which detaches every metric"),
    "loss::objective_loss::detach: losses.detach() -> losses.clone()": (
        "the loss/<name> metric goes through reduce_metrics, which detaches every metric"),
    f"mixed::mixed_dpo::argswap: {_DPO} -> {_DPO_SWAPPED}": _SAME_MARGIN,
    "mixed::mixed_dpo::argswap: _dpo( beta, policy_online_chosen_logps, policy_online_rejected_logps, "
    "ref_online_chosen_logps, ref_online_rejected_logps, ) -> _dpo(beta, policy_online_chosen_logps, "
    "ref_online_chosen_logps, policy_online_rejected_logps, ref_online_rejected_logps)": _SAME_MARGIN,
    f"mixed::avg_dpo::argswap: {_DPO} -> {_DPO_SWAPPED}": _SAME_MARGIN,
    "mixed::avg_dpo::argswap: _dpo( beta, policy_chosen_logps, policy_online_rejected_logps, ref_chosen_logps, "
    "ref_online_rejected_logps ) -> _dpo(beta, policy_chosen_logps, ref_chosen_logps, policy_online_rejected_logps, "
    "ref_online_rejected_logps)": _SAME_MARGIN,
    "pair_scores::f_divergence_scores::compare: abs(alpha_coef - 1.0) < 1e-6 -> abs(alpha_coef - 1.0) <= 1e-06": (
        "near 1, alpha_coef - 1.0 is exact and a multiple of 2^-53, so it never equals the double 1e-6"),
    "policy_gradient::_clipped_surrogate::argswap: torch.min(ratio * advantages, clipped * advantages) -> "
    "torch.min(clipped * advantages, ratio * advantages)": (
        "torch.min of two tensors is symmetric, its gradient at ties too (half to each)"),
    "policy_gradient::_clip_metrics::detach: ((flags & mask).sum() / count).float().detach() -> "
    "((flags & mask).sum() / count).float()": "counts of boolean flags carry no gradient",
    "policy_gradient::_clip_metrics::detach: ((flags & mask).sum() / count).float().detach() -> "
    "((flags & mask).sum() / count).float().clone()": "counts of boolean flags carry no gradient",
    "policy_gradient::_reward_metrics::detach: rewards.detach() -> rewards": (
        _REDUNDANT_DETACH + " (grpo and rloo pass detached rewards)"),
    "policy_gradient::_reward_metrics::detach: rewards.detach() -> rewards.clone()": (
        _REDUNDANT_DETACH + " (grpo and rloo pass detached rewards)"),
    "policy_gradient::grpo::detach: rewards.detach() -> rewards": (
        "these rewards only reach _reward_metrics (which detaches) and isclose(std, 0) (a boolean)"),
    "policy_gradient::grpo::detach: rewards.detach() -> rewards.clone()": (
        "these rewards only reach _reward_metrics (which detaches) and isclose(std, 0) (a boolean)"),
    "policy_gradient::rloo::detach: rewards.detach() -> rewards": (
        "the judged rewards only reach leave_one_out_advantages and _reward_metrics, which both detach, and the "
        "KL penalty subtracted from them is detached"),
    "policy_gradient::rloo::detach: rewards.detach() -> rewards.clone()": (
        "the judged rewards only reach leave_one_out_advantages and _reward_metrics, which both detach, and the "
        "KL penalty subtracted from them is detached"),
    "reference_free::log1mexp::compare: x < -0.6931471805599453 -> x <= -0.6931471805599453": _LOG1MEXP,
    "reference_free::log1mexp::const: -0.6931471805599453 -> -0.34657359027997264": _LOG1MEXP,
}


# --------------------------------------------------------------------------------------------------- the generator
@dataclass(frozen=True)
class Mutant:
    file: str  # prefuse/algorithms/<module>.py
    line: int
    function: str
    kind: str
    original: str  # the replaced source, whitespace collapsed
    mutated: str
    start: int  # byte offsets of the replaced source in the file
    end: int
    replacement: str
    key: str = ""
    lines: tuple[int, ...] = ()  # the lines a test must execute to reach the mutant (its statement's)
    import_time: bool = False  # evaluated when the module is imported (module level, defaults, decorators)

    def describe(self) -> str:
        where = f"{self.file}:{self.line} ({self.function})"
        return f"{where} {self.kind}: {_short(self.original)} -> {_short(self.mutated)}"


def _short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _collapse(text: str) -> str:
    return " ".join(text.split())


BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
               ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr}
COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
# functions whose (single) argument's sign is the classic slip: logsigmoid(z) vs logsigmoid(-z)
SIGN_SENSITIVE = {"logsigmoid", "sigmoid", "exp", "safe_exp", "log", "log1p", "expm1", "relu", "softplus", "log1mexp"}
# validation helpers: their arguments are names and accepted values, swapping two is a type error
NO_ARGSWAP = {"check_choice", "require_inputs", "isinstance"}
REDUCE_SWAPS = {"mean": "sum", "sum": "mean", "min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum"}


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _number(node: ast.AST):
    """The value of a numeric literal (a negative one is UnaryOp(-, Constant)), else None. Booleans are not numbers."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        return -node.operand.value
    return None


def _literal(value) -> ast.expr:
    return ast.UnaryOp(ast.USub(), ast.Constant(-value)) if value < 0 else ast.Constant(value)


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _choice_tuples(tree: ast.Module) -> list[tuple[str, ...]]:
    """Tuples of two or more string literals anywhere in the module (the accepted values of an option)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            found.append(tuple(e.value for e in node.elts))
    return found


class _Generator(ast.NodeVisitor):
    """Collects (node, mutated node, kind) for one module; the caller turns them into text replacements."""

    def __init__(self, tree: ast.Module):
        self.found: list[tuple] = []  # (node, replacement node, kind, function, lines, import_time)
        self.stack: list[str] = []
        self.statements: list[ast.stmt] = []
        self.body_depth = 0  # > 0 inside a function body: runs when the function is called, not at import
        self.choices = _choice_tuples(tree)
        self.choice_values: set[int] = set()  # ids of string constants that are hyper-parameter defaults
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for default in [*node.args.defaults, *node.args.kw_defaults]:
                    if default is not None:
                        self.choice_values.add(id(default))
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        self.choice_values.add(id(value))

    # -- scope and skips
    @property
    def function(self) -> str:
        return ".".join(self.stack) or "<module>"

    def visit(self, node):
        if isinstance(node, ast.stmt):
            self.statements.append(node)
            try:
                return super().visit(node)
            finally:
                self.statements.pop()
        return super().visit(node)

    def add(self, node, new, kind):
        statement = self.statements[-1] if self.statements else node
        lines = set(range(node.lineno, node.end_lineno + 1)) | {statement.lineno}
        if not hasattr(statement, "body"):  # a simple statement: all of it (a multi-line call reports any line)
            lines |= set(range(statement.lineno, statement.end_lineno + 1))
        self.found.append((node, new, kind, self.function, tuple(sorted(lines)), self.body_depth == 0))

    def visit_FunctionDef(self, node):
        self.stack.append(node.name)
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)
        body = node.body[1:] if node.body and _is_docstring(node.body[0]) else node.body
        self.body_depth += 1
        for statement in body:
            self.visit(statement)
        self.body_depth -= 1
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.stack.append(node.name)
        for decorator in node.decorator_list:
            self.visit(decorator)
        body = node.body[1:] if node.body and _is_docstring(node.body[0]) else node.body
        for statement in body:
            if isinstance(statement, ast.AnnAssign):  # a dataclass field: only its default value
                if statement.value is not None:
                    self.visit(statement.value)
            else:
                self.visit(statement)
        self.stack.pop()

    def visit_Module(self, node):
        body = node.body[1:] if node.body and _is_docstring(node.body[0]) else node.body
        for statement in body:
            self.visit(statement)

    def visit_arguments(self, node):  # defaults only; annotations are not behaviour
        for default in [*node.defaults, *node.kw_defaults]:
            if default is not None:
                self.visit(default)

    def visit_Raise(self, node):  # error messages are not behaviour
        pass

    def visit_Import(self, node):
        pass

    visit_ImportFrom = visit_Import

    def visit_JoinedStr(self, node):  # f-strings
        pass

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        if isinstance(node.value, (ast.BinOp, ast.UnaryOp)) or (
                isinstance(node.value, ast.Call) and _call_name(node.value) in SIGN_SENSITIVE):
            self.add(node.value, ast.UnaryOp(ast.USub(), copy.deepcopy(node.value)), "neg")
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_Return(self, node):
        value = node.value
        if isinstance(value, ast.Tuple) and value.elts:  # an objective's (losses, metrics)
            first = value.elts[0]
            if isinstance(first, (ast.Name, ast.BinOp, ast.Call, ast.Subscript, ast.Attribute)):
                self.add(first, ast.UnaryOp(ast.USub(), copy.deepcopy(first)), "neg")
        elif isinstance(value, (ast.BinOp, ast.UnaryOp)) or (
                isinstance(value, ast.Call) and _call_name(value) in SIGN_SENSITIVE):  # a numeric helper's result
            self.add(value, ast.UnaryOp(ast.USub(), copy.deepcopy(value)), "neg")
        self.generic_visit(node)

    def visit_Expr(self, node):
        if not _is_docstring(node):
            self.generic_visit(node)

    # -- operators
    def visit_BinOp(self, node):
        swap = BINOP_SWAPS.get(type(node.op))
        if swap is not None:
            new = copy.deepcopy(node)
            new.op = swap()
            self.add(node, new, "binop")
        self.generic_visit(node)

    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            swap = COMPARE_SWAPS.get(type(op))
            if swap is not None:
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                self.add(node, new, "compare")
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self.add(node, new, "boolop")
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if _number(node) is not None:  # a negative literal is a constant
            self.visit_Constant(node)
            return
        if isinstance(node.op, ast.USub):
            self.add(node, copy.deepcopy(node.operand), "neg")
        elif isinstance(node.op, ast.Not):
            self.add(node, copy.deepcopy(node.operand), "not")
        self.generic_visit(node)

    def visit_If(self, node):
        self.add(node.test, ast.UnaryOp(ast.Not(), copy.deepcopy(node.test)), "not")
        self.generic_visit(node)

    def visit_IfExp(self, node):
        self.add(node.test, ast.UnaryOp(ast.Not(), copy.deepcopy(node.test)), "not")
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = _number(node)
        if value is not None:
            if isinstance(value, int):
                self.add(node, _literal(value + 1), "const")
            else:
                self.add(node, _literal(value + 1.0), "const")
                if value != 0:
                    self.add(node, _literal(value / 2), "const")
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            self.add(node, ast.Constant(not node.value), "const")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) in self.choice_values:
            for choices in self.choices:
                if node.value in choices:
                    following = choices[(choices.index(node.value) + 1) % len(choices)]
                    self.add(node, ast.Constant(following), "choice")
                    break

    def visit_Dict(self, node):
        keys = node.keys
        if len(keys) >= 2 and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in keys):
            for i in range(len(keys) - 1):
                if ast.dump(node.values[i]) != ast.dump(node.values[i + 1]):
                    new = copy.deepcopy(node)
                    new.values[i], new.values[i + 1] = new.values[i + 1], new.values[i]
                    self.add(node, new, "dictswap")
        self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        name = _call_name(node)
        if isinstance(func, ast.Attribute) and name == "detach" and not node.args and not node.keywords:
            self.add(node, copy.deepcopy(func.value), "detach")
            clone = copy.deepcopy(node)
            clone.func.attr = "clone"
            self.add(node, clone, "detach")
        if isinstance(func, ast.Attribute) and name in REDUCE_SWAPS:
            new = copy.deepcopy(node)
            new.func.attr = REDUCE_SWAPS[name]
            self.add(node, new, "reduce")
        if name in ("clamp", "clamp_"):
            for i, keyword in enumerate(node.keywords):
                if keyword.arg in ("min", "max"):
                    new = copy.deepcopy(node)
                    new.keywords[i].arg = "max" if keyword.arg == "min" else "min"
                    if len({k.arg for k in new.keywords}) == len(new.keywords):
                        self.add(node, new, "reduce")
        if name in SIGN_SENSITIVE and len(node.args) == 1 and not node.keywords:
            new = copy.deepcopy(node)
            new.args[0] = ast.UnaryOp(ast.USub(), new.args[0])
            self.add(node, new, "neg")
        positional = node.args
        # a string argument is a name or a message (swapping it with a value is a type error, not a slip)
        if name not in NO_ARGSWAP and not any(isinstance(a, ast.Starred) or (isinstance(a, ast.Constant) and
                                                                         isinstance(a.value, str)) for a in positional):
            for i in range(len(positional) - 1):
                if ast.dump(positional[i]) != ast.dump(positional[i + 1]):
                    new = copy.deepcopy(node)
                    new.args[i], new.args[i + 1] = new.args[i + 1], new.args[i]
                    self.add(node, new, "argswap")
        self.generic_visit(node)


def _byte_offsets(source: bytes) -> list[int]:
    starts, position = [0], 0
    for line in source.splitlines(keepends=True):
        position += len(line)
        starts.append(position)
    return starts


def generate(file: str, root: Path = ROOT) -> list[Mutant]:
    """Every mutant of one module (path relative to root), in source order, with unique keys."""
    source = (root / file).read_bytes()
    tree = ast.parse(source)
    original_dump = ast.dump(tree)
    starts = _byte_offsets(source)
    visitor = _Generator(tree)
    visitor.visit(tree)
    module = Path(file).stem
    mutants, seen = [], {}
    for node, new, kind, function, lines, import_time in visitor.found:
        start = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        original = source[start:end].decode()
        replacement = f"({ast.unparse(new)})"
        if isinstance(node, ast.expr) and isinstance(node, ast.Constant) and not isinstance(new, ast.UnaryOp):
            replacement = ast.unparse(new)  # a literal for a literal: keeps `f(x=1)` readable
        mutated_source = source[:start] + replacement.encode() + source[end:]
        try:
            mutated_tree = ast.parse(mutated_source)
        except SyntaxError:
            continue
        if ast.dump(mutated_tree) == original_dump:
            continue
        base = f"{module}::{function}::{kind}: {_collapse(original)} -> {_collapse(ast.unparse(new))}"
        seen[base] = seen.get(base, 0) + 1
        key = base if seen[base] == 1 else f"{base} #{seen[base]}"
        mutants.append(Mutant(file, node.lineno, function, kind, _collapse(original), _collapse(ast.unparse(new)),
                              start, end, replacement, key, lines, import_time))
    return mutants


def module_files(names: list[str] | None, root: Path = ROOT) -> list[str]:
    every = sorted(str(p.relative_to(root)) for p in (root / PACKAGE).glob("*.py"))
    if not names:
        return every
    chosen = []
    for name in names:
        stem = Path(name).stem
        match = [f for f in every if Path(f).stem == stem]
        if not match:
            raise SystemExit(f"no module {name!r} in {PACKAGE}/ (have: {', '.join(Path(f).stem for f in every)})")
        chosen += match
    return chosen


# ------------------------------------------------------------------------------------------------------ the runner
PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", "--no-header", "-o", "addopts="]


def make_copy(folder: Path, source: Path = ROOT) -> None:
    """prefuse/, tests/ and pyproject.toml of `source` into `folder`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(source / "prefuse", folder / "prefuse", ignore=ignore)
    shutil.copytree(source / "tests", folder / "tests", ignore=ignore)
    shutil.copy2(source / "pyproject.toml", folder / "pyproject.toml")


IMPORT = "<import>"  # the coverage map's key for the lines run at import (collection), not by a test


class _LineCoverage:
    """pytest plugin: the lines of prefuse/algorithms/ each test executes (setup, call and teardown)."""

    def __init__(self, folder: Path):
        self.folder = str(folder) + os.sep
        self.prefix = str(folder / PACKAGE) + os.sep
        self.by_test: dict[str, list] = {}
        self.current: set = set()

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(self.prefix):
            self.current.add((frame.f_code.co_filename, frame.f_lineno))
            return self._local
        return None

    def _local(self, frame, event, arg):
        if event == "line":
            self.current.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _record(self, key):
        self.current = set()
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(None)
            self.by_test[key] = sorted([f[len(self.folder):], line] for f, line in self.current)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):
        # what runs while the test modules are imported (the registry's decorators call helpers such as
        # dpo._family): a mutant there is seen by every test, not only by those that run its line again
        yield from self._record(IMPORT)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        yield from self._record(item.nodeid)


class _Select:
    """pytest plugin: keep only the given tests (in their collected order)."""

    def __init__(self, nodeids: set[str]):
        self.keep = nodeids

    def pytest_collection_modifyitems(self, session, config, items):
        deselected = [item for item in items if item.nodeid not in self.keep]
        items[:] = [item for item in items if item.nodeid in self.keep]
        config.hook.pytest_deselected(items=deselected)


def _child(folder: Path, tests: list[str], module: str | None, select: set[str] | None, coverage: bool) -> None:
    """In the forked child: import prefuse from the copy only, run the tests, report through the exit code."""
    code = 99
    try:
        out = os.open(folder / "pytest.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.chdir(folder)
        sys.path.insert(0, str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] in ("prefuse", "tests")]:
            del sys.modules[name]
        plugins: list = []
        if select is not None:
            plugins.append(_Select(select))
            tests = [t for t in tests if any(n.split("::")[0] == t for n in select)]
        if coverage:
            plugins.append(_LineCoverage(folder))
        code = int(pytest.main([*PYTEST_ARGS, *tests], plugins=plugins))
        if coverage:
            (folder / "coverage.json").write_text(json.dumps(plugins[-1].by_test))
        for name in ("prefuse", module):
            if name is not None and name in sys.modules:
                imported = sys.modules[name].__file__ or ""
                if not imported.startswith(str(folder)):
                    print(f"imported the wrong {name}: {imported}")
                    code = 98
    except BaseException as error:  # noqa: BLE001  (anything: report it, never return into the parent's code)
        print(f"the child failed: {error!r}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Slot:
    """One copy of the tree and at most one child running in it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pid: int | None = None
        self.mutant: Mutant | None = None
        self.original: bytes | None = None
        self.select: set[str] | None = None
        self.started = 0.0

    def start(self, mutant: Mutant | None, tests: list[str], select: set[str] | None = None,
              coverage: bool = False) -> None:
        module = None
        if mutant is not None:
            path = self.folder / mutant.file
            self.original = path.read_bytes()
            path.write_bytes(self.original[: mutant.start] + mutant.replacement.encode() + self.original[mutant.end:])
            module = mutant.file[:-3].replace("/", ".")
        self.mutant = mutant
        self.started = time.time()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(self.folder, tests, module, select, coverage)
        self.pid = pid

    def poll(self, timeout: float) -> tuple[int | None, str, float] | None:
        """(exit code, or None after a timeout; the log's last line; seconds) once the child is done, else None."""
        assert self.pid is not None
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        elapsed = time.time() - self.started
        if pid == 0:
            if elapsed < timeout:
                return None
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            code = None
        else:
            code = os.waitstatus_to_exitcode(status)
        self.pid = None
        if self.mutant is not None:
            (self.folder / self.mutant.file).write_bytes(self.original)
        log = (self.folder / "pytest.log").read_text(errors="replace").strip().splitlines()
        if code in (98, 99):
            raise SystemExit(f"the test run in {self.folder} failed to run: {log[-8:]}")
        return code, (log[-1] if log else ""), elapsed


def baseline(folder: Path, tests: list[str]) -> tuple[float, dict[str, list]]:
    """The unmutated copy must pass; returns the seconds it took and each test's covered (file, line) pairs."""
    slot = Slot(folder)
    slot.start(None, tests, coverage=True)
    while (done := slot.poll(3600)) is None:
        time.sleep(0.05)
    code, summary, elapsed = done
    if code != 0:
        raise SystemExit(f"the unmutated tests fail: {summary}")
    return elapsed, json.loads((folder / "coverage.json").read_text())


def covering_tests(mutant: Mutant, coverage: dict[str, list]) -> set[str] | None:
    """The tests that execute the mutant's statement; None (every test) for code that runs at import (module level,
    defaults, decorators, and function bodies that module-level code calls)."""
    wanted = {(mutant.file, line) for line in mutant.lines}
    if mutant.import_time or any((f, line) in wanted for f, line in coverage.get(IMPORT, ())):
        return None
    return {test for test, lines in coverage.items() if test != IMPORT and any((f, line) in wanted
                                                                                for f, line in lines)}


def run(snapshot: Path, mutants: list[Mutant], tests: list[str], jobs: int, timeout: float | None, verbose: bool,
        select_by_coverage: bool = True, recheck: bool = True) -> dict:
    """key -> {"verdict": killed|survived|timeout, "seconds": float, "summary": str, "tests": int or "all"}.

    With select_by_coverage, a mutant runs only the tests that execute its statement (every test for code run at
    import; none, and "survived", for a statement no test executes); with recheck, every survivor is then run
    against the whole subset, whose verdict is final.
    """
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="prefuse_mutate_") as tmp:
        slots = []
        for j in range(jobs):
            folder = Path(tmp) / f"job{j}"
            folder.mkdir()
            make_copy(folder, snapshot)
            slots.append(Slot(folder))
        seconds, coverage = baseline(slots[0].folder, tests)
        limit = timeout if timeout is not None else max(60.0, 5 * seconds)
        print(f"baseline: the unmutated tests pass in {seconds:.1f}s (traced); {len(mutants)} mutants, timeout "
              f"{limit:.0f}s, {jobs} job(s)", flush=True)

        def one_pass(todo: list[tuple[Mutant, set[str] | None]], label: str) -> None:
            queue = list(todo)
            done_count, begin = 0, time.time()
            while queue or any(s.pid is not None for s in slots):
                for slot in slots:
                    if slot.pid is None and queue:
                        mutant, select = queue.pop(0)
                        slot.select = select
                        slot.start(mutant, tests, select)
                progressed = False
                for slot in slots:
                    if slot.pid is None:
                        continue
                    mutant = slot.mutant
                    done = slot.poll(limit)
                    if done is None:
                        continue
                    progressed = True
                    code, summary, elapsed = done
                    verdict = "timeout" if code is None else ("survived" if code == 0 else "killed")
                    results[mutant.key] = {"verdict": verdict, "seconds": round(elapsed, 2), "summary": summary,
                                           "tests": "all" if slot.select is None else len(slot.select)}
                    done_count += 1
                    if verbose or verdict == "survived":
                        print(f"[{label} {done_count}/{len(todo)} {time.time() - begin:5.0f}s] {verdict:8} "
                              f"{elapsed:5.1f}s  {mutant.describe()}", flush=True)
                if not progressed:
                    time.sleep(0.02)

        todo = []
        for mutant in mutants:
            select = covering_tests(mutant, coverage) if select_by_coverage else None
            if select is not None and not select:
                results[mutant.key] = {"verdict": "survived", "seconds": 0.0, "tests": 0,
                                       "summary": "no test executes this statement"}
                if verbose:
                    print(f"[no test executes it] survived  {mutant.describe()}", flush=True)
            else:
                todo.append((mutant, select))
        one_pass(todo, "run")
        if recheck:
            again = [(m, None) for m in mutants if results[m.key]["verdict"] == "survived"
                     and results[m.key]["tests"] != "all"]
            if again:
                print(f"rechecking {len(again)} survivors against every test of the subset", flush=True)
                one_pass(again, "recheck")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", nargs="+", help="modules of prefuse/algorithms/ (online.py, online, or a path)")
    parser.add_argument("--sample", type=int, help="run a random sample of this many (non-equivalent) mutants")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("-k", default="", help="only the mutants whose key contains this")
    parser.add_argument("--kind", nargs="+", help="only these operator kinds (binop, const, detach, ...)")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="the test files to run against each mutant")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (one tree copy each)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: max(60, 5 x the baseline))")
    parser.add_argument("--all-tests", action="store_true",
                        help="run every test of the subset against each mutant, not only those that execute it")
    parser.add_argument("--no-recheck", action="store_true",
                        help="do not rerun the survivors against every test (they ran the covering tests only)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", help="write every mutant's verdict to this file")
    parser.add_argument("--min-kill-rate", type=float, default=0.90)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every verdict, not only survivors")
    args = parser.parse_args(argv)

    # One snapshot of the tree: the mutants are generated from it and every job copies it, so edits made to the
    # checkout while the run goes on change nothing.
    snapshot_dir = tempfile.TemporaryDirectory(prefix="prefuse_snapshot_")
    snapshot = Path(snapshot_dir.name)
    make_copy(snapshot)
    mutants = [m for f in module_files(args.files, snapshot) for m in generate(f, snapshot)]
    mutants = [m for m in mutants if args.k in m.key and (not args.kind or m.kind in args.kind)]
    equivalent = [m for m in mutants if m.key in EQUIVALENT]
    candidates = [m for m in mutants if m.key not in EQUIVALENT]
    if args.sample is not None and args.sample < len(candidates):
        chosen = set(random.Random(args.seed).sample(range(len(candidates)), args.sample))
        candidates = [m for i, m in enumerate(candidates) if i in chosen]
        equivalent = []  # a sample reports the rate over the sampled mutants only
    if args.list:
        for m in candidates:
            print(f"{m.describe()}\n    key: {m.key}")
        for m in equivalent:
            print(f"EQUIVALENT {m.describe()}: {EQUIVALENT[m.key]}")
        print(f"{len(candidates)} mutants to run, {len(equivalent)} equivalent")
        return 0
    whole = not (args.files or args.k or args.kind or args.sample)
    stale = sorted(set(EQUIVALENT) - {m.key for m in mutants}) if whole else []

    for test in args.tests:
        if not (snapshot / test).exists():
            raise SystemExit(f"no test file {test}")
    start = time.time()
    results = run(snapshot, candidates, list(args.tests), args.jobs, args.timeout, args.verbose,
                  select_by_coverage=not args.all_tests, recheck=not args.no_recheck)

    killed = [m for m in candidates if results[m.key]["verdict"] in ("killed", "timeout")]
    survived = [m for m in candidates if results[m.key]["verdict"] == "survived"]
    timeouts = sum(results[m.key]["verdict"] == "timeout" for m in candidates)
    rate = len(killed) / len(candidates) if candidates else 1.0
    print(f"\n{len(candidates) + len(equivalent)} mutants in {time.time() - start:.0f}s: {len(killed)} killed "
          f"({timeouts} by timeout), {len(survived)} survived, {len(equivalent)} equivalent (not run); "
          f"kill rate {rate:.3f} = killed / (total - equivalent)")
    by_file: dict[str, list[int]] = {}
    by_kind: dict[str, list[int]] = {}
    for m in candidates:
        for table, name in ((by_file, Path(m.file).stem), (by_kind, m.kind)):
            counts = table.setdefault(name, [0, 0])
            counts[0] += results[m.key]["verdict"] != "survived"
            counts[1] += 1
    print("killed by module: " + ", ".join(f"{k} {c[0]}/{c[1]}" for k, c in sorted(by_file.items())))
    print("killed by kind: " + ", ".join(f"{k} {c[0]}/{c[1]}" for k, c in sorted(by_kind.items())))
    if equivalent:
        print("equivalent (not run):")
        for m in equivalent:
            print(f"  {m.describe()}\n      {EQUIVALENT[m.key]}")
    if stale:
        print("EQUIVALENT entries that match no mutant (the code moved on; update the list):")
        for key in stale:
            print(f"  {key}")
    if survived:
        print("survivors:")
        for m in survived:
            print(f"  {m.describe()}\n      key: {m.key}")
    if args.json:
        payload = {"killed": len(killed), "survived": len(survived), "equivalent": len(equivalent),
                   "kill_rate": rate, "tests": args.tests,
                   "mutants": [{**asdict(m), **results[m.key]} for m in candidates],
                   "equivalent_mutants": [{**asdict(m), "reason": EQUIVALENT[m.key]} for m in equivalent]}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    print(f"RESULT kill_rate={rate:.4f} killed={len(killed)} survived={len(survived)} equivalent={len(equivalent)}")
    return 0 if rate >= args.min_kill_rate else 1


if __name__ == "__main__":
    sys.exit(main())
