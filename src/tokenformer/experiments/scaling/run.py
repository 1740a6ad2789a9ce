"""Running a scaling plan: every (arm, learning rate, seed) and the ablation of the first growth
step, each a resumable run with a stored result; in worker processes, or under ``torchrun`` with
the plan's ``train.strategy`` (every rank runs every run together; rank 0 writes the files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ... import io
from ...flops import count_parameters
from ...growth import TokenUpdateScale
from ...schedule import growth_generator
from ...train import Trainer, lr_at
from ...train.parallel import Distributed, barrier, broadcast_object, init_distributed
from ...train.trainer import resolve_device
from ...validation import is_int
from .. import runner
from .plan import ABLATIONS, STAGE_ONE, ScalingPlan
from .report import analyse, plot_curves, report


def _at_size(model: torch.nn.Module, size: dict[str, int]) -> bool:
    current = {**model.config.tokens(0), "n_layers": model.config.n_layers}
    return all(current[k.removesuffix("_tokens")] == v for k, v in size.items())


def _depth(plan: ScalingPlan, size: dict[str, int]) -> dict[str, Any]:
    # The arguments of grow for a stage's size: where new blocks go when it sets the depth.
    return {**size, "depth_position": plan.depth_position} if "n_layers" in size else size


def run_arm(plan: ScalingPlan, arm: str, lr: float, seed: int) -> dict[str, Any]:
    """Train one (arm, learning rate, seed) to the end, resuming from its latest checkpoint."""
    directory = plan.run_dir(arm, lr, seed)
    load_at_start = runner.load_average()
    schedule = plan.arm_schedule(arm)
    trainer = Trainer(plan.run_config(plan.arm_models(arm)[0], lr, seed, directory, resume="auto"))
    try:
        for index, (size, end) in enumerate(schedule):
            if trainer.state.step >= end:
                continue
            if size and not _at_size(trainer.model, size):
                if arm == "transformer_stacked":
                    trainer.stack(size["n_layers"])
                else:
                    trainer.grow(**_depth(plan, size), generator=growth_generator(seed, index))
                trainer.evaluate()  # right after growth: equals the loss before it (unless stacked)
            trainer.fit(end)
            # Every rank asks rank 0 whether the checkpoint exists: saving is a collective call.
            if (
                index == 0
                and len(schedule) > 1
                and not broadcast_object((directory / STAGE_ONE).exists(), trainer.dist)
            ):
                trainer.save_checkpoint(directory / STAGE_ONE)  # the ablation's common start
    finally:
        trainer.close()
    state = trainer.state
    vocab = trainer.model.config.vocab_size
    result = {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "curve": state.val_history,
        "growth_steps": [g["step"] for g in state.growth_history],
        "stage_parameters": [count_parameters(plan.model_config(m, vocab)) for m in plan.arm_models(arm)],
        "parameters": count_parameters(trainer.model.config),
        "tokens": state.tokens,
        "flops": state.flops,
        "wall_time": state.wall_time,
        "final_val_loss": state.val_history[-1]["val_loss"],
        "final_val_loss_se": state.val_history[-1]["val_loss_se"],
        "threads": torch.get_num_threads(),
        "ranks": trainer.dist.world_size,
        "load_average": {"start": load_at_start, "end": runner.load_average()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if trainer.dist.is_main:
        runner.write_result(directory, result)
    return result


def run_ablation(plan: ScalingPlan, lr: float, seed: int, name: str) -> dict[str, Any]:
    """One variant of the first growth step (``ABLATIONS``), from the grown arm's stage-1
    checkpoint of ``(lr, seed)``. An unfinished variant starts again from that checkpoint."""
    variant = ABLATIONS[name]
    source = plan.run_dir("tokenformer_grown", lr, seed) / STAGE_ONE
    out = plan.ablation_dir(lr, seed) / name
    env = init_distributed(plan.train.strategy, resolve_device(plan.train.device), plan.train.dist_timeout)
    if env.is_main and out.exists():
        shutil.rmtree(out)
    barrier(env)
    tokens = plan.arm_schedule("tokenformer_grown")[1][0]
    start = plan.stage_ends()[0]
    steps = plan.ablation_steps or plan.stages[1].steps
    config = plan.run_config(
        plan.arm_models("tokenformer_grown")[0], lr, seed, out, resume=str(source), ckpt_interval=plan.total_steps
    )
    trainer = Trainer(config)
    try:
        before = trainer.state.val_history[-1]
        growth = _depth(plan, tokens)
        record = trainer.grow(**growth, key_init=variant["key_init"], generator=growth_generator(seed, 1))
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
    result = {
        "variant": name,
        **variant,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "loss_before_growth": before["val_loss"],
        "loss_after_growth": after["val_loss"],
        "final_val_loss": final["val_loss"],
        "final_val_loss_se": final["val_loss_se"],
        "curve": trainer.state.val_history,
    }
    if trainer.dist.is_main:
        runner.write_result(out, result)
    return result


def run_job(job: dict[str, Any]) -> None:
    """One run of :func:`ScalingPlan.jobs` or of the ablation (a job with a ``variant``)."""
    torch.set_flush_denormal(True)
    plan = ScalingPlan.from_dict(job["plan"])
    if "variant" in job:
        run_ablation(plan, job["lr"], job["seed"], job["variant"])
    else:
        run_arm(plan, job["arm"], job["lr"], job["seed"])


def _job_dir(plan: ScalingPlan, job: dict[str, Any]) -> Path:
    if "variant" in job:
        return plan.ablation_dir(job["lr"], job["seed"]) / job["variant"]
    return plan.run_dir(job["arm"], job["lr"], job["seed"])


def _run_unfinished(plan: ScalingPlan, jobs: list[dict[str, Any]], workers: int, env: Distributed, what: str) -> None:
    # Rank 0 decides which runs are finished and tells the others, so every rank trains the same.
    todo = [job for job in jobs if runner.read_result(_job_dir(plan, job)) is None] if env.is_main else None
    todo = broadcast_object(todo, env)
    if env.is_main:
        print(f"{what}: {len(jobs) - len(todo)} of {len(jobs)} runs finished, {len(todo)} to go", flush=True)
    if workers > 1 and len(todo) > 1:
        runner.prepare_data(plan.run_config(plan.train.model_overrides, plan.lr_grid[0], plan.seeds[0], plan.out_dir))
    plan_data = plan.to_dict()
    runner.run_jobs(run_job, [{**job, "plan": plan_data} for job in todo], workers)


def check_workers(plan: ScalingPlan, workers: int) -> None:
    """Worker processes and ``torchrun`` do not mix: under torchrun every rank trains each run,
    which needs a distributed ``train.strategy``."""
    if not is_int(workers) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; allowed: a positive integer")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if workers > 1 and (plan.train.strategy != "single" or ranks > 1):
        raise ValueError(
            f"workers={workers} is invalid under torchrun (train.strategy={plan.train.strategy!r}); allowed: 1 "
            "(the ranks train each run together; run worker processes without torchrun and strategy: single)"
        )
    if ranks > 1 and plan.train.strategy == "single":
        raise ValueError(
            f"train.strategy='single' is invalid under torchrun ({ranks} ranks); allowed: ddp or fsdp "
            "(with single, every rank would train every run on its own into the same directories)"
        )


def run_plan(plan: ScalingPlan, command: str = "", workers: int = 1) -> dict[str, Any] | None:
    """Run (or continue) every (arm, learning rate, seed), the ablation, then write the outputs.

    ``workers`` runs train at a time, each in its own process. Under ``torchrun`` (a plan with
    ``train.strategy`` ddp or fsdp) the ranks train every run together and rank 0 writes the
    outputs; the other ranks return None.
    """
    check_workers(plan, workers)
    env = init_distributed(plan.train.strategy, resolve_device(plan.train.device), plan.train.dist_timeout)
    out = Path(plan.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(out / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))
    _run_unfinished(plan, plan.jobs(), workers, env, f"scaling plan {out}")
    runs = [runner.read_result(plan.run_dir(**job)) for job in plan.jobs()] if env.is_main else None
    ablation_jobs = None
    if plan.ablation and env.is_main:
        lr = analyse(plan, runs, [])["arms"]["tokenformer_grown"]["best_lr"]
        ablation_jobs = [{"lr": lr, "seed": seed, "variant": name} for seed in plan.seeds for name in ABLATIONS]
    ablation_jobs = broadcast_object(ablation_jobs, env)
    if ablation_jobs:
        _run_unfinished(
            plan, ablation_jobs, workers, env, f"ablation of the first growth step, lr {ablation_jobs[0]['lr']:g}"
        )
    if not env.is_main:
        return None
    ablation = [runner.read_result(_job_dir(plan, job)) for job in ablation_jobs or []]
    results = {
        "command": command,
        "commit": runner.source_version(),
        "machine": runner.machine(plan.train.threads, plan.train.device, plan.train.precision),
        "workers": workers,
        "ranks": env.world_size,
        "plan": plan.to_dict(),
        "runs": runs,
        "ablation": ablation,
        "analysis": analyse(plan, runs, ablation),
    }
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot_curves(results, out)
    io.atomic_write_text(out / "report.md", report(results))
    return results
