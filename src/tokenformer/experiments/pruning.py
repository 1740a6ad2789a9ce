"""Pruning, measured: validation loss against the share of parameter tokens kept.

A TokenFormer and its parameter-matched Transformer (``projection="linear"``) are trained on one
recipe, once per seed (the *base* models, shared with :mod:`tokenformer.experiments.continual`).
Each base model is then pruned to each kept share of its tokens, by each importance rule, and
evaluated on the same validation windows:

- the TokenFormer per token kind (``qkv``, ``proj``, ``ffn``, or ``all`` three at once), with and
  without the ghost norm;
- the Transformer's MLP hidden units (its ``ffn``) by the same rules; it has no parameter tokens
  in its attention.

Rules: ``calibration`` (mean absolute normalised score, or GeLU activation, on training batches,
times the value norm) and ``magnitude`` (key norm times value norm; data-free). Some pruned models
are fine-tuned for a few steps afterwards, next to the unpruned models fine-tuned alike (the
fine-tuning's own gain). Every pruned shape also gets its parameters, forward FLOPs per token
and CPU inference throughput.

Runs are cached in ``out_dir`` (``base/<model>/seed-<s>``, ``pruned/seed-<s>``,
``finetune/...``, ``throughput``): started again, the experiment skips what is done. Outputs:
``results.json``, ``report.md`` and ``loss_vs_kept.png``.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import io
from ..flops import count_parameters, forward_flops_per_token
from ..pruning import calibration_scores, prune
from ..train import TrainConfig, Trainer, load_checkpoint, resolve_checkpoint
from ..train.tasks import make_task
from ..validation import dataclass_from_dict, invalid
from . import runner

MODELS = ("tokenformer", "transformer")
KINDS = ("all", "qkv", "proj", "ffn")
RULES = ("calibration", "magnitude")
PLOT = "loss_vs_kept.png"


@dataclass
class PruningPlan:
    """The pruning experiment.

    Args:
        out_dir: Where the runs, results, report and plot go.
        train: The base TokenFormer's training recipe (``tokenformer train`` options); the
            Transformer takes the same with ``projection: linear`` at the matched MLP width.
        seeds: One pair of base models per seed.
        fractions: Kept shares of the tokens, each in (0, 1) (the unpruned model is measured too).
        kinds: TokenFormer token kinds pruned one at a time (``all``: the three together).
        rules: Importance rules (``calibration``, ``magnitude``).
        calibration_batches: Training batches the ``calibration`` rule measures on.
        finetune: ``[kind, fraction]`` pairs whose pruned models are fine-tuned (calibration rule;
            the TokenFormer with and without the ghost; for the Transformer the ``ffn`` pairs).
        finetune_seeds: The seeds whose models are fine-tuned (null: every seed).
        finetune_steps: Steps of each fine-tuning (warmup 10%, cosine to a tenth of the rate).
        finetune_lr: Its peak learning rate.
        throughput_repeats: Timed rounds per model for the inference throughput (median).
        workers: Base runs and fine-tunings trained at a time, each in its own process.
    """

    out_dir: str = "runs/pruning-cpu"
    train: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [1337, 2, 3])
    fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25])
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    rules: list[str] = field(default_factory=lambda: list(RULES))
    calibration_batches: int = 8
    finetune: list[list[Any]] = field(default_factory=lambda: [["ffn", 0.5], ["all", 0.5]])
    finetune_seeds: list[int] | None = None
    finetune_steps: int = 100
    finetune_lr: float = 0.001
    throughput_repeats: int = 5
    workers: int = 1

    def __post_init__(self) -> None:
        self.base_config("tokenformer", self.seeds[0] if self.seeds else 0)  # the recipe is checked
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise invalid("plan field", "seeds", self.seeds, "a non-empty list of distinct integers")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise invalid("plan field", "fractions", self.fractions, "a non-empty list of shares in (0, 1)")
        if not set(self.kinds) <= set(KINDS) or not self.kinds:
            raise invalid("plan field", "kinds", self.kinds, f"a non-empty list of {', '.join(KINDS)}")
        if not set(self.rules) <= set(RULES) or not self.rules:
            raise invalid("plan field", "rules", self.rules, f"a non-empty list of {', '.join(RULES)}")
        for pair in self.finetune:
            if len(pair) != 2 or pair[0] not in self.kinds or pair[1] not in self.fractions:
                raise invalid("plan field", "finetune", self.finetune, "[kind, fraction] pairs of kinds and fractions")

    def base_config(self, model: str, seed: int) -> TrainConfig:
        """The training config of a base model (``tokenformer`` or its matched ``transformer``)."""
        recipe = TrainConfig.from_dict({**self.train, "resume": None})
        overrides = dict(recipe.model_overrides)
        if model == "transformer":
            matched = recipe.model_config().parameter_matched_linear()
            overrides.update(projection="linear", ffn_tokens=matched.ffn_tokens)
        run = Path(self.out_dir) / "base" / model / f"seed-{seed}"
        return TrainConfig.from_dict(
            {**recipe.to_dict(), "model_overrides": overrides, "seed": seed, "out_dir": str(run), "resume": "auto"}
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        return dataclass_from_dict(cls, data, "plan field")


def load_plan(path: str | Path, out_dir: str | None = None) -> PruningPlan:
    """Read and validate a YAML plan; ``out_dir`` overrides the plan's."""
    return PruningPlan.from_dict(runner.read_plan(path, out_dir))


