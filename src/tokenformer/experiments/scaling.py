"""Incremental scaling, measured: grown TokenFormer against training from scratch, Net2Net and G_stack.

A plan (``configs/scaling/*.yaml``) names a stage schedule of parameter-token counts and a
learning-rate grid. Every arm trains on the same data, tokenizer, sequence length, batches (a
pure function of seed and step) and validation windows, and sees the same number of tokens:

- ``tokenformer_grown``: the first stage's TokenFormer, grown at each stage boundary by appending
  zero-key parameter tokens (function preserving), AdamW's moments carried over;
- ``tokenformer_scratch``: the final stage's TokenFormer from scratch for the whole budget;
- ``transformer_scratch``: the Transformer parameter-matched to the final stage;
- ``transformer_grown``: that Transformer's twin, widened at each boundary (Net2Net-style MLP
  widening, parameter-matched to the TokenFormer of each stage);
- ``transformer_stacked``: the final Transformer's shape grown in depth instead (G_stack: copies
  of the trained layers stacked on top; not function preserving), each stage as deep as the
  TokenFormer stage's share of the final non-embedding parameters allows (at least one layer).

Each (arm, learning rate) is a resumable training run in ``<out_dir>/runs/<arm>/lr-<lr>``; a run
with a ``result.json`` is finished and skipped. Outputs: ``results.json``, ``report.md``,
``loss_vs_flops.png`` and ``loss_vs_wall.png`` in ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import io
from ..config import TokenformerConfig
from ..flops import count_parameters
from ..growth import TokenUpdateScale
from ..train import TrainConfig, Trainer, lr_at
from ..train.metrics import standard_error
from ..validation import dataclass_from_dict, invalid, is_int, is_number

ARMS = ("tokenformer_grown", "tokenformer_scratch", "transformer_scratch", "transformer_grown", "transformer_stacked")
GROWN_ARMS = ("tokenformer_grown", "transformer_grown", "transformer_stacked")
# (arm that should reach the target, arm whose final validation loss is the target)
COMPARISONS = (
    ("tokenformer_grown", "tokenformer_scratch"),
    ("tokenformer_grown", "transformer_scratch"),
    ("tokenformer_grown", "transformer_grown"),
    ("tokenformer_grown", "transformer_stacked"),
    ("transformer_grown", "transformer_scratch"),
    ("transformer_stacked", "transformer_scratch"),
)
EQUAL_COMPUTE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# The first growth step's recipe and its three one-change variants.
ABLATIONS = {
    "recipe": dict(key_init="zeros", old_scale=1.0, rewarmup=False),
    "random_keys": dict(key_init="random", old_scale=1.0, rewarmup=False),
    "old_frozen": dict(key_init="zeros", old_scale=0.0, rewarmup=False),
    "lr_rewarmup": dict(key_init="zeros", old_scale=1.0, rewarmup=True),
}
ABLATION_LABELS = {
    "recipe": "zero keys, old tokens trained, schedule continued (the recipe)",
    "random_keys": "random new keys",
    "old_frozen": "old tokens frozen (old_scale=0)",
    "lr_rewarmup": "learning rate warmed up again after growth",
}
RESULT = "result.json"
STAGE_ONE = "stage-1"


def _plan_error(name: str, value: Any, allowed: str) -> ValueError:
    return invalid("plan field", name, value, allowed)


@dataclass
class Stage:
    """One stage: the TokenFormer's parameter-token counts and the optimizer steps trained at them."""

    qkv_tokens: int
    proj_tokens: int
    ffn_tokens: int
    steps: int

    def tokens(self) -> dict[str, int]:
        return {"qkv_tokens": self.qkv_tokens, "proj_tokens": self.proj_tokens, "ffn_tokens": self.ffn_tokens}


