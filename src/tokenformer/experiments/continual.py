"""Continual learning by growth, measured: learning a second corpus without forgetting the first.

The base models of a pruning plan (:mod:`tokenformer.experiments.pruning`: a TokenFormer and its
parameter-matched Transformer trained on corpus A) learn corpus B for the same number of steps in
each of these ways (*arms*):

- ``tf_finetune``: the TokenFormer, every parameter trained;
- ``tf_grow_frozen``: the TokenFormer grown by zero-key tokens, only the new tokens trained
  (everything old frozen bit for bit: ``old_lr_scale: 0``);
- ``tf_grow_slow``: the same growth, everything trained, the old parameters at ``slow_scale`` of
  the learning rate;
- ``tf_grow_separate``: the same growth with the new tokens normalised apart from the old ones
  (``continual: grow_separate``), only the new tokens trained: the old tokens' share of every
  output stays exactly what it was, on A's inputs too;
- ``tf_sparse``: no growth; only the parameter tokens of each Pattention that B uses most and A
  least trained (``continual: sparse``), one run per budget of ``sparse_tokens`` (the arm
  ``tf_sparse_<N>`` trains ``N`` tokens per Pattention);
- ``tf_memory_finetune``: a TokenFormer with a sparse memory (``memory``: the fields a second
  base model adds to the TokenFormer's, trained on A with the same recipe), every parameter trained;
- ``tf_memory_sparse``: that model, only the value rows of the memory slots that B uses most and A
  least trained (``continual: sparse_memory``, sparse memory fine-tuning), one run per budget of
  ``memory_slots`` (``tf_memory_sparse_<N>`` trains ``N`` slots per memory table);
- ``tx_finetune``: the Transformer, every parameter trained;
- ``tx_lora``: the Transformer frozen, with LoRA adapters (``peft``) on every projection whose
  rank gives as many trainable parameters as ``tf_grow_frozen``'s new tokens.

Every run evaluates the validation sets of A and of B (the same windows for every run) before its
first step and every ``eval_interval`` steps. Forgetting is A's loss over the base model's;
learning is B's loss. As the arms trade one for the other differently, they are compared at
*equal loss on B*: each run's A loss where its B loss first reaches a target, each arm at the
learning rate of its grid that forgets least there, paired by seed. The targets are thirds of the
way down to the loss that every arm reaches (so the slowest arm sets them) and half-way down for
``tx_finetune``. The report opens with the goal (``GOAL``): at every target it reaches, the
``tf_*`` arm that forgets least there forgets at most half of what ``tx_lora`` forgets and at most
0.3 of what ``tx_finetune`` forgets (ratios per seed, mean over seeds), on three seeds.

Runs are cached in ``out_dir/runs/<arm>/lr-<lr>/seed-<s>`` (a run with a ``result.json`` is done).
Outputs: ``results.json``, ``report.md`` and ``forgetting.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import io
from ..config import TOKEN_KINDS
from ..train import TrainConfig, Trainer
from ..train.lm import evaluate_windows
from ..train.tasks import make_task
from ..validation import dataclass_from_dict, invalid, is_int
from . import runner
from .pruning import base_runs, load_base, train_base
from .pruning import load_plan as load_pruning_plan

ARMS = (
    "tf_finetune",
    "tf_grow_frozen",
    "tf_grow_slow",
    "tf_grow_separate",
    "tf_sparse",
    "tf_memory_finetune",
    "tf_memory_sparse",
    "tx_finetune",
    "tx_lora",
)
SPARSE = "tf_sparse"
MEMORY_SPARSE = "tf_memory_sparse"
# The arms that continue from the memory base model (plan.memory).
MEMORY_ARMS = ("tf_memory_finetune", MEMORY_SPARSE)
# The default arms: those that need no memory base.
DENSE_ARMS = [arm for arm in ARMS if arm not in MEMORY_ARMS]
PLOT = "forgetting.png"
LORA_TARGETS = ["query", "key", "value", "proj", "fc1", "fc2"]
FINETUNE = "tx_finetune"
# The published goal: at equal loss on B, the TokenFormer arm that forgets least forgets at most
# this share of what each Transformer baseline forgets, on GOAL_SEEDS seeds, at every target it reaches.
GOAL = {"tx_lora": 0.5, FINETUNE: 0.3}
GOAL_SEEDS = 3


@dataclass
class ContinualPlan:
    """The continual-learning experiment.

    Args:
        out_dir: Where the runs, results, report and plot go.
        base_plan: The pruning plan (YAML) whose base models learned corpus A.
        seeds: Base-model seeds to continue from (each also seeds B's batches).
        data: Corpus B.
        val_fraction: Share of B held out for validation.
        steps: Steps on B, the same for every arm.
        growth: Token growth of the ``tf_grow_*`` arms, as a multiple of each kind's count.
        slow_scale: ``tf_grow_slow``'s learning rate of the old parameters, as a multiple.
        sparse_tokens: The budgets of ``tf_sparse``: parameter tokens trained per Pattention, one
            arm ``tf_sparse_<N>`` each.
        usage_batches: Batches of A and of B over which ``tf_sparse`` and ``tf_memory_sparse``
            measure usage.
        memory: Model fields the memory base model changes on the base plan's TokenFormer (e.g.
            ``{memory_layers: [1], memory_sub_keys: 128, memory_top_k: 32}``), trained on A with
            the base plan's recipe and seeds into ``out_dir/base-memory/seed-<s>``; needed by the
            ``tf_memory_*`` arms.
        memory_slots: The budgets of ``tf_memory_sparse``: slots trained per memory table, one arm
            ``tf_memory_sparse_<N>`` each.
        lr_grid: Peak learning rates every arm trains at (warmup 10%, cosine to a tenth).
        arms: The arms run.
        eval_interval: Steps between evaluations of A and B.
        eval_batches: Validation batches of A and of B.
        workers: Runs trained at a time, each in its own process.
    """

    out_dir: str = "runs/continual-cpu"
    base_plan: str = "configs/experiments/pruning-cpu.yaml"
    seeds: list[int] = field(default_factory=lambda: [1337, 2])
    data: str = "news"
    val_fraction: float = 0.1
    steps: int = 300
    growth: float = 1.5
    slow_scale: float = 0.1
    sparse_tokens: list[int] = field(default_factory=lambda: [16, 64])
    usage_batches: int = 8
    memory: dict[str, Any] = field(default_factory=dict)
    memory_slots: list[int] = field(default_factory=lambda: [256])
    lr_grid: list[float] = field(default_factory=lambda: [0.001, 0.002, 0.004])
    arms: list[str] = field(default_factory=lambda: list(DENSE_ARMS))
    eval_interval: int = 25
    eval_batches: int = 8
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.arms or not set(self.arms) <= set(ARMS):
            raise invalid("plan field", "arms", self.arms, f"a non-empty list of {', '.join(ARMS)}")
        if not self.growth > 1:
            raise invalid("plan field", "growth", self.growth, "a multiple > 1")
        if not self.lr_grid or not all(lr > 0 for lr in self.lr_grid):
            raise invalid("plan field", "lr_grid", self.lr_grid, "a non-empty list of learning rates > 0")
        if not self.sparse_tokens or not all(is_int(n) and n >= 1 for n in self.sparse_tokens):
            raise invalid("plan field", "sparse_tokens", self.sparse_tokens, "a non-empty list of positive integers")
        if not (is_int(self.usage_batches) and self.usage_batches >= 1):
            raise invalid("plan field", "usage_batches", self.usage_batches, "a positive integer")
        if not self.memory_slots or not all(is_int(n) and n >= 1 for n in self.memory_slots):
            raise invalid("plan field", "memory_slots", self.memory_slots, "a non-empty list of positive integers")
        if not isinstance(self.memory, dict):
            raise invalid("plan field", "memory", self.memory, "a mapping of model fields, e.g. {memory_layers: [1]}")
        wants_memory = [arm for arm in self.arms if arm in MEMORY_ARMS]
        if wants_memory and not self.memory.get("memory_layers"):
            raise invalid(
                "plan field",
                "memory",
                self.memory,
                f"model fields with a non-empty memory_layers (the arms {', '.join(wants_memory)} need a memory)",
            )

    def run_dir(self, arm: str, lr: float, seed: int) -> Path:
        return Path(self.out_dir) / "runs" / arm / runner.lr_name(lr) / f"seed-{seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualPlan:
        return dataclass_from_dict(cls, data, "plan field")


def run_arms(plan: dict[str, Any]) -> list[str]:
    """The arms of ``plan`` (a plan's ``to_dict``) as runs name them: ``tf_sparse`` and
    ``tf_memory_sparse`` once per budget."""
    budgets = {SPARSE: plan["sparse_tokens"], MEMORY_SPARSE: plan.get("memory_slots", [])}
    return [
        name for arm in plan["arms"] for name in ([f"{arm}_{n}" for n in budgets[arm]] if arm in budgets else [arm])
    ]


def memory_base_configs(plan: ContinualPlan, base_plan: Any) -> dict[int, dict[str, Any]]:
    """The training configs of the memory base models, by seed: the base plan's TokenFormer with
    ``plan.memory``'s fields, into ``out_dir/base-memory/seed-<s>``."""
    configs = {}
    for seed in plan.seeds:
        config = base_plan.base_config("tokenformer", seed).to_dict()
        config["model_overrides"] = {**config["model_overrides"], **plan.memory}
        config["out_dir"] = str(Path(plan.out_dir) / "base-memory" / f"seed-{seed}")
        configs[seed] = TrainConfig.from_dict(config).to_dict()
    return configs


def base_model(arm: str) -> str:
    """Which base model an arm (as runs name it) continues from: tokenformer, transformer or memory."""
    if arm.startswith("tx"):
        return "transformer"
    return "memory" if arm.startswith(MEMORY_ARMS) else "tokenformer"


def load_plan(path: str | Path, out_dir: str | None = None) -> ContinualPlan:
    """Read and validate a YAML plan; ``out_dir`` overrides the plan's."""
    return ContinualPlan.from_dict(runner.read_plan(path, out_dir))


def grown_counts(config: Any, growth: float) -> dict[str, int]:
    """``grow_to`` of the grown arms: every kind's count times ``growth``."""
    return {f"{kind}_tokens": round(growth * config.tokens(0)[kind]) for kind in TOKEN_KINDS}


def new_token_parameters(config: Any, growth: float) -> int:
    """Parameters of the tokens the grown arms add (their trainable parameters when frozen)."""
    per_layer = {kind: round(growth * config.tokens(0)[kind]) - config.tokens(0)[kind] for kind in TOKEN_KINDS}
    tokens = 3 * per_layer["qkv"] + per_layer["proj"] + per_layer["ffn"]
    return 2 * config.d_model * tokens * config.n_layers


def lora_rank(config: Any, parameters: int) -> int:
    """The LoRA rank on every projection of a linear model with about ``parameters`` trainable ones."""
    d = config.d_model
    per_rank = config.n_layers * (4 * 2 * d + 2 * (d + config.ffn_tokens))
    return max(1, round(parameters / per_rank))


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """Freeze ``model`` and give every projection a LoRA adapter of ``rank`` (``peft``)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ImportError("the LoRA arm needs peft: pip install 'tokenformer[continual]'") from exc
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, learning rate, seed) on B, evaluating A and B along; its stored result if done."""
    torch.set_flush_denormal(True)
    plan = ContinualPlan.from_dict(job["plan"])
    arm, lr, seed = job["arm"], job["lr"], job["seed"]
    out_dir = plan.run_dir(arm, lr, seed)

    def run() -> dict[str, Any]:
        from ..data import Tokenizer

        base_model, task_a, config_a = load_base(job["base"])
        torch.set_num_threads(config_a.threads or torch.get_num_threads())
        options = {
            **config_a.to_dict(),
            "data": plan.data,
            "val_fraction": plan.val_fraction,
            "max_steps": plan.steps,
            "warmup_steps": max(1, plan.steps // 10),
            "lr": lr,
            "min_lr": lr / 10,
            "seed": seed,
            "eval_interval": plan.eval_interval,
            "eval_batches": plan.eval_batches,
            "ckpt_interval": plan.steps,
            "keep_last": 1,
            "out_dir": str(out_dir),
            "resume": None,
        }
        model = None
        if arm == "tx_lora":
            rank = lora_rank(base_model.config, new_token_parameters(job["tf_config"], plan.growth))
            model = add_lora(base_model, rank)
        else:
            options["init_from"] = job["base"]["checkpoint"]
            if arm.startswith("tf_grow"):
                options["grow_to"] = grown_counts(base_model.config, plan.growth)
                options["old_lr_scale"] = plan.slow_scale if arm == "tf_grow_slow" else 0.0
            if arm == "tf_grow_separate":
                options["continual"] = "grow_separate"
            for prefix, mode in ((SPARSE, "sparse"), (MEMORY_SPARSE, "sparse_memory")):
                if arm.startswith(prefix):
                    options.update(
                        continual=mode,
                        trainable_tokens=int(arm.removeprefix(f"{prefix}_")),
                        reference_data=config_a.data,
                        usage_batches=plan.usage_batches,
                    )
        config_b = TrainConfig.from_dict(options)
        tokenizer = Tokenizer.from_json(job["tokenizer"]) if model is not None else None
        task_b = make_task(config_b, tokenizer)[0] if model is not None else None
        trainer = Trainer(config_b, model=model, tokenizer=tokenizer, task=task_b)
        # plan.eval_batches of A's validation batches, spread over the whole held-out split.
        wanted = plan.eval_batches * config_a.batch_size
        a_windows = task_a.eval_windows[:: max(1, len(task_a.eval_windows) // wanted)][:wanted]

        def evaluate_a() -> float:
            trainer.model.eval()
            with torch.no_grad():
                loss = evaluate_windows(trainer.model, a_windows, config_a.batch_size, trainer.device)["val_loss"]
            trainer.model.train()
            return loss

        curve = [{"step": 0, "b": trainer.evaluate()["val_loss"], "a": evaluate_a()}]
        try:
            for stop in range(plan.eval_interval, plan.steps + 1, plan.eval_interval):
                trainer.fit(stop)
                curve.append({"step": stop, "b": trainer.state.val_history[-1]["val_loss"], "a": evaluate_a()})
        finally:
            trainer.close()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if arm in ("tf_grow_frozen", "tf_grow_separate"):
            trainable = new_token_parameters(base_model.config, plan.growth)
        if arm.startswith((SPARSE, MEMORY_SPARSE)):  # the chosen key and value rows (of slots: values)
            trainable = sum(int(r.scale.count_nonzero()) * r.param.shape[1] for r in trainer.update_scale.rows)
        return {"arm": arm, "lr": lr, "seed": seed, "curve": curve, "trainable_parameters": trainable}

    return runner.cached_run(out_dir, run)


def run_experiment(plan: ContinualPlan, command: str = "", report_only: bool = False) -> dict[str, Any]:
    """Run every (arm, rate, seed) not finished yet (with ``report_only``: none), then write the
    results, report and plot from the finished runs."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))
    base_plan = load_pruning_plan(plan.base_plan)
    base_plan.seeds = list(plan.seeds)
    base_plan.workers = plan.workers
    base = base_runs(base_plan, workers=0 if report_only else plan.workers)
    if any(arm in MEMORY_ARMS for arm in plan.arms):
        configs = memory_base_configs(plan, base_plan)
        todo = [c for c in configs.values() if runner.read_result(c["out_dir"]) is None]
        if todo and report_only:
            raise FileNotFoundError(f"memory base models not trained yet: {[c['out_dir'] for c in todo]}")
        if todo:
            runner.run_jobs(train_base, todo, plan.workers)
        base.update({("memory", seed): runner.read_result(c["out_dir"]) for seed, c in configs.items()})
    from ..train import load_checkpoint, resolve_checkpoint

    tokenizers = {
        seed: load_checkpoint(resolve_checkpoint(base[("tokenformer", seed)]["checkpoint"])).tokenizer_json
        for seed in plan.seeds
    }
    tf_config = load_base(base[("tokenformer", plan.seeds[0])])[0].config
    jobs = [
        {
            "plan": plan.to_dict(),
            "arm": arm,
            "lr": lr,
            "seed": seed,
            "base": base[(base_model(arm), seed)],
            "tokenizer": tokenizers[seed],
            "tf_config": tf_config,
        }
        for seed in plan.seeds
        for arm in run_arms(plan.to_dict())
        for lr in plan.lr_grid
    ]
    if report_only:
        runs = [r for job in jobs if (r := runner.read_result(plan.run_dir(job["arm"], job["lr"], job["seed"])))]
    else:
        runs = runner.run_jobs(run_job, jobs, plan.workers)
    config = TrainConfig.from_dict(base_plan.train)
    results = {
        "command": command,
        "machine": runner.machine(config.threads, config.device, config.precision),
        "plan": plan.to_dict(),
        "base_recipe": base_plan.train,
        "runs": runs,
    }
    results["analysis"] = analyse(results)
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot(results, out / PLOT)
    io.atomic_write_text(out / "report.md", report(results))
    return results


# -- analysis -----------------------------------------------------------------------------------


def forgetting_at_b(curve: list[dict[str, float]], target: float) -> float | None:
    """How much A's loss rose (over its value before training on B) by the time B's loss first
    reaches ``target`` (linear between evaluations); None if it never does."""
    start = curve[0]["a"]
    for before, after in zip(curve, curve[1:], strict=False):
        if before["b"] <= target:
            return before["a"] - start
        if after["b"] <= target:
            share = (before["b"] - target) / (before["b"] - after["b"])
            return before["a"] + share * (after["a"] - before["a"]) - start
    return curve[-1]["a"] - start if curve[-1]["b"] <= target else None


def mean_b(plan: dict[str, Any], by: dict[tuple, dict[str, Any]], arm: str, lr: float, index: int) -> float:
    """B's loss at evaluation ``index`` of ``arm`` at ``lr``, mean over seeds."""
    return statistics.fmean(by[(arm, lr, seed)]["curve"][index]["b"] for seed in plan["seeds"])


def b_targets(plan: dict[str, Any], by: dict[tuple, dict[str, Any]]) -> list[float]:
    """Levels of B's loss to compare the arms at, from high to low: thirds of the way from below
    where every arm starts down to the loss that every arm reaches at its best rate (mean over
    seeds), and :func:`finetune_halfway`."""
    arms = run_arms(plan)
    rates = {arm: complete_rates(plan, by, arm) for arm in arms}
    top = min(mean_b(plan, by, arm, rates[arm][0], 0) for arm in arms if rates[arm])
    bottom = max(min(mean_b(plan, by, arm, lr, -1) for lr in rates[arm]) for arm in arms if rates[arm])
    if bottom >= top:  # some arm never gets below where another starts
        targets = [bottom]
    else:
        targets = [top - (top - bottom) * share for share in (1 / 3, 2 / 3, 1.0)]
    halfway = finetune_halfway(plan, by)
    if halfway is not None and not any(math.isclose(halfway, target) for target in targets):
        targets.append(halfway)
    return sorted(targets, reverse=True)


def finetune_halfway(plan: dict[str, Any], by: dict[tuple, dict[str, Any]]) -> float | None:
    """B's loss half-way between where ``tx_finetune`` starts and where it ends at its rate with the
    lowest final loss (means over seeds), None without a complete rate of it. The slowest arm sets
    the lowest of the other targets; this one is set by the baseline, so the goal is also judged
    where fine-tuning has learned B well."""
    rates = complete_rates(plan, by, FINETUNE) if FINETUNE in run_arms(plan) else []
    if not rates:
        return None
    lr = min(rates, key=lambda lr: mean_b(plan, by, FINETUNE, lr, -1))
    return (mean_b(plan, by, FINETUNE, lr, 0) + mean_b(plan, by, FINETUNE, lr, -1)) / 2


def complete_rates(plan: dict[str, Any], by: dict[tuple, dict[str, Any]], arm: str) -> list[float]:
    """The rates of ``arm``'s grid that were run with every seed (an interrupted experiment may
    lack some runs; only complete rates are compared)."""
    return [lr for lr in plan["lr_grid"] if all((arm, lr, seed) in by for seed in plan["seeds"])]


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Forgetting at every B target (each arm at its best rate), the goal at each and over all, and
    the final losses of every (arm, rate)."""
    plan = results["plan"]
    by = {(r["arm"], r["lr"], r["seed"]): r for r in results["runs"]}
    at_target = []
    for target in b_targets(plan, by):
        arms = {}
        for arm in run_arms(plan):
            best = None
            for lr in complete_rates(plan, by, arm):
                values = {seed: forgetting_at_b(by[(arm, lr, seed)]["curve"], target) for seed in plan["seeds"]}
                if any(v is None for v in values.values()):
                    continue
                mean = statistics.fmean(values.values())
                if best is None or mean < best["mean"]:
                    se = runner.standard_error(list(values.values()))
                    best = {"lr": lr, "mean": mean, "se": se, "per_seed": values}
            arms[arm] = best
        frozen = arms.get("tf_grow_frozen")
        for arm, entry in arms.items():
            if entry is not None and frozen is not None and arm != "tf_grow_frozen":
                entry["frozen_minus_this"] = runner.paired(frozen["per_seed"], entry["per_seed"])
        at_target.append({"b_target": target, "arms": arms})
    goal = [goal_at(block) for block in at_target]
    final = {}
    for arm in run_arms(plan):
        for lr in plan["lr_grid"]:
            seeds = [by[(arm, lr, s)] for s in plan["seeds"] if (arm, lr, s) in by]
            if not seeds:
                continue
            final[f"{arm}@{lr:g}"] = {
                "seeds": [r["seed"] for r in seeds],
                "a_before": statistics.fmean(r["curve"][0]["a"] for r in seeds),
                "a_after": statistics.fmean(r["curve"][-1]["a"] for r in seeds),
                "b_before": statistics.fmean(r["curve"][0]["b"] for r in seeds),
                "b_after": statistics.fmean(r["curve"][-1]["b"] for r in seeds),
                "trainable_parameters": seeds[0]["trainable_parameters"],
            }
    return {
        "finetune_halfway": finetune_halfway(plan, by),
        "goal": goal,
        "goal_verdict": goal_verdict(goal, len(plan["seeds"])),
        "at_target": at_target,
        "final": final,
    }


def goal_at(block: dict[str, Any]) -> dict[str, Any]:
    """The goal at one B target (a block of ``analyse``'s ``at_target``): the ``tf_*`` arm that
    forgets least there against each baseline of ``GOAL`` (each arm at its own best rate)."""
    reached = {arm: entry for arm, entry in block["arms"].items() if arm.startswith("tf_") and entry is not None}
    best = min(reached, key=lambda arm: reached[arm]["mean"], default=None)
    if best is None:
        return {"b_target": block["b_target"], "best": None, "vs": {}}
    vs = {}
    for baseline, share in GOAL.items():
        if baseline not in block["arms"]:
            vs[baseline] = {"met": None, "why": "not run"}
        elif block["arms"][baseline] is None:
            vs[baseline] = {"met": None, "why": "does not reach the target on every seed"}
        else:
            vs[baseline] = against_baseline(reached[best]["per_seed"], block["arms"][baseline], share)
    entry = {key: reached[best][key] for key in ("lr", "mean", "se", "per_seed")}
    return {"b_target": block["b_target"], "best": {"arm": best, **entry}, "vs": vs}


def against_baseline(forgetting: dict[Any, float], baseline: dict[str, Any], share: float) -> dict[str, Any]:
    """Per seed, ``forgetting`` over the baseline's (an arm's entry at a target; mean and standard
    error of the ratios) and the paired difference; ``met``: whether the ratios' mean is at most
    ``share``, None where there is no ratio (``why`` says why)."""
    out = {"lr": baseline["lr"], "mean": baseline["mean"], "se": baseline["se"], "share": share}
    out["difference"] = runner.paired(forgetting, baseline["per_seed"])
    seeds = sorted(set(forgetting) & set(baseline["per_seed"]))
    flat = [seed for seed in seeds if baseline["per_seed"][seed] <= 0]
    if flat:  # a ratio to a baseline that did not forget says nothing (or flips its sign)
        return {
            **out,
            "met": None,
            "why": f"its forgetting is not positive on seed{'s' * (len(flat) > 1)} {', '.join(map(str, flat))}",
        }
    ratios = {seed: forgetting[seed] / baseline["per_seed"][seed] for seed in seeds}
    values = list(ratios.values())
    ratio = {"mean": statistics.fmean(values), "se": runner.standard_error(values), "per_seed": ratios}
    return {**out, "ratio": ratio, "met": ratio["mean"] <= share}


def goal_verdict(goal: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """The goal over every target the best TokenFormer arm reaches: ``met`` True, False (``missed``
    lists where and by how much) or None (nothing missed, but ``open`` lists comparisons without a
    ratio, or no TokenFormer arm reaches a target)."""
    reached = [block for block in goal if block["best"] is not None]
    missed, open_ = [], []
    for block in reached:
        for baseline, c in block["vs"].items():
            if c["met"] is False:
                missed.append({"b_target": block["b_target"], "baseline": baseline, "ratio": c["ratio"]["mean"]})
            elif c["met"] is None:
                open_.append({"b_target": block["b_target"], "baseline": baseline, "why": c["why"]})
    met = False if missed else (None if open_ or not reached else True)
    return {"met": met, "targets": len(reached), "seeds": seeds, "missed": missed, "open": open_}


def plot(results: dict[str, Any], path: Path) -> None:
    """Forgetting (the rise of A's validation loss) against B's validation loss along training,
    and B's loss against steps; mean over seeds, each arm at its rate that forgets least at the
    lowest B target it reaches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, analysis = results["plan"], results["analysis"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in run_arms(plan):
        reached = [block["arms"][arm] for block in analysis["at_target"] if block["arms"].get(arm)]
        lr = reached[-1]["lr"] if reached else plan["lr_grid"][0]
        curves = [r["curve"] for r in results["runs"] if r["arm"] == arm and r["lr"] == lr]
        if not curves:
            continue
        steps = [p["step"] for p in curves[0]]
        a = [statistics.fmean(c[i]["a"] - c[0]["a"] for c in curves) for i in range(len(steps))]
        b = [statistics.fmean(c[i]["b"] for c in curves) for i in range(len(steps))]
        axes[0].plot(b, a, "o-", markersize=2.5, label=f"{arm} (lr {lr:g})")
        axes[1].plot(steps, b, "-", label=f"{arm} (lr {lr:g})")
    axes[0].invert_xaxis()
    axes[0].set_xlabel("validation loss on B (learning →)")
    axes[0].set_ylabel("rise of the validation loss on A (forgetting ↑)")
    axes[1].set_xlabel("steps on B")
    axes[1].set_ylabel("validation loss on B")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plus_minus(mean: float, se: float, spec: str = "+.4f") -> str:
    """``mean ± se``; the mean alone where the standard error is NaN (one seed)."""
    return format(mean, spec) + ("" if math.isnan(se) else f" ± {se:{spec.lstrip('+')}}")


def target_name(target: float, analysis: dict[str, Any]) -> str:
    halfway = analysis.get("finetune_halfway")
    return f"{target:.4f}" + (" (half-way)" if halfway is not None and math.isclose(target, halfway) else "")


def verdict_line(verdict: dict[str, Any], analysis: dict[str, Any]) -> str:
    """The goal in one line: met at every target the best TokenFormer arm reaches, or where it is missed."""

    def grouped(items: list[dict[str, Any]], label: Callable[[dict[str, Any]], tuple[str, str]]) -> str:
        """``items`` (``missed`` or ``open``) as "against `baseline` (why) at B t1, t2", grouped by
        baseline and why; ``label(item)`` gives the why and the target's text."""
        groups: dict[tuple[str, str], list[str]] = {}
        for item in items:
            why, at = label(item)
            groups.setdefault((item["baseline"], why), []).append(at)
        return "; ".join(f"against `{base}` ({why}) at B {', '.join(at)}" for (base, why), at in groups.items())

    missed = grouped(
        verdict["missed"],
        lambda i: (f"goal ≤ {GOAL[i['baseline']]:g}", f"{target_name(i['b_target'], analysis)}: {i['ratio']:.3f}"),
    )
    unsettled = grouped(verdict["open"], lambda i: (i["why"], target_name(i["b_target"], analysis)))
    if verdict["met"]:
        line = f"**Met** at every target the best TokenFormer arm reaches ({verdict['targets']} of them)."
    elif verdict["met"] is False:
        line = f"**Missed** {missed}." + (f" Not compared {unsettled}." if unsettled else "")
    elif verdict["targets"]:
        line = f"**Not decided**: met wherever compared, but not compared {unsettled}."
    else:
        line = "**Not decided**: no TokenFormer arm reaches a target."
    if verdict["seeds"] < GOAL_SEEDS:
        line += f" Seeds: {verdict['seeds']}; the goal asks for {GOAL_SEEDS}."
    return line


def goal_section(analysis: dict[str, Any]) -> list[str]:
    shares = " and ".join(f"at most {share:g} of what `{baseline}` forgets" for baseline, share in GOAL.items())
    lines = [
        "## The goal",
        "",
        f"At equal loss on B, the best TokenFormer method forgets {shares}, on {GOAL_SEEDS} seeds, at every "
        "target it reaches.",
        "",
        verdict_line(analysis["goal_verdict"], analysis),
        "",
        "At each B target (below), the `tf_*` arm that forgets least there against each baseline, every arm at the "
        "rate of its grid that forgets least at that target: their forgetting (mean ± s.e. over seeds), the ratio "
        "of the TokenFormer arm's forgetting to the baseline's per seed (mean ± s.e. over seeds), their difference "
        "paired by seed (negative: the TokenFormer arm forgets less) and the goal there (met where the ratio's mean "
        "is at most the goal's share). Where the baseline's forgetting is not positive on some seed a ratio means "
        "nothing: only the difference is given. The target marked half-way is B's loss half-way between where "
        "`tx_finetune` starts and where it ends at its rate with the lowest final loss; — : not reached on every "
        "seed, or not run.",
        "",
    ]
    rows = []
    for block in analysis["goal"]:
        target, best = target_name(block["b_target"], analysis), block["best"]
        if best is None:
            rows.append([target, "— (no TokenFormer arm)", "—", "—", "—", "—", "—", "—"])
            continue
        name = f"`{best['arm']}` (lr {best['lr']:g})"
        for baseline, c in block["vs"].items():
            if "difference" not in c:
                rows.append([target, name, plus_minus(best["mean"], best["se"]), f"`{baseline}`", "—", "—", "—", "—"])
                continue
            diff = c["difference"]
            share = GOAL[baseline]
            rows.append(
                [
                    target,
                    name,
                    plus_minus(best["mean"], best["se"]),
                    f"`{baseline}` (lr {c['lr']:g})",
                    plus_minus(c["mean"], c["se"]),
                    plus_minus(c["ratio"]["mean"], c["ratio"]["se"], ".3f") if "ratio" in c else f"— ({c['why']})",
                    plus_minus(diff["mean"], diff["se"]),
                    "—" if c["met"] is None else f"met (≤ {share:g})" if c["met"] else f"missed (> {share:g})",
                ]
            )
    headers = ["B target", "best TokenFormer arm", "its forgetting", "baseline", "baseline's forgetting", "ratio"]
    lines += [runner.markdown_table([*headers, "TokenFormer − baseline", "goal"], rows), ""]
    return lines


def memory_description(plan: dict[str, Any]) -> str:
    """The report's sentence on the memory arms (empty without them)."""
    if not any(arm in MEMORY_ARMS for arm in plan["arms"]):
        return ""
    return (
        f" `tf_memory_*`: a second TokenFormer base with `{json.dumps(plan['memory'])}`, trained on A with the same "
        "recipe and seeds; `tf_memory_finetune` trains every parameter, `tf_memory_sparse_<N>` only the value rows "
        "of the N slots per memory table that B uses most and A least (sparse memory fine-tuning). Forgetting is "
        "each arm's rise over its own base model's A loss."
    )


def report(results: dict[str, Any]) -> str:
    plan, analysis, m = results["plan"], results["analysis"], results["machine"]
    if "goal" not in analysis:  # a results.json written before the goal was analysed
        analysis = analyse(results)
    recipe = TrainConfig.from_dict(results["base_recipe"])
    lines = [
        "# Continual learning by growth, measured",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']}, "
        f"{m['threads']} thread(s) per run, device {m['device']}, {m['precision']}.",
        "",
        f"Corpus A: `{recipe.data}` (the base models: `{recipe.model}` with `{json.dumps(recipe.model_overrides)}` and "
        f"the parameter-matched Transformer, {recipe.max_steps} steps). Corpus B: `{plan['data']}` "
        f"({100 * plan['val_fraction']:g}% held out), A's tokenizer. Every arm: {plan['steps']} steps of "
        f"{recipe.tokens_per_step} tokens on B, peak lr from {plan['lr_grid']} (warmup 10%, cosine to a tenth), "
        f"seeds {plan['seeds']}; A and B validated on the same {plan['eval_batches']} batches every "
        f"{plan['eval_interval']} steps. Growth: every token kind x{plan['growth']:g} (zero keys); "
        f"`tf_grow_slow`: old parameters at {plan['slow_scale']:g} x the rate; `tf_grow_separate`: new tokens "
        "normalised apart from the old ones (random keys, zero values), old tokens frozen; `tf_sparse_<N>`: the N "
        f"tokens per Pattention that B uses most and A least (usage over {plan.get('usage_batches', 8)} batches of "
        "each) trained, everything else frozen." + memory_description(plan),
        "",
        *goal_section(analysis),
        "## Final losses (mean over the seeds run)",
        "",
    ]
    rows = []
    for name, entry in analysis["final"].items():
        rows.append(
            [
                f"`{name.split('@')[0]}`",
                name.split("@")[1],
                ", ".join(map(str, entry["seeds"])),
                f"{entry['trainable_parameters'] / 1e3:.1f}k",
                f"{entry['a_before']:.4f}",
                f"{entry['a_after']:.4f}",
                f"{entry['a_after'] - entry['a_before']:+.4f}",
                f"{entry['b_before']:.4f}",
                f"{entry['b_after']:.4f}",
            ]
        )
    headers = ["arm", "lr", "seeds", "trainable", "A before", "A after", "forgetting", "B before", "B after"]
    lines += [runner.markdown_table(headers, rows), ""]
    lines += [
        "## Forgetting at equal loss on B",
        "",
        "Forgetting, the rise of A's validation loss over its value before B, where B's loss first reaches the "
        "target (linear between evaluations); each arm at the rate of its grid that forgets least there (mean ± "
        "s.e. over seeds). Targets lie below where every arm starts, down to the loss every arm reaches at its "
        "best rate, and half-way for `tx_finetune` (see the goal). The last column is `tf_grow_frozen` minus that "
        "arm, paired by seed (negative: growth with frozen old tokens forgets less). — : no rate of the arm "
        "reached the target on every seed.",
        "",
    ]
    for block in analysis["at_target"]:
        lines += [f"B target {target_name(block['b_target'], analysis)}:", ""]
        rows = []
        for arm, entry in block["arms"].items():
            if entry is None:
                rows.append([f"`{arm}`", "—", "—", "—"])
                continue
            diff = entry.get("frozen_minus_this")
            diff_text = "—" if diff is None else plus_minus(diff["mean"], diff["se"])
            rows.append([f"`{arm}`", f"{entry['lr']:g}", plus_minus(entry["mean"], entry["se"]), diff_text])
        lines += [runner.markdown_table(["arm", "lr", "forgetting at the target", "tf_grow_frozen − arm"], rows), ""]
    lines += [f"![A against B along training]({PLOT})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m tokenformer.experiments.continual PLAN.yaml [--out_dir DIR] [--report_only]``."""
    runner.experiment_main(
        argv, "tokenformer.experiments.continual",
        __doc__.split("\n\n")[0], "configs/experiments/continual-cpu.yaml", load_plan, run_experiment, report,
    )  # fmt: skip


if __name__ == "__main__":
    main()