# -- base models --------------------------------------------------------------------------------


def train_base(config: dict[str, Any]) -> dict[str, Any]:
    """Train one base model to the end (resuming); its stored result if finished."""
    torch.set_flush_denormal(True)
    config = TrainConfig.from_dict(config)

    def train() -> dict[str, Any]:
        trainer = Trainer(config)
        try:
            trainer.fit()
        finally:
            trainer.close()
        final = trainer.state.val_history[-1]
        return {
            "val_loss": final["val_loss"],
            "checkpoint": str(trainer.last_checkpoint),
            "wall_time": trainer.state.wall_time,
            "parameters": count_parameters(trainer.model.config),
        }

    return runner.cached_run(config.out_dir, train)


def base_runs(
    plan: PruningPlan, models: tuple[str, ...] = MODELS, workers: int | None = None
) -> dict[tuple[str, int], dict[str, Any]]:
    """Every base model of the plan, trained ``workers`` (default ``plan.workers``) at a time:
    ``{(model, seed): result}``. With ``workers=0`` nothing is trained: every model must be there."""
    jobs = {(model, seed): plan.base_config(model, seed).to_dict() for seed in plan.seeds for model in models}
    todo = [config for config in jobs.values() if runner.read_result(config["out_dir"]) is None]
    if todo and workers == 0:
        raise FileNotFoundError(f"base models not trained yet: {[c['out_dir'] for c in todo]}")
    if todo:
        runner.run_jobs(train_base, todo, plan.workers if workers is None else workers)
    return {key: runner.read_result(config["out_dir"]) for key, config in jobs.items()}


def load_base(result: dict[str, Any]) -> tuple[torch.nn.Module, Any, Any]:
    """A base model, its task (the recipe's data with the model's tokenizer) and config."""
    from ..data import Tokenizer

    checkpoint = load_checkpoint(resolve_checkpoint(result["checkpoint"]))
    config = TrainConfig.from_dict(checkpoint.trainer_state["train_config"])
    task, _ = make_task(config, Tokenizer.from_json(checkpoint.tokenizer_json))
    return checkpoint.model.eval(), task, config


# -- pruning ------------------------------------------------------------------------------------


def kept_counts(config: Any, kind: str, fraction: float) -> dict[str, int]:
    """``prune``'s counts that keep ``fraction`` of ``kind``'s tokens (``all``: of each kind)."""
    kinds = ("qkv", "proj", "ffn") if kind == "all" else (kind,)
    return {f"{k}_tokens": max(1, round(fraction * config.tokens(0)[k])) for k in kinds}


