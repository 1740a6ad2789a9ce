"""A scaling plan: the stage schedule, the arms, the learning-rate grid and seeds, and a ``train:``
section that *is* the :class:`~tokenformer.train.TrainConfig` every run shares.

Each (arm, learning rate, seed) is a run of its own; :meth:`ScalingPlan.run_config` gives its
training options: the ``train`` section with the arm's model, the rate, the seed, the plan's
total steps and the run's directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import shape_changes
from ...flops import count_parameters
from ...growth import DEPTH_POSITIONS
from ...schedule import SIZE_KEYS, TOKEN_KEYS, check_shares, stage_ends
from ...train import TrainConfig
from ...validation import dataclass_from_dict, invalid, is_int, is_number
from .. import runner

ARMS = (
    "tokenformer_grown",
    "tokenformer_scratch",
    "transformer_scratch",
    "transformer_standard",
    "transformer_grown",
    "transformer_stacked",
    "tokenformer_shaped",
)
# Every arm but ``tokenformer_shaped``, which needs a ``tokenformer_shape``.
DEFAULT_ARMS = ARMS[:-1]
GROWN_ARMS = ("tokenformer_grown", "transformer_grown", "transformer_stacked")

# What ``tokenformer_shape`` may set, and how far its non-embedding parameters may stray from
# the final stage's.
SHAPE_OPTIONS = ("d_model", "n_heads", "qkv_tokens", "proj_tokens", "ffn_tokens")
SHAPE_TOLERANCE = 0.05
# Training options each run gets from the plan rather than from the ``train`` section.
PER_RUN = ("lr", "min_lr", "seed", "max_steps", "out_dir", "resume")
STAGE_ONE = "stage-1"
LM_ONLY = "lm (the scaling experiment grows language models)"
# The first growth step's recipe and its three one-change variants.
ABLATIONS = {
    "recipe": dict(key_init="zeros", old_scale=1.0, rewarmup=False),
    "random_keys": dict(key_init="random", old_scale=1.0, rewarmup=False),
    "old_frozen": dict(key_init="zeros", old_scale=0.0, rewarmup=False),
    "lr_rewarmup": dict(key_init="zeros", old_scale=1.0, rewarmup=True),
}


def _plan_error(name: str, value: Any, allowed: str) -> ValueError:
    return invalid("plan field", name, value, allowed)


@dataclass
class Stage:
    """One stage: the TokenFormer's parameter-token counts (and depth; ``None``: the ``train``
    section's) and the optimizer steps trained at them."""

    qkv_tokens: int
    proj_tokens: int
    ffn_tokens: int
    steps: int
    n_layers: int | None = None

    def tokens(self) -> dict[str, int]:
        return {"qkv_tokens": self.qkv_tokens, "proj_tokens": self.proj_tokens, "ffn_tokens": self.ffn_tokens}

    def size(self) -> dict[str, int]:
        """The token counts and, when the stage sets it, the depth."""
        return {**self.tokens(), **({} if self.n_layers is None else {"n_layers": self.n_layers})}


# The keys of a ``schedule:`` stage besides the size.
SCHEDULE_STAGE_KEYS = ("share", "factors")
SCHEDULE_BUDGETS = ("total_steps", "total_tokens")