@dataclass
class ScalingPlan:
    """A scaling experiment. Every field is validated on construction.

    Args:
        out_dir: Run directory (results, report, plots and every arm's checkpoints).
        stages: At least three stages, token counts never shrinking and growing at each boundary.
        lr_grid: Peak learning rates tried for every arm; each arm keeps its best (final val loss).
        arms: Which of the four arms to run.
        model: Preset giving the shared shape (layers, d_model, heads); the stages set the tokens.
        model_overrides: Other TokenformerConfig fields to change on the preset.
        ablation: Run the first-growth-step ablation (needs ``tokenformer_grown``).
        ablation_steps: Steps trained after the first growth in each ablation (default: stage 2's).
        min_lr_ratio: Cosine floor as a fraction of the peak learning rate.
        The other fields are the :class:`~tokenformer.train.TrainConfig` options of the same name,
        shared by every run.
    """

    out_dir: str
    stages: list[Stage]
    lr_grid: list[float]
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    model: str = "cpu-0.3M"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    ablation: bool = True
    ablation_steps: int | None = None
    data: str | list[str] = "kjv"
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    cache_dir: str | None = None
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    seed: int = 1337
    eval_interval: int = 50
    eval_batches: int = 16
    ckpt_interval: int = 100

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else _stage(i, s) for i, s in enumerate(self.stages or [])]
        if len(self.stages) < 3:
            raise _plan_error(
                "stages", len(self.stages), "a list of at least 3 stages (the grown arms grow at least twice)"
            )
        for i, (old, new) in enumerate(zip(self.stages, self.stages[1:], strict=False), start=2):
            shrinking = [k for k in new.tokens() if new.tokens()[k] < old.tokens()[k]]
            if shrinking or new.tokens() == old.tokens():
                raise _plan_error(
                    f"stages[{i - 1}]",
                    new.tokens(),
                    f"token counts >= stage {i - 1}'s {old.tokens()}, at least one larger",
                )
        if (
            not isinstance(self.lr_grid, list)
            or not self.lr_grid
            or not all(is_number(v) and v > 0 for v in self.lr_grid)
        ):
            raise _plan_error("lr_grid", self.lr_grid, "a non-empty list of learning rates > 0")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise _plan_error("lr_grid", self.lr_grid, "distinct learning rates")
        unknown = [a for a in self.arms or [] if a not in ARMS]
        if not self.arms or unknown or len(set(self.arms)) != len(self.arms):
            raise _plan_error("arms", self.arms, f"a non-empty list of distinct arms from {', '.join(ARMS)}")
        if "transformer_stacked" in self.arms and len(set(self.stacked_depths())) < 2:
            raise _plan_error(
                "arms",
                self.arms,
                "transformer_stacked only with a final depth that grows over the stages "
                f"(depths {self.stacked_depths()}; use n_layers >= 2)",
            )
        if self.ablation and "tokenformer_grown" not in self.arms:
            raise _plan_error("ablation", self.ablation, "false unless arms include tokenformer_grown")
        if self.ablation_steps is not None and not (is_int(self.ablation_steps) and self.ablation_steps >= 1):
            raise _plan_error("ablation_steps", self.ablation_steps, "a positive integer or null")
        if not (is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise _plan_error("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        # Every run's training options and model are checked now, before hours of training.
        for arm in self.arms:
            for overrides in self.arm_models(arm):
                self.train_config(overrides, self.lr_grid[0], self.out_dir)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_ends(self) -> list[int]:
        ends, step = [], 0
        for stage in self.stages:
            step += stage.steps
            ends.append(step)
        return ends

    def tokenformer(self, stage: Stage) -> TokenformerConfig:
        return TokenformerConfig.from_preset(self.model, **{**self.model_overrides, **stage.tokens()})

    def arm_models(self, arm: str) -> list[dict[str, Any]]:
        """``model_overrides`` of each stage of ``arm`` (one entry for a from-scratch arm)."""
        stages = self.stages if arm in GROWN_ARMS else self.stages[-1:]
        if arm.startswith("tokenformer"):
            return [{**self.model_overrides, **s.tokens()} for s in stages]
        matched = [
            {
                **self.model_overrides,
                "projection": "linear",
                "ffn_tokens": self.tokenformer(s).parameter_matched_linear().ffn_tokens,
            }
            for s in stages
        ]
        if arm == "transformer_stacked":
            return [{**matched[-1], "n_layers": n} for n in self.stacked_depths()]
        return matched

    def stacked_depths(self) -> list[int]:
        """Layers of each ``transformer_stacked`` stage: the final depth times the TokenFormer
        stage's fraction of the final non-embedding parameters, rounded, at least 1."""
        sizes = [count_parameters(self.tokenformer(s), non_embedding=True) for s in self.stages]
        layers = self.tokenformer(self.stages[-1]).n_layers
        return [max(1, round(layers * size / sizes[-1])) for size in sizes]

    def schedule(self, arm: str) -> list[tuple[dict[str, int], int]]:
        """(token counts or depth to grow to, last step) of each stage of ``arm``."""
        if arm not in GROWN_ARMS:
            return [({}, self.total_steps)]
        if arm == "transformer_stacked":
            return [
                ({"n_layers": m["n_layers"]}, end)
                for m, end in zip(self.arm_models(arm), self.stage_ends(), strict=True)
            ]
        kinds = ("qkv_tokens", "proj_tokens", "ffn_tokens") if arm.startswith("tokenformer") else ("ffn_tokens",)
        return [({k: m[k] for k in kinds}, end) for m, end in zip(self.arm_models(arm), self.stage_ends(), strict=True)]

    def train_config(
        self, model_overrides: dict[str, Any], lr: float, out_dir: str | Path, **changes: Any
    ) -> TrainConfig:
        options = dict(
            model=self.model,
            model_overrides=model_overrides,
            data=self.data,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            val_fraction=self.val_fraction,
            cache_dir=self.cache_dir,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            max_steps=self.total_steps,
            lr=lr,
            min_lr=lr * self.min_lr_ratio,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            precision=self.precision,
            compile=self.compile,
            device=self.device,
            threads=self.threads,
            seed=self.seed,
            out_dir=str(out_dir),
            eval_interval=self.eval_interval,
            eval_batches=self.eval_batches,
            ckpt_interval=self.ckpt_interval,
            keep_last=2,
            progress=False,
            log_interval=self.eval_interval,
        )
        return TrainConfig(**{**options, **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScalingPlan:
        missing = [name for name in ("out_dir", "stages", "lr_grid") if name not in data]
        if missing:
            raise ValueError(f"plan is missing required field(s) {missing}")
        return dataclass_from_dict(cls, data, "plan field")


def _stage(index: int, data: Any) -> Stage:
    names = [f.name for f in dataclasses.fields(Stage)]
    if not isinstance(data, dict) or sorted(data) != sorted(names):
        raise _plan_error(f"stages[{index}]", data, f"a mapping with exactly {', '.join(names)}")
    for name, value in data.items():
        if not (is_int(value) and value >= 1):
            raise _plan_error(f"stages[{index}].{name}", value, "a positive integer")
    return Stage(**data)


def load_plan(path: str | Path, out_dir: str | None = None) -> ScalingPlan:
    """Read and validate a YAML plan; ``out_dir`` overrides the plan's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"plan {path} must be a YAML mapping of plan fields, got {type(data).__name__}")
    if out_dir is not None:
        data["out_dir"] = out_dir
    return ScalingPlan.from_dict(data)


# -- running ------------------------------------------------------------------------------------


def _lr_name(lr: float) -> str:
    return f"lr-{lr:g}"


def _read_result(directory: Path) -> dict[str, Any] | None:
    path = directory / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def _at_size(model: torch.nn.Module, size: dict[str, int]) -> bool:
    if "n_layers" in size:
        return model.config.n_layers == size["n_layers"]
    current = model.config.tokens(0)
    return all(current[k.removesuffix("_tokens")] == v for k, v in size.items())


def _growth_generator(seed: int, stage: int) -> torch.Generator:
    # New values are random: a fixed generator per stage makes a regrowth after a resume identical.
    return torch.Generator().manual_seed(seed * 1000 + stage)


def run_arm(plan: ScalingPlan, arm: str, lr: float, directory: Path) -> dict[str, Any]:
    """Train one (arm, learning rate), resuming from its latest checkpoint; its stored result if finished."""
    done = _read_result(directory)
    if done is not None:
        return done
    schedule = plan.schedule(arm)
    trainer = Trainer(plan.train_config(plan.arm_models(arm)[0], lr, directory, resume="auto"))
    try:
        for index, (size, end) in enumerate(schedule):
            if trainer.state.step >= end:
                continue
            if size and not _at_size(trainer.model, size):
                if "n_layers" in size:
                    trainer.stack(size["n_layers"])
                else:
                    trainer.grow(**size, generator=_growth_generator(plan.seed, index))
                trainer.evaluate()  # right after growth: equals the loss before it (unless stacked)
            trainer.fit(end)
            if index == 0 and len(schedule) > 1 and not (directory / STAGE_ONE).exists():
                trainer.save_checkpoint(directory / STAGE_ONE)  # the ablation's common start
    finally:
        trainer.close()
    state = trainer.state
    result = {
        "arm": arm,
        "lr": lr,
        "curve": state.val_history,
        "growth_steps": [g["step"] for g in state.growth_history],
        "stage_parameters": [
            count_parameters(plan.train_config(m, lr, directory).model_config(trainer.model.config.vocab_size))
            for m in plan.arm_models(arm)
        ],
        "parameters": count_parameters(trainer.model.config),
        "tokens": state.tokens,
        "flops": state.flops,
        "wall_time": state.wall_time,
        "final_val_loss": state.val_history[-1]["val_loss"],
        "final_val_loss_se": state.val_history[-1]["val_loss_se"],
    }
    io.atomic_write_text(directory / RESULT, json.dumps(result, indent=1) + "\n")
    return result


def run_ablation(plan: ScalingPlan, lr: float, source: Path, directory: Path) -> dict[str, dict[str, Any]]:
    """The first growth step, varied one change at a time, each from the same stage-1 checkpoint.

    A variant without a stored result starts again from the stage-1 checkpoint (they are short).
    """
    tokens = plan.schedule("tokenformer_grown")[1][0]
    start = plan.stage_ends()[0]
    steps = plan.ablation_steps or plan.stages[1].steps
    results = {}
    for name, variant in ABLATIONS.items():
        out = directory / name
        done = _read_result(out)
        if done is not None:
            results[name] = done
            continue
        if out.exists():
            shutil.rmtree(out)
        config = plan.train_config(
            plan.arm_models("tokenformer_grown")[0], lr, out, resume=str(source), ckpt_interval=plan.total_steps
        )
        trainer = Trainer(config)
        try:
            before = trainer.state.val_history[-1]
            record = trainer.grow(**tokens, key_init=variant["key_init"], generator=_growth_generator(plan.seed, 1))
            after = trainer.evaluate()
            if variant["old_scale"] != 1.0:
                TokenUpdateScale(trainer.optimizer, record, old_scale=variant["old_scale"])
            if variant["rewarmup"]:
                rest = dataclasses.replace(config, max_steps=plan.total_steps - start)
                trainer.lr_schedule = lambda step, rest=rest: lr_at(step - start, rest)
            trainer.fit(start + steps)
        finally:
            trainer.close()
        final = trainer.state.val_history[-1]
        results[name] = {
            **variant,
            "steps": steps,
            "loss_before_growth": before["val_loss"],
            "loss_after_growth": after["val_loss"],
            "final_val_loss": final["val_loss"],
            "final_val_loss_se": final["val_loss_se"],
            "curve": trainer.state.val_history,
        }
        io.atomic_write_text(out / RESULT, json.dumps(results[name], indent=1) + "\n")
    return results


def run_plan(plan: ScalingPlan, command: str = "") -> dict[str, Any]:
    """Run (or continue) every arm and learning rate, the ablation, then write the outputs."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))
    runs: dict[str, dict[str, Any]] = {}
    for arm in plan.arms:
        for lr in plan.lr_grid:
            print(f"== {arm}, lr {lr:g}", flush=True)
            runs.setdefault(arm, {})[_lr_name(lr)] = run_arm(plan, arm, lr, out / "runs" / arm / _lr_name(lr))
    best = {arm: min(results.values(), key=lambda r: r["final_val_loss"]) for arm, results in runs.items()}
    ablation = None
    if plan.ablation:
        lr = best["tokenformer_grown"]["lr"]
        print(f"== ablation of the first growth step, lr {lr:g}", flush=True)
        source = out / "runs" / "tokenformer_grown" / _lr_name(lr) / STAGE_ONE
        # Under the learning rate: a wider grid that moves the best rate starts a fresh ablation.
        ablation = run_ablation(plan, lr, source, out / "ablation" / _lr_name(lr))
    results = {
        "command": command,
        "machine": machine(plan),
        "plan": plan.to_dict(),
        "runs": runs,
        "best_lr": {arm: r["lr"] for arm, r in best.items()},
        "comparisons": comparisons(best),
        "paired_differences": paired_differences(best),
        "equal_compute": equal_compute(best),
        "ablation": ablation,
    }
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot_curves(best, out)
    io.atomic_write_text(out / "report.md", report(results))
    return results


def machine(plan: ScalingPlan) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": plan.threads or torch.get_num_threads(),
        "device": plan.device,
        "precision": plan.precision,
    }
    if torch.cuda.is_available() and plan.device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- analysis -----------------------------------------------------------------------------------


def flops_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """FLOPs at which the validation loss first reaches ``target``, linear between evaluations."""
    previous = None
    for point in curve:
        if point["val_loss"] <= target:
            if previous is None:
                return point["flops"]
            fraction = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous["flops"] + fraction * (point["flops"] - previous["flops"])
        previous = point
    return None


def loss_at_flops(curve: list[dict[str, float]], flops: float) -> float | None:
    """Validation loss at ``flops``, linear between evaluations; None outside the curve."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a["flops"] <= flops <= b["flops"]:
            if b["flops"] == a["flops"]:
                return b["val_loss"]
            return a["val_loss"] + (flops - a["flops"]) / (b["flops"] - a["flops"]) * (b["val_loss"] - a["val_loss"])
    return None


def growth_jumps(result: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(step, validation loss before, right after) of each growth of a run: the two evaluations
    recorded at the growth step."""
    jumps = []
    for step in result["growth_steps"]:
        points = [p for p in result["curve"] if p["step"] == step]
        if len(points) >= 2:
            jumps.append((step, points[0]["val_loss"], points[1]["val_loss"]))
    return jumps


def paired_difference(arm: dict[str, Any], baseline: dict[str, Any]) -> tuple[float, float] | None:
    """Mean and standard error of ``arm - baseline`` final validation loss, batch by batch.

    Both were evaluated on the same windows, so the batch-to-batch spread of the data cancels
    and only the models' difference is left: far less noisy than either loss's own s.e.
    """
    a, b = arm["curve"][-1].get("val_batch_losses"), baseline["curve"][-1].get("val_batch_losses")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return sum(diffs) / len(diffs), standard_error(diffs)


def comparisons(best: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for arm, baseline in COMPARISONS:
        if arm not in best or baseline not in best:
            continue
        target = best[baseline]["final_val_loss"]
        reached = flops_to_reach(best[arm]["curve"], target)
        rows.append(
            {
                "arm": arm,
                "baseline": baseline,
                "target_val_loss": target,
                "flops_to_target": reached,
                "baseline_flops": best[baseline]["flops"],
                "ratio": None if reached is None else reached / best[baseline]["flops"],
            }
        )
    return rows


def paired_differences(best: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of arms: final validation loss difference and its paired standard error."""
    arms, rows = list(best), []
    for i, arm in enumerate(arms):
        for baseline in arms[i + 1 :]:
            paired = paired_difference(best[arm], best[baseline])
            if paired is not None:
                rows.append({"arm": arm, "baseline": baseline, "difference": paired[0], "se": paired[1]})
    return rows


def equal_compute(best: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    budget = min(r["flops"] for r in best.values())
    return [
        {
            "flops": f * budget,
            "fraction": f,
            "val_loss": {arm: loss_at_flops(r["curve"], f * budget) for arm, r in best.items()},
        }
        for f in EQUAL_COMPUTE_FRACTIONS
    ]


# -- outputs ------------------------------------------------------------------------------------


def plot_curves(best: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (
        ("flops", "cumulative training FLOPs", "loss_vs_flops.png"),
        ("wall_time", "training wall time (s)", "loss_vs_wall.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, result in best.items():
            curve = result["curve"]
            (line,) = ax.plot(
                [p[key] for p in curve],
                [p["val_loss"] for p in curve],
                "o-",
                markersize=3,
                label=f"{arm} (lr {result['lr']:g})",
            )
            grown = [p for p in curve if p["step"] in result["growth_steps"]]
            ax.plot(
                [p[key] for p in grown],
                [p["val_loss"] for p in grown],
                "s",
                color=line.get_color(),
                markersize=7,
                fillstyle="none",
            )
        if key == "flops":
            ax.set_xscale("log")
        ax.set_xlabel(label + ("; squares: growth" if key == "flops" else ""))
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / name
        io.atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(value: float | None, spec: str = ".4f", missing: str = "not reached") -> str:
    return missing if value is None else format(value, spec)


def main_table(results: dict[str, Any]) -> str:
    lines = [
        "| arm | best lr | parameters | final val loss | ± s.e. | perplexity | cumulative FLOPs "
        "| train wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, lr in results["best_lr"].items():
        r = results["runs"][arm][_lr_name(lr)]
        params = " → ".join(f"{p / 1e6:.3g}M" for p in r["stage_parameters"])
        lines.append(
            f"| {arm} | {lr:g} | {params} | {r['final_val_loss']:.4f} | {r['final_val_loss_se']:.4f} | "
            f"{math.exp(r['final_val_loss']):.2f} | {r['flops']:.3e} | {r['wall_time']:.0f} |"
        )
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    plan = results["plan"]
    m = results["machine"]
    tokens_per_step = plan["batch_size"] * plan["grad_accum"] * plan["seq_len"]
    total_steps = sum(s["steps"] for s in plan["stages"])
    out = [
        "# Incremental scaling, measured",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']}, "
        f"{m['threads']} thread(s), device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, {m['precision']}.",
        "",
        f"Data `{plan['data']}`, {plan['tokenizer']} tokenizer ({plan['vocab_size']}), seq_len {plan['seq_len']}, "
        f"{tokens_per_step} tokens per step, {total_steps} steps ({total_steps * tokens_per_step:,} tokens) "
        f"for every arm, seed {plan['seed']}. Validation: the same {plan['eval_batches']} batches of fixed windows "
        "for every arm and "
        f"evaluation. Stages (TokenFormer tokens qkv/proj/ffn, steps): "
        + ", ".join(f"{s['qkv_tokens']}/{s['proj_tokens']}/{s['ffn_tokens']} × {s['steps']}" for s in plan["stages"])
        + ". FLOPs: `tokenformer.flops` (matmuls, 3 × forward), summed over every step of every stage. "
        "Wall time: training steps only (validation and checkpoints excluded).",
        "",
        "## Final validation loss (each arm at its best learning rate)",
        "",
        main_table(results),
        "",
        "s.e.: standard error of the validation loss over the evaluation batches. Every arm is "
        "evaluated on the same windows, so differences between arms are judged by the paired "
        "standard error below, which is smaller.",
        "",
        "## Differences of final validation loss (paired over the same validation batches)",
        "",
        "Mean over the evaluation batches of (arm − other arm) batch loss, and the standard error of "
        "that mean; |difference| above about twice the s.e. is more than evaluation noise. (A "
        "different seed also moves the losses; this s.e. covers the evaluation batches only.)",
        "",
        "| arm | other arm | difference | paired s.e. | difference / s.e. |",
        "|---|---|---|---|---|",
    ]
    for d in results.get("paired_differences", []):
        out.append(
            f"| {d['arm']} | {d['baseline']} | {d['difference']:+.4f} | {d['se']:.4f} | "
            f"{d['difference'] / d['se'] if d['se'] > 0 else math.inf:+.1f} |"
        )
    out += [
        "",
        "## Validation loss at each growth step",
        "",
        "| arm | step | before growth | right after | change |",
        "|---|---|---|---|---|",
    ]
    for arm, lr in results["best_lr"].items():
        for step, before, after in growth_jumps(results["runs"][arm][_lr_name(lr)]):
            out.append(f"| {arm} | {step} | {before:.4f} | {after:.4f} | {after - before:+.4f} |")
    out += [
        "",
        "Appending parameter tokens with zero keys and Net2Net widening keep the function (change 0 "
        "up to float rounding); G_stack's copies do not.",
        "",
        "## FLOPs to target",
        "",
        "Compute at which an arm's validation loss first reaches the baseline's final validation loss "
        "(linear between evaluations), divided by the baseline's total compute. Below 1: the arm needs "
        "less compute for the baseline's quality.",
        "",
        "| arm | baseline | target val loss | arm FLOPs to target | baseline FLOPs | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["comparisons"]:
        out.append(
            f"| {c['arm']} | {c['baseline']} | {c['target_val_loss']:.4f} | {_fmt(c['flops_to_target'], '.3e')} | "
            f"{c['baseline_flops']:.3e} | {_fmt(c['ratio'], '.3f')} |"
        )
    arms = list(results["best_lr"])
    out += [
        "",
        "## Validation loss at equal compute",
        "",
        "Interpolated between evaluations, at fractions of the smallest arm budget; "
        "— before an arm's first evaluation.",
        "",
        "| FLOPs | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for row in results["equal_compute"]:
        out.append(
            f"| {row['flops']:.3e} ({row['fraction']:.0%}) | "
            + " | ".join(_fmt(row["val_loss"][a], ".4f", "—") for a in arms)
            + " |"
        )
    out += [
        "",
        "## Learning-rate grid (final validation loss)",
        "",
        "| arm | " + " | ".join(f"lr {lr:g}" for lr in plan["lr_grid"]) + " |",
        "|---|" + "---|" * len(plan["lr_grid"]),
    ]
    for arm in arms:
        out.append(
            f"| {arm} | "
            + " | ".join(f"{results['runs'][arm][_lr_name(lr)]['final_val_loss']:.4f}" for lr in plan["lr_grid"])
            + " |"
        )
    if results["ablation"]:
        ablation = results["ablation"]
        steps = next(iter(ablation.values()))["steps"]
        out += [
            "",
            "## Ablation of the first growth step (from the same stage-1 checkpoint, "
            f"lr {results['best_lr']['tokenformer_grown']:g}, {steps} steps after growth)",
            "",
            "| variant | val loss before growth | right after | after training | ± s.e. |",
            "|---|---|---|---|---|",
        ]
        for name, a in ablation.items():
            out.append(
                f"| {ABLATION_LABELS[name]} | {a['loss_before_growth']:.4f} | {a['loss_after_growth']:.4f} | "
                f"{a['final_val_loss']:.4f} | {a['final_val_loss_se']:.4f} |"
            )
    out += [
        "",
        "## Plots",
        "",
        "![validation loss against FLOPs](loss_vs_flops.png)",
        "",
        "![validation loss against wall time](loss_vs_wall.png)",
        "",
    ]
    return "\n".join(out)