def variants(plan: PruningPlan, model: str) -> list[dict[str, Any]]:
    """Every pruned variant of a base model: kind, kept share, rule and (TokenFormer) ghost."""
    kinds = plan.kinds if model == "tokenformer" else ["ffn"]
    ghosts = (True, False) if model == "tokenformer" else (False,)
    return [
        {"model": model, "kind": kind, "fraction": fraction, "rule": rule, "ghost": ghost}
        for kind in kinds
        for fraction in plan.fractions
        for rule in plan.rules
        for ghost in ghosts
    ]


def pruned_copy(
    model: torch.nn.Module, variant: dict[str, Any], scores: dict[str, torch.Tensor] | None
) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    counts = kept_counts(model.config, variant["kind"], variant["fraction"])
    ghost = variant["ghost"] if model.config.projection == "pattention" else None
    prune(pruned, **counts, scores=scores if variant["rule"] == "calibration" else None, ghost=ghost)
    return pruned


def describe(model: torch.nn.Module, seq_len: int) -> dict[str, Any]:
    config = model.config
    return {
        "parameters": count_parameters(config),
        "non_embedding_parameters": count_parameters(config, non_embedding=True),
        "forward_flops_per_token": forward_flops_per_token(config, seq_len),
    }


def evaluate_variants(plan: PruningPlan, base: dict[tuple[str, int], dict[str, Any]], seed: int) -> dict[str, Any]:
    """Validation loss of every pruned variant of one seed's base models (and of the unpruned ones)."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(TrainConfig.from_dict(plan.train).threads or torch.get_num_threads())
    rows = []
    for model_name in MODELS:
        model, task, config = load_base(base[(model_name, seed)])
        scores = calibration_scores(
            model,
            (task.train_batch(step, 0, torch.device("cpu")) for step in range(plan.calibration_batches)),
            task.loss,
        )
        with torch.no_grad():
            metrics = task.evaluate(model, torch.device("cpu"))
        rows.append(
            {
                "model": model_name,
                "kind": "none",
                "fraction": 1.0,
                "rule": None,
                "ghost": False,
                **_losses(metrics),
                **describe(model, config.seq_len),
            }
        )
        for variant in variants(plan, model_name):
            pruned = pruned_copy(model, variant, scores)
            with torch.no_grad():
                metrics = task.evaluate(pruned, torch.device("cpu"))
            rows.append({**variant, **_losses(metrics), **describe(pruned, config.seq_len)})
    return {"seed": seed, "rows": rows}


def _losses(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"val_loss": metrics["val_loss"], "val_batch_losses": metrics["val_batch_losses"]}


# -- fine-tuning --------------------------------------------------------------------------------


def finetune_variants(plan: PruningPlan) -> list[dict[str, Any]]:
    """The pruned variants fine-tuned (calibration rule), with the unpruned models as the reference."""
    chosen = []
    for model in MODELS:
        chosen.append({"model": model, "kind": "none", "fraction": 1.0, "rule": None, "ghost": False})
        for kind, fraction in plan.finetune:
            if model == "transformer" and kind != "ffn":
                continue
            for ghost in (True, False) if model == "tokenformer" else (False,):
                chosen.append(
                    {"model": model, "kind": kind, "fraction": fraction, "rule": "calibration", "ghost": ghost}
                )
    return chosen


def variant_name(variant: dict[str, Any]) -> str:
    if variant["kind"] == "none":
        return f"{variant['model']}-unpruned"
    ghost = "-ghost" if variant["ghost"] else ""
    return f"{variant['model']}-{variant['kind']}-{variant['fraction']:g}-{variant['rule']}{ghost}"


def finetune_job(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one pruned variant of one base model; the stored result if done."""
    torch.set_flush_denormal(True)
    plan = PruningPlan.from_dict(job["plan"])
    variant, seed = job["variant"], job["seed"]
    out_dir = Path(plan.out_dir) / "finetune" / variant_name(variant) / f"seed-{seed}"

    def run() -> dict[str, Any]:
        model, task, config = load_base(job["base"])
        torch.set_num_threads(config.threads or torch.get_num_threads())
        if variant["kind"] != "none":
            scores = calibration_scores(
                model, (task.train_batch(s, 0, torch.device("cpu")) for s in range(plan.calibration_batches)), task.loss
            )
            model = pruned_copy(model, variant, scores)
        tune = TrainConfig.from_dict(
            {
                **config.to_dict(),
                "max_steps": plan.finetune_steps,
                "warmup_steps": max(1, plan.finetune_steps // 10),
                "lr": plan.finetune_lr,
                "min_lr": plan.finetune_lr / 10,
                # Other batches than pre-training's first ones (batch i is a function of seed and i).
                "seed": seed + 100_000,
                "eval_interval": plan.finetune_steps,
                "ckpt_interval": plan.finetune_steps,
                "out_dir": str(out_dir),
                "resume": None,
            }
        )
        trainer = Trainer(tune, task=task, model=model.train())
        before = trainer.evaluate()
        try:
            trainer.fit()
        finally:
            trainer.close()
        after = trainer.state.val_history[-1]
        return {**variant, "seed": seed, "before": before["val_loss"], "after": after["val_loss"]}

    return runner.cached_run(out_dir, run)


# -- throughput ---------------------------------------------------------------------------------


def throughput(model: torch.nn.Module, batch: torch.Tensor, repeats: int, calls: int = 5) -> float:
    """Inference tokens per CPU second of this process (``time.process_time``: on a shared
    machine, time other processes take does not count): the median over ``repeats`` rounds of
    ``calls`` forward passes."""
    model.eval()
    rates = []
    with torch.no_grad():
        model(batch)  # warm-up
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                model(batch)
            rates.append(calls * batch.numel() / (time.process_time() - start))
    return statistics.median(rates)


def measure_throughput(plan: PruningPlan, base: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """CPU tokens/s of the unpruned and every pruned shape (the first seed's models, calibration
    rule where there are two), measured one after the other in one process."""
    torch.set_flush_denormal(True)
    config = TrainConfig.from_dict(plan.train)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    seed = plan.seeds[0]
    rows = []
    for model_name in MODELS:
        model, task, cfg = load_base(base[(model_name, seed)])
        batch = task.train_batch(0, 0, torch.device("cpu"))[0]
        shapes = [{"model": model_name, "kind": "none", "fraction": 1.0, "rule": None, "ghost": False}]
        shapes += [v for v in variants(plan, model_name) if v["rule"] == plan.rules[0]]
        for variant in shapes:
            pruned = model if variant["kind"] == "none" else pruned_copy(model, variant, None)
            rows.append({**variant, "tokens_per_s": throughput(pruned, batch, plan.throughput_repeats)})
    return {"rows": rows, "batch": [config.batch_size, config.seq_len]}


# -- the whole experiment -----------------------------------------------------------------------


def measurement_directory(job: dict[str, Any]) -> Path:
    out = Path(job["plan"]["out_dir"])
    if job["job"] == "finetune":
        return out / "finetune" / variant_name(job["variant"]) / f"seed-{job['seed']}"
    return out / "pruned" / f"seed-{job['seed']}" if job["job"] == "evaluate" else out / "throughput"


def measurement_result(job: dict[str, Any]) -> dict[str, Any] | None:
    """A measurement's stored result (None for a fine-tuning not run; the others must exist)."""
    result = runner.read_result(measurement_directory(job))
    if result is None and job["job"] != "finetune":
        raise FileNotFoundError(f"no result in {measurement_directory(job)}: run the experiment without report_only")
    return result


def measurement(job: dict[str, Any]) -> dict[str, Any]:
    """One job of :func:`run_experiment` (``evaluate``, ``finetune`` or ``throughput``); cached."""
    plan = PruningPlan.from_dict(job["plan"])
    out = Path(plan.out_dir)
    if job["job"] == "finetune":
        return finetune_job(job)
    if job["job"] == "evaluate":
        return runner.cached_run(
            out / "pruned" / f"seed-{job['seed']}", lambda: evaluate_variants(plan, job["base"], job["seed"])
        )
    return runner.cached_run(out / "throughput", lambda: measure_throughput(plan, job["base"]))


def run_experiment(plan: PruningPlan, command: str = "", report_only: bool = False) -> dict[str, Any]:
    """Run every measurement not finished yet (with ``report_only``: none; the base models and
    the pruned evaluations must be there), then write the results, report and plot."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))
    base = base_runs(plan, workers=0 if report_only else plan.workers)
    # Every measurement is a job of its own, all of them run plan.workers at a time.
    jobs = [{"job": "throughput", "plan": plan.to_dict(), "base": base}]
    jobs += [{"job": "evaluate", "plan": plan.to_dict(), "base": base, "seed": seed} for seed in plan.seeds]
    jobs += [
        {
            "job": "finetune",
            "plan": plan.to_dict(),
            "variant": variant,
            "seed": seed,
            "base": base[(variant["model"], seed)],
        }
        for seed in plan.seeds
        if plan.finetune_seeds is None or seed in plan.finetune_seeds
        for variant in finetune_variants(plan)
    ]
    if report_only:
        done = [measurement_result(job) for job in jobs]
    else:
        done = runner.run_jobs(measurement, jobs, plan.workers)
    speed = done[0]
    pruned = done[1 : 1 + len(plan.seeds)]
    finetuned = [result for result in done[1 + len(plan.seeds) :] if result is not None]
    config = TrainConfig.from_dict(plan.train)
    results = {
        "command": command,
        "machine": runner.machine(config.threads, config.device, config.precision),
        "plan": plan.to_dict(),
        "base": [{"model": m, "seed": s, **r} for (m, s), r in base.items()],
        "pruned": pruned,
        "finetuned": finetuned,
        "throughput": speed,
    }
    results["analysis"] = analyse(results)
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot(results, out / PLOT)
    io.atomic_write_text(out / "report.md", report(results))
    return results


# -- analysis and outputs -----------------------------------------------------------------------


def _by_variant(results: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for entry in results["pruned"]:
        for row in entry["rows"]:
            table.setdefault(variant_name(row), {})[entry["seed"]] = row
    return table


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Means over seeds, and the comparisons the report makes, each paired by seed."""
    table = _by_variant(results)
    loss = {name: {seed: row["val_loss"] for seed, row in rows.items()} for name, rows in table.items()}
    increase = {
        name: {seed: value - loss[f"{name.split('-')[0]}-unpruned"][seed] for seed, value in seeds.items()}
        for name, seeds in loss.items()
    }
    summary = {
        name: {
            "mean": statistics.fmean(seeds.values()),
            "se": runner.standard_error(list(seeds.values())),
            "increase": statistics.fmean(increase[name].values()),
            "increase_se": runner.standard_error(list(increase[name].values())),
            **{
                k: next(iter(table[name].values()))[k]
                for k in ("parameters", "non_embedding_parameters", "forward_flops_per_token")
            },
        }
        for name, seeds in loss.items()
    }
    plan = results["plan"]
    comparisons = []

    def compare(label: str, a: str, b: str) -> None:
        # Differences of the increase over each model's own unpruned loss: within one model the
        # same as the difference of the losses, across models the fair measure.
        if a in increase and b in increase:
            comparisons.append({"what": label, "a": a, "b": b, **(runner.paired(increase[a], increase[b]) or {})})

    for fraction in plan["fractions"]:
        for rule in plan["rules"]:
            compare(
                f"FFN kept {fraction:g}, {rule}: TokenFormer (ghost) − Transformer MLP, loss increase",
                f"tokenformer-ffn-{fraction:g}-{rule}-ghost",
                f"transformer-ffn-{fraction:g}-{rule}",
            )
    for kind in plan["kinds"]:
        for fraction in plan["fractions"]:
            for rule in plan["rules"]:
                compare(
                    f"{kind} kept {fraction:g}, {rule}: ghost − no ghost",
                    f"tokenformer-{kind}-{fraction:g}-{rule}-ghost",
                    f"tokenformer-{kind}-{fraction:g}-{rule}",
                )
    for model, kinds, ghost in (("tokenformer", plan["kinds"], "-ghost"), ("transformer", ["ffn"], "")):
        for kind in kinds:
            for fraction in plan["fractions"]:
                compare(
                    f"{model} {kind} kept {fraction:g}: calibration − magnitude",
                    f"{model}-{kind}-{fraction:g}-calibration{ghost}",
                    f"{model}-{kind}-{fraction:g}-magnitude{ghost}",
                )
    tuned: dict[str, dict[int, dict[str, float]]] = {}
    for row in results["finetuned"]:
        tuned.setdefault(variant_name(row), {})[row["seed"]] = row
    finetune = {}
    for name, seeds in tuned.items():
        reference = tuned.get(f"{name.split('-')[0]}-unpruned", {})
        finetune[name] = {
            "before": statistics.fmean(r["before"] for r in seeds.values()),
            "after": statistics.fmean(r["after"] for r in seeds.values()),
            "after_se": runner.standard_error([r["after"] for r in seeds.values()]),
            "gap_after": runner.paired(
                {s: r["after"] for s, r in seeds.items()}, {s: r["after"] for s, r in reference.items()}
            ),
        }
    return {"summary": summary, "comparisons": comparisons, "finetune": finetune}


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation loss against the kept share, per kind, mean over seeds (calibration rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, summary = results["plan"], results["analysis"]["summary"]
    rule = plan["rules"][0]
    fractions = sorted([*plan["fractions"], 1.0])
    fig, axes = plt.subplots(1, len(plan["kinds"]), figsize=(3.6 * len(plan["kinds"]), 3.6), sharey=True)
    axes = [axes] if len(plan["kinds"]) == 1 else list(axes)
    for ax, kind in zip(axes, plan["kinds"], strict=True):
        lines = [("TokenFormer, ghost", "tokenformer", "-ghost"), ("TokenFormer, no ghost", "tokenformer", "")]
        if kind == "ffn":
            lines.append(("Transformer MLP", "transformer", ""))
        for label, model, ghost in lines:
            ys = [
                summary[f"{model}-unpruned"]["mean"]
                if f == 1.0
                else summary[f"{model}-{kind}-{f:g}-{rule}{ghost}"]["mean"]
                for f in fractions
            ]
            ax.plot([100 * f for f in fractions], ys, "o-", label=label)
        ax.set_title(f"{kind} tokens pruned ({rule})")
        ax.set_xlabel("tokens kept (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss, mean over seeds")
    for ax in axes:
        ax.legend(fontsize=7)
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def _cell(entry: dict[str, Any] | None, key: str = "mean", se: str = "se") -> str:
    if entry is None:
        return "—"
    text = f"{entry[key]:.4f}"
    return text + (f" ± {entry[se]:.4f}" if entry.get(se) == entry.get(se) and entry.get(se) is not None else "")


def report(results: dict[str, Any]) -> str:
    plan, analysis, m = results["plan"], results["analysis"], results["machine"]
    summary = analysis["summary"]
    train = TrainConfig.from_dict(plan["train"])
    fractions = sorted(plan["fractions"], reverse=True)
    lines = [
        "# Pruning, measured",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']}, "
        f"{m['threads']} thread(s), device {m['device']}, {m['precision']}.",
        "",
        f"Base models (one pair per seed: {', '.join(map(str, plan['seeds']))}): `{train.model}` with "
        f"`{json.dumps(train.model_overrides)}` and its parameter-matched Transformer, data `{train.data}`, "
        f"{train.tokenizer} tokenizer ({train.vocab_size}), {train.max_steps} steps of {train.tokens_per_step} tokens, "
        f"lr {train.lr:g}. Validation: the same {train.eval_batches} batches of fixed windows for every model. "
        f"Calibration rule: {plan['calibration_batches']} training batches.",
        "",
        "## Validation loss against the tokens kept (mean ± s.e. over seeds)",
        "",
    ]
    headers = ["model", "pruned", "rule", "ghost", "100%", *(f"{100 * f:g}%" for f in fractions)]
    rows = []
    for model, kinds in (("tokenformer", plan["kinds"]), ("transformer", ["ffn"])):
        unpruned = _cell(summary.get(f"{model}-unpruned"))
        for kind in kinds:
            for rule in plan["rules"]:
                for ghost in ("-ghost", "") if model == "tokenformer" else ("",):
                    cells = [_cell(summary.get(f"{model}-{kind}-{f:g}-{rule}{ghost}")) for f in fractions]
                    label = "MLP units" if model == "transformer" else kind
                    ghost_text = "—" if model == "transformer" else ("yes" if ghost else "no")
                    rows.append([model, label, rule, ghost_text, unpruned, *cells])
    lines += [runner.markdown_table(headers, rows), "", f"![loss against kept tokens]({PLOT})", ""]
    lines += [
        "## Comparisons (paired by seed; mean ± s.e. of the difference, n seeds)",
        "",
        "Across models the difference is of the loss *increase* over each model's own unpruned loss; "
        "within a model, of the losses.",
        "",
    ]
    comparison_rows = [
        [c["what"], f"{c['mean']:+.4f}" + (f" ± {c['se']:.4f}" if c["n"] > 1 else ""), c["n"]]
        for c in analysis["comparisons"]
        if "mean" in c
    ]
    lines += [runner.markdown_table(["comparison", "difference", "n"], comparison_rows), ""]
    lines += ["## Fine-tuning after pruning (calibration rule)", ""]
    lines += [
        f"{plan['finetune_steps']} steps at peak lr {plan['finetune_lr']:g} (warmup 10%, cosine to a tenth), on other "
        "training batches than pre-training's; the unpruned models fine-tuned alike are the reference. Seeds: "
        f"{', '.join(map(str, sorted({r['seed'] for r in results['finetuned']}))) or 'none run'}.",
        "",
    ]
    tune_rows = []
    for name, entry in analysis["finetune"].items():
        gap = entry["gap_after"]
        gap_text = (
            "—"
            if gap is None or name.endswith("unpruned")
            else f"{gap['mean']:+.4f}" + (f" ± {gap['se']:.4f}" if gap["n"] > 1 else "")
        )
        tune_rows.append([f"`{name}`", f"{entry['before']:.4f}", _cell(entry, "after", "after_se"), gap_text])
    lines += [
        runner.markdown_table(["model", "before fine-tuning", "after", "after − unpruned after (paired)"], tune_rows),
        "",
    ]
    speed = results["throughput"]
    lines += [
        "## Cost of each pruned shape",
        "",
        f"Parameters (non-embedding), forward FLOPs per token at seq_len {train.seq_len} (`tokenformer.flops`, ghost "
        "factors included) and inference tokens per CPU second of the measuring process (one thread, batch "
        f"{speed['batch'][0]} x {speed['batch'][1]}, median of {plan['throughput_repeats']} rounds, the models "
        "measured one after the other; ratio to the unpruned model of the same run). A ghost layer runs "
        "Pattention's plain formula, not the fused kernel.",
        "",
    ]
    base_speed = {r["model"]: r["tokens_per_s"] for r in speed["rows"] if r["kind"] == "none"}
    cost_rows = []
    for row in speed["rows"]:
        name = variant_name({**row, "rule": plan["rules"][0]})
        entry = summary.get(name, {})
        cost_rows.append(
            [
                row["model"],
                "—" if row["kind"] == "none" else f"{row['kind']} {100 * row['fraction']:g}%",
                "—" if row["model"] == "transformer" or row["kind"] == "none" else ("yes" if row["ghost"] else "no"),
                f"{entry.get('non_embedding_parameters', 0) / 1e6:.3f}M",
                f"{entry.get('forward_flops_per_token', 0) / 1e6:.2f}M",
                f"{row['tokens_per_s']:,.0f}",
                f"{row['tokens_per_s'] / base_speed[row['model']]:.2f}",
            ]
        )
    lines += [
        runner.markdown_table(
            ["model", "pruned", "ghost", "non-emb. params", "fwd FLOPs/token", "tokens per CPU s", "ratio"], cost_rows
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m tokenformer.experiments.pruning PLAN.yaml [--out_dir DIR] [--report_only]``."""
    runner.experiment_main(
        argv, "tokenformer.experiments.pruning",
        __doc__.split("\n\n")[0], "configs/experiments/pruning-cpu.yaml", load_plan, run_experiment, report,
    )  # fmt: skip


if __name__ == "__main__":
    main()