@dataclass
class ScalingPlan:
    """A scaling experiment. Every field is validated on construction, every run's options too.

    Args:
        out_dir: Run directory (results, report, plots and every run's checkpoints).
        stages: At least three stages, token counts (and ``n_layers``, optional) never shrinking
            and growing at each boundary. Give either ``stages`` or ``schedule``.
        schedule: The stages as shares of a budget (:func:`schedule_stages` reads it):
            ``total_steps`` or ``total_tokens`` (steps: tokens over ``train``'s tokens per step),
            and ``stages``, at least two, each with its ``share`` of the budget (shares sum to 1)
            and its size: totals of ``qkv_tokens``, ``proj_tokens``, ``ffn_tokens`` and
            ``n_layers``, or ``factors`` (a mapping of those keys to multipliers of the previous
            stage's, rounded); a key left out keeps the previous stage's value. The first stage
            gives all three token counts (its depth defaults to ``train``'s model). Sizes never
            shrink and grow at each boundary; the grown TokenFormer grows in width and depth,
            new blocks where ``depth_position`` says (``top``, the default, ``bottom`` or
            ``interleave``: see :func:`tokenformer.grow`).
        lr_grid: Peak learning rates every arm trains at; each arm keeps the rate with the best
            mean final validation loss over the seeds.
        arms: Which of the arms to run (``ARMS``): the TokenFormer grown over the stages and from
            scratch at the last stage's shape; the Transformer parameter-matched to the last stage
            from scratch, with the TokenFormer's d_model and the difference in its MLP
            (``transformer_scratch``) or of the usual shape, MLP 4 x d_model
            (``transformer_standard``, :meth:`~tokenformer.config.BlockConfig.standard_linear`);
            the matched Transformer grown over the stages by widening its MLP (Net2Net,
            ``transformer_grown``) or by stacking layers (G_stack, ``transformer_stacked``); a
            TokenFormer of another shape with the final stage's non-embedding parameters, from
            scratch (``tokenformer_shaped``, shape from ``tokenformer_shape``). Default: every
            arm but ``tokenformer_shaped``.
        seeds: Seeds every (arm, learning rate) trains with, each a run of its own (the seed
            sets the model init, the batches and the values of grown parameters).
        ablation: Run the first-growth-step ablation for every seed (needs ``tokenformer_grown``).
        tokenformer_shape: The ``tokenformer_shaped`` arm's shape: any of ``SHAPE_OPTIONS``
            (d_model, n_heads, token counts) over the final stage's model; its non-embedding
            parameters must be within 5% of the final stage's (a shape chosen by a study such as
            ``configs/studies/tokenformer-shape.yaml``).
        ablation_steps: Steps trained after the first growth in each ablation (default: stage 2's).
        min_lr_ratio: Cosine floor as a fraction of each run's peak learning rate.
        train: The options of ``tokenformer train`` every run shares; ``train.model`` and
            ``train.model_overrides`` give the shape (the stages set the token counts).
            ``lr``, ``min_lr``, ``seed``, ``max_steps``, ``out_dir`` and ``resume`` are set per run.
    """

    out_dir: str
    stages: list[Stage] | None = None
    lr_grid: list[float] = field(default_factory=list)
    schedule: dict[str, Any] | None = None
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = field(default_factory=lambda: [1337])
    ablation: bool = True
    tokenformer_shape: dict[str, int] | None = None
    ablation_steps: int | None = None
    min_lr_ratio: float = 0.1
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.train, (dict, TrainConfig)):
            raise _plan_error("train", self.train, "a mapping of tokenformer train options")
        if (self.stages is None) == (self.schedule is None):
            given = "both" if self.schedule is not None else "neither"
            raise _plan_error("stages", given, "exactly one of stages (a list) and schedule (shares of a budget)")
        if self.schedule is None:
            self.stages = [s if isinstance(s, Stage) else _stage(i, s) for i, s in enumerate(self.stages or [])]
            depths = [s.n_layers for s in self.stages]
            if None in depths and set(depths) != {None}:
                raise _plan_error("stages", depths, "n_layers in every stage or in none (the depth of each)")
            if len(self.stages) < 3:
                raise _plan_error(
                    "stages", len(self.stages), "a list of at least 3 stages (the grown arms grow at least twice)"
                )
            self._check_growing("stages")
            total_steps = self.total_steps
        else:
            total_steps = _schedule_total_steps(self.schedule, self.train)
        # The section is validated with the plan's steps: options such as warmup_steps are
        # checked against them.
        if isinstance(self.train, dict):
            self.train = _train_section(self.train, total_steps)
        else:
            self.train = dataclasses.replace(self.train, max_steps=total_steps)
        if self.schedule is not None:
            self.stages = schedule_stages(self.schedule, total_steps, self.model_config(self.train.model_overrides))
            self._check_growing("schedule.stages")
        if self.train.task != "lm":
            raise _plan_error("train.task", self.train.task, LM_ONLY)
        runner.check_lr_grid("lr_grid", self.lr_grid, "plan field")
        runner.check_seeds("seeds", self.seeds, "plan field")
        unknown = [a for a in self.arms or [] if a not in ARMS]
        if not self.arms or unknown or len(set(self.arms)) != len(self.arms):
            raise _plan_error("arms", self.arms, f"a non-empty list of distinct arms from {', '.join(ARMS)}")
        deeper = [a for a in self.arms if a in ("transformer_grown", "transformer_stacked")] if self.grows_depth else []
        if deeper:
            raise _plan_error(
                "arms",
                self.arms,
                f"no {', '.join(deeper)} with a schedule that grows n_layers (the grown Transformers are "
                "matched to the TokenFormer stage by stage at a fixed depth)",
            )
        if "transformer_stacked" in self.arms and len(set(self.stacked_depths())) < 2:
            raise _plan_error(
                "arms",
                self.arms,
                "transformer_stacked only with a final depth that grows over the stages "
                f"(depths {self.stacked_depths()}; use n_layers >= 2)",
            )
        if "transformer_stacked" in self.arms and self.train.strategy == "fsdp":
            raise _plan_error(
                "arms", self.arms, "no transformer_stacked with train.strategy: fsdp (sharded layers are not stacked)"
            )
        self._check_shape()
        if not isinstance(self.ablation, bool):
            raise _plan_error("ablation", self.ablation, "true or false")
        if self.ablation and "tokenformer_grown" not in self.arms:
            raise _plan_error("ablation", self.ablation, "false unless arms include tokenformer_grown")
        if self.ablation_steps is not None and not (is_int(self.ablation_steps) and self.ablation_steps >= 1):
            raise _plan_error("ablation_steps", self.ablation_steps, "a positive integer or null")
        if not (is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise _plan_error("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        # Every run's training options and model are checked now, before hours of training.
        for arm in self.arms:
            for overrides in self.arm_models(arm):
                self.run_config(overrides, self.lr_grid[0], self.seeds[0], self.out_dir)

    def _check_shape(self) -> None:
        shaped, arm = "tokenformer_shaped" in self.arms, "arms include tokenformer_shaped"
        if self.tokenformer_shape is None:
            if shaped:
                raise _plan_error("tokenformer_shape", None, f"a mapping of {', '.join(SHAPE_OPTIONS)} when {arm}")
            return
        if not shaped:
            raise _plan_error("tokenformer_shape", self.tokenformer_shape, f"null unless {arm}")
        shape = self.tokenformer_shape
        if not isinstance(shape, dict) or not shape or any(k not in SHAPE_OPTIONS for k in shape):
            raise _plan_error("tokenformer_shape", shape, f"a non-empty mapping of {', '.join(SHAPE_OPTIONS)}")
        for name, value in shape.items():
            if not (is_int(value) and value >= 1):
                raise _plan_error(f"tokenformer_shape.{name}", value, "a positive integer")
        final = count_parameters(self.tokenformer(self.stages[-1]), non_embedding=True)
        mine = count_parameters(self.model_config(self.arm_models("tokenformer_shaped")[0]), non_embedding=True)
        if abs(mine / final - 1) > SHAPE_TOLERANCE:
            raise _plan_error(
                "tokenformer_shape",
                shape,
                f"a shape whose non-embedding parameters are within {SHAPE_TOLERANCE:.0%} of the final stage's "
                f"{final:,} (this one has {mine:,})",
            )

    def _check_growing(self, name: str) -> None:
        for i, (old, new) in enumerate(zip(self.stages, self.stages[1:], strict=False), start=2):
            before, after = self._size(old), self._size(new)
            what = "token counts" if old.n_layers is None else "sizes"
            if any(after[k] < before[k] for k in after) or after == before:
                raise _plan_error(
                    f"{name}[{i - 1}]",
                    after,
                    f"{what} >= stage {i - 1}'s {before}, at least one larger",
                )

    @staticmethod
    def _size(stage: Stage) -> dict[str, int]:
        return stage.size() if stage.n_layers is not None else stage.tokens()

    @property
    def grows_depth(self) -> bool:
        """Whether the TokenFormer's stages differ in depth."""
        return len({s.n_layers for s in self.stages}) > 1

    # -- the schedule -------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_ends(self) -> list[int]:
        ends, step = [], 0
        for stage in self.stages:
            step += stage.steps
            ends.append(step)
        return ends

    def model_config(self, model_overrides: dict[str, Any], vocab_size: int | None = None) -> Any:
        """The model of ``train.model`` with ``model_overrides`` (in place of ``train``'s)."""
        return dataclasses.replace(self.train, model_overrides=model_overrides, resume=None).model_config(vocab_size)

    def tokenformer(self, stage: Stage) -> Any:
        """The TokenFormer of ``stage``."""
        return self.model_config({**self.train.model_overrides, **stage.size()})

    def arm_models(self, arm: str) -> list[dict[str, Any]]:
        """``model_overrides`` of each stage of ``arm`` (one entry for a from-scratch arm)."""
        base = self.train.model_overrides
        stages = self.stages if arm in GROWN_ARMS else self.stages[-1:]
        if arm == "tokenformer_shaped":
            return [{**base, **stages[-1].size(), **(self.tokenformer_shape or {})}]
        if arm.startswith("tokenformer"):
            return [{**base, **s.size()} for s in stages]
        if arm == "transformer_standard":
            tokenformer = self.tokenformer(stages[-1])
            return [{**base, **stages[-1].size(), **shape_changes(tokenformer.standard_linear(), tokenformer)}]
        matched = [
            {
                **base,
                **({} if s.n_layers is None else {"n_layers": s.n_layers}),
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

    @property
    def depth_position(self) -> str:
        """Where the grown TokenFormer's new blocks go."""
        return (self.schedule or {}).get("depth_position", "top")

    def arm_schedule(self, arm: str) -> list[tuple[dict[str, int], int]]:
        """(token counts or depth to grow to, last step) of each stage of ``arm``."""
        if arm not in GROWN_ARMS:
            return [({}, self.total_steps)]
        models = self.arm_models(arm)
        if arm == "transformer_stacked":
            return [({"n_layers": m["n_layers"]}, end) for m, end in zip(models, self.stage_ends(), strict=True)]
        kinds = ("qkv_tokens", "proj_tokens", "ffn_tokens") if arm.startswith("tokenformer") else ("ffn_tokens",)
        if arm == "tokenformer_grown" and self.grows_depth:
            kinds = (*kinds, "n_layers")
        return [({k: m[k] for k in kinds}, end) for m, end in zip(models, self.stage_ends(), strict=True)]

    # -- runs ---------------------------------------------------------------------------------

    def run_dir(self, arm: str, lr: float, seed: int) -> Path:
        return Path(self.out_dir) / "runs" / arm / runner.lr_name(lr) / runner.seed_name(seed)

    def ablation_dir(self, lr: float, seed: int) -> Path:
        # Under the learning rate: a wider grid that moves the best rate starts a fresh ablation.
        return Path(self.out_dir) / "ablation" / runner.lr_name(lr) / runner.seed_name(seed)

    def run_config(
        self, model_overrides: dict[str, Any], lr: float, seed: int, out_dir: str | Path, **changes: Any
    ) -> TrainConfig:
        """The ``train`` section for one run: its model, peak rate, seed and directory."""
        options = {
            **self.train.to_dict(),
            "model_overrides": model_overrides,
            "max_steps": self.total_steps,
            "lr": lr,
            "min_lr": lr * self.min_lr_ratio,
            "seed": seed,
            "out_dir": str(out_dir),
            **changes,
        }
        return TrainConfig.from_dict(options)

    def jobs(self) -> list[dict[str, Any]]:
        """Every (arm, learning rate, seed), seeds outermost: a plan stopped early has whole seeds."""
        return [{"arm": arm, "lr": lr, "seed": seed} for seed in self.seeds for arm in self.arms for lr in self.lr_grid]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"] = {k: v for k, v in self.train.to_dict().items() if k not in PER_RUN}
        if self.schedule is not None:  # the stages are derived from it
            del data["stages"]
        else:
            del data["schedule"]
            data["stages"] = [{k: v for k, v in stage.items() if v is not None} for stage in data["stages"]]
        return data

    @classmethod
    def check_layout(cls, data: dict[str, Any]) -> None:
        """Refuse a plan written before plans had a ``train:`` section, saying what goes where."""
        own = {f.name for f in dataclasses.fields(cls)}
        flat = sorted(k for k in data if k not in own and k in {f.name for f in dataclasses.fields(TrainConfig)})
        if flat:
            raise ValueError(
                f"plan fields {flat} are training options: a plan's training options go in its `train:` section "
                f"(a tokenformer train config), e.g. `train: {{{flat[0]}: ...}}`"
                + ("; `seed: N` became `seeds: [N]`" if "seed" in flat else "")
                + " (configs/scaling/*.yaml show the layout)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScalingPlan:
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a mapping of plan fields, got {type(data).__name__}")
        cls.check_layout(data)
        missing = [name for name in ("out_dir", "lr_grid") if name not in data]
        if "stages" not in data and "schedule" not in data:
            missing.append("stages (or schedule)")
        if missing:
            raise ValueError(f"plan is missing required field(s) {missing}")
        return dataclass_from_dict(cls, data, "plan field")


def _train_section(data: dict[str, Any], max_steps: int) -> TrainConfig:
    # Defaults pass: the command line fills every option of the section in.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    per_run = {k: data[k] for k in PER_RUN if k in data and data[k] != defaults[k]}
    if per_run:
        raise _plan_error(
            "train",
            per_run,
            f"training options other than {', '.join(PER_RUN)}: every run gets them from the plan "
            "(lr_grid, min_lr_ratio, seeds, stages, out_dir)",
        )
    if data.get("task", "lm") != "lm":
        raise _plan_error("train.task", data["task"], LM_ONLY)
    return TrainConfig.from_dict({**data, "max_steps": max_steps})


def _stage(index: int, data: Any) -> Stage:
    names = [*TOKEN_KEYS, "steps"]
    if not isinstance(data, dict) or sorted(set(data) - {"n_layers"}) != sorted(names):
        raise _plan_error(f"stages[{index}]", data, f"a mapping with exactly {', '.join(names)} (and n_layers)")
    for name, value in data.items():
        if not (is_int(value) and value >= 1) and not (name == "n_layers" and value is None):
            raise _plan_error(f"stages[{index}].{name}", value, "a positive integer")
    return Stage(**data)


def _schedule_total_steps(schedule: Any, train: dict[str, Any] | TrainConfig) -> int:
    """The step budget of a ``schedule:`` section: ``total_steps``, or ``total_tokens`` over the
    ``train`` section's tokens per step."""
    keys = set(schedule) - {"depth_position"} if isinstance(schedule, dict) else set()
    if keys not in ({budget, "stages"} for budget in SCHEDULE_BUDGETS):
        raise _plan_error(
            "schedule",
            schedule,
            f"a mapping with stages, one of {', '.join(SCHEDULE_BUDGETS)} (a budget) and optionally depth_position",
        )
    if schedule.get("depth_position", "top") not in DEPTH_POSITIONS:
        raise _plan_error("schedule.depth_position", schedule["depth_position"], ", ".join(DEPTH_POSITIONS))
    if "total_steps" in schedule:
        steps = schedule["total_steps"]
        if not (is_int(steps) and steps >= 1):
            raise _plan_error("schedule.total_steps", steps, "a positive integer")
        return steps
    tokens = schedule["total_tokens"]
    # The section's batch shape (checked against the budget's steps once they are known).
    options = train if isinstance(train, TrainConfig) else _train_section(train, 2**62)
    per_step = options.tokens_per_step
    if not (is_int(tokens) and tokens >= per_step):
        raise _plan_error(
            "schedule.total_tokens", tokens, f"an integer >= the tokens of one step ({per_step}, train's batch)"
        )
    return tokens // per_step


def schedule_stages(schedule: dict[str, Any], total_steps: int, model: Any) -> list[Stage]:
    """The stages of a ``schedule:`` section (see :class:`ScalingPlan`) over ``total_steps``;
    ``model``: the ``train`` section's model config (the first stage's default depth)."""
    stages = schedule["stages"]
    if not isinstance(stages, list) or len(stages) < 2:
        raise _plan_error("schedule.stages", stages, "a list of at least 2 stages")
    shares = []
    for i, stage in enumerate(stages):
        where = f"schedule.stages[{i}]"
        allowed = f"a mapping with share and sizes ({', '.join(SIZE_KEYS)}) or factors"
        known = {*SCHEDULE_STAGE_KEYS, *SIZE_KEYS}
        if not isinstance(stage, dict) or "share" not in stage or set(stage) - known:
            raise _plan_error(where, stage, allowed)
        shares.append(stage["share"])
    check_shares(shares, "plan field schedule.stages[*].share")
    ends = stage_ends(shares, total_steps, "plan field schedule")
    depths = any("n_layers" in s or "n_layers" in (s.get("factors") or {}) for s in stages)
    size: dict[str, float] = {} if not depths else {"n_layers": model.n_layers}
    out = []
    for i, (stage, end) in enumerate(zip(stages, ends, strict=True)):
        where = f"schedule.stages[{i}]"
        factors = stage.get("factors") or {}
        if not isinstance(factors, dict) or set(factors) - set(SIZE_KEYS):
            raise _plan_error(f"{where}.factors", factors, f"a mapping from {', '.join(SIZE_KEYS)} to numbers")
        both = sorted(set(factors) & set(stage))
        if both:
            raise _plan_error(where, stage, f"a size or a factor for each key, not both (both for {both})")
        if i == 0 and (factors or set(TOKEN_KEYS) - set(stage)):
            raise _plan_error(where, stage, f"the first stage with totals of {', '.join(TOKEN_KEYS)} and no factors")
        for key in SIZE_KEYS:
            if key in stage:
                if not (is_int(stage[key]) and stage[key] >= 1):
                    raise _plan_error(f"{where}.{key}", stage[key], "a positive integer")
                size[key] = stage[key]
            elif key in factors:
                if not (is_number(factors[key]) and factors[key] >= 1):
                    raise _plan_error(f"{where}.factors.{key}", factors[key], "a number >= 1 (sizes never shrink)")
                size[key] = round(size[key] * factors[key])
        start = 0 if i == 0 else ends[i - 1]
        out.append(Stage(**{k: int(v) for k, v in size.items()}, steps=end - start))
    return out


def load_plan(path: str | Path, out_dir: str | None = None) -> ScalingPlan:
    """Read and validate a YAML plan; ``out_dir`` overrides the plan's."""
    return ScalingPlan.from_dict(runner.read_plan(path, out_dir))
