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
- ``tx_finetune``: the Transformer, every parameter trained;
- ``tx_lora``: the Transformer frozen, with LoRA adapters (``peft``) on every projection whose
  rank gives as many trainable parameters as ``tf_grow_frozen``'s new tokens.

Every run evaluates the validation sets of A and of B (the same windows for every run) before its
first step and every ``eval_interval`` steps. Forgetting is A's loss over the base model's;
learning is B's loss. As the arms trade one for the other differently, they are compared at
*equal loss on B*: each run's A loss where its B loss first reaches a target, each arm at the
learning rate of its grid that forgets least there, paired by seed.

Runs are cached in ``out_dir/runs/<arm>/lr-<lr>/seed-<s>`` (a run with a ``result.json`` is done).
Outputs: ``results.json``, ``report.md`` and ``forgetting.png``.
"""

from __future__ import annotations

import json
import statistics
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
from .pruning import base_runs, load_base
from .pruning import load_plan as load_pruning_plan

ARMS = ("tf_finetune", "tf_grow_frozen", "tf_grow_slow", "tf_grow_separate", "tf_sparse", "tx_finetune", "tx_lora")
SPARSE = "tf_sparse"
PLOT = "forgetting.png"
LORA_TARGETS = ["query", "key", "value", "proj", "fc1", "fc2"]


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
        usage_batches: Batches of A and of B over which ``tf_sparse`` measures token usage.
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
    lr_grid: list[float] = field(default_factory=lambda: [0.001, 0.002, 0.004])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
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

    def run_dir(self, arm: str, lr: float, seed: int) -> Path:
        return Path(self.out_dir) / "runs" / arm / runner.lr_name(lr) / f"seed-{seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualPlan:
        return dataclass_from_dict(cls, data, "plan field")


def run_arms(plan: dict[str, Any]) -> list[str]:
    """The arms of ``plan`` (a plan's ``to_dict``) as runs name them: ``tf_sparse`` once per budget."""
    return [
        name
        for arm in plan["arms"]
        for name in ([f"{SPARSE}_{n}" for n in plan["sparse_tokens"]] if arm == SPARSE else [arm])
    ]


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
            if arm.startswith(SPARSE):
                options.update(
                    continual="sparse",
                    trainable_tokens=int(arm.removeprefix(f"{SPARSE}_")),
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
        if arm.startswith(SPARSE):  # the chosen rows of the key and value tokens
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
            "base": base[("transformer" if arm.startswith("tx") else "tokenformer", seed)],
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


def b_targets(plan: dict[str, Any], by: dict[tuple, dict[str, Any]]) -> list[float]:
    """Levels of B's loss to compare the arms at: below where every arm starts, down to the
    loss that every arm reaches at its best rate (mean over seeds)."""

    def mean_b(arm: str, lr: float, index: int) -> float:
        return statistics.fmean(by[(arm, lr, seed)]["curve"][index]["b"] for seed in plan["seeds"])

    arms = run_arms(plan)
    rates = {arm: complete_rates(plan, by, arm) for arm in arms}
    top = min(mean_b(arm, rates[arm][0], 0) for arm in arms if rates[arm])
    bottom = max(min(mean_b(arm, lr, -1) for lr in rates[arm]) for arm in arms if rates[arm])
    if bottom >= top:  # some arm never gets below where another starts
        return [bottom]
    return [top - (top - bottom) * share for share in (1 / 3, 2 / 3, 1.0)]


def complete_rates(plan: dict[str, Any], by: dict[tuple, dict[str, Any]], arm: str) -> list[float]:
    """The rates of ``arm``'s grid that were run with every seed (an interrupted experiment may
    lack some runs; only complete rates are compared)."""
    return [lr for lr in plan["lr_grid"] if all((arm, lr, seed) in by for seed in plan["seeds"])]


def analyse(results: dict[str, Any]) -> dict[str, Any]:
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
    return {"at_target": at_target, "final": final}


def plot(results: dict[str, Any], path: Path) -> None:
    """Forgetting (the rise of A's validation loss) against B's validation loss along training,
    and B's loss against steps; mean over seeds, each arm at its rate that forgets least at the
    last B target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, analysis = results["plan"], results["analysis"]
    last = analysis["at_target"][-1]["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in run_arms(plan):
        lr = (last.get(arm) or {"lr": plan["lr_grid"][0]})["lr"]
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


def report(results: dict[str, Any]) -> str:
    plan, analysis, m = results["plan"], results["analysis"], results["machine"]
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
        "each) trained, everything else frozen.",
        "",
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
        "best rate. The last column is `tf_grow_frozen` minus that arm, paired by seed (negative: growth with "
        "frozen old tokens forgets less). — : no rate of the arm reached the target on every seed.",
        "",
    ]
    for block in analysis["at_target"]:
        lines += [f"B target {block['b_target']:.4f}:", ""]
        rows = []
        for arm, entry in block["arms"].items():
            if entry is None:
                rows.append([f"`{arm}`", "—", "—", "—"])
                continue
            diff = entry.get("frozen_minus_this")
            diff_text = (
                "—" if diff is None else f"{diff['mean']:+.4f}" + (f" ± {diff['se']:.4f}" if diff["n"] > 1 else "")
            )
            spread = "" if entry["se"] != entry["se"] else f" ± {entry['se']:.4f}"  # NaN with one seed
            rows.append([f"`{arm}`", f"{entry['lr']:g}", f"{entry['mean']:+.4f}{spread}", diff_text])
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
