"""Pooled stage 2 on Ray Train: f_p and one margin head over every site's pseudonymous classes,
trained with DDP on the X_p the sites shipped (strategy/spool.py).

Why a separate process: the ServerApp may itself run inside Flower's simulation, whose Ray
instance is sized and held by the virtual sites; `run_pooled_training` therefore starts
``python -m strategy.pooled_train JOB.json``, which joins the cluster named by ``RAY_ADDRESS``
(every node needs minusfed installed, as for the simulation) or starts a local Ray of its own,
and runs a `TorchTrainer` there: `pooled-workers` workers, gloo on CPUs, NCCL when each worker
has a GPU.  The ServerApp follows the job through ``train.jsonl`` (one line per epoch, written by
rank 0 after that epoch's checkpoint is reported).

Checkpoints and resume go through Ray Train: every epoch rank 0 reports a checkpoint (weights in
safetensors, the optimizer state, the epoch); a worker that dies is replaced and all workers
continue from the latest checkpoint (`FailureConfig`); a restarted ServerApp starts the job again
with the same storage path and name, which Ray Train resumes from its latest checkpoint (a job
the killed ServerApp left running is stopped first: `stop_earlier_job`).  Either
way no finished epoch is trained again.

One epoch visits every shipped X_p once (the sites' faces x protect-copies), in a new order per
epoch; each worker takes its share of that order (the global batch is the preset's batch size);
the LR follows the preset's milestones over the epochs, as federated stage 2 does over rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minusface.backbones import build_backbone
from minusface.heads import build_head
from minusface.losses import recognition_loss
from minusface.optim import build_optimizer, lr_factor
from minusface.precision import NATIVE, Plan, training_plan
from minusface.precision import configure as configure_precision
from minusface.presets import Preset
from minusface.trainer import optimizer_step

from .spool import PooledData

JOB_FILE = "job.json"
PID_FILE = "job.pid"
PROGRESS = "train.jsonl"
RESULT = "recognizer.safetensors"
TRAIN_NAME = "train"


@dataclass(frozen=True)
class PooledJob:
    """Everything the training process needs (written as JSON next to the spool)."""

    spool: str                     # the spool folder
    sites: list[str]               # site tokens whose whole upload is used
    preset: dict                   # Preset fields, with the run's overrides
    epochs: int
    seed: int
    workers: int
    gpus_per_worker: float
    folder: str                    # <out-dir>/pooled: progress, result, Ray Train storage
    max_failures: int = 3
    cpu_precision: str = "auto"    # minusface.precision on CPU workers; $MINUSFED_CPU_PRECISION wins
    init_recognizer: str = ""      # safetensors of a starting f_p (run config init-bundle); "" = fresh

    def save(self) -> Path:
        path = Path(self.folder) / JOB_FILE
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path


class PooledModel(nn.Module):
    """f_p and the server's margin head, one module so DDP syncs both."""

    def __init__(self, preset: Preset, num_classes: int) -> None:
        super().__init__()
        self.recognizer = build_backbone(preset.backbone, 3, width=preset.backbone_width)
        self.head = build_head(preset.head, 512, num_classes, s=preset.head_s, m=preset.head_m)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return recognition_loss(self.recognizer, self.head, x, y)[0]


def _preset(fields: dict) -> Preset:
    fields = dict(fields)
    fields["milestones"] = tuple(fields.get("milestones", ()))
    return Preset(**fields)


def epoch_rows(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This worker's rows of one epoch: a new global order per epoch, an equal share each."""
    order = np.random.default_rng(seed * 1000 + epoch).permutation(n)
    share = n // world
    return order[rank::world][:share]


def _plan(job: PooledJob, model: PooledModel, device: torch.device, num_classes: int,
          batch: int) -> Plan:
    """CPU workers run f_p's step as minusface.precision measured fastest (float32 or bf16,
    the same choice and cache entry as federated stage 2's step); GPUs use bf16 autocast."""
    if device.type != "cpu":
        return NATIVE
    configure_precision(job.cpu_precision)

    def step(m, x, y):
        return recognition_loss(m["recognizer"], m["head"], x, y)[0]
    return training_plan("stage2", step, {"recognizer": model.recognizer, "head": model.head}, 3,
                         num_classes, batch)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_loop(config: dict) -> None:
    """Ray Train worker: the whole training, resuming from the latest reported checkpoint."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    job = PooledJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    preset = _preset(job.preset)
    data = PooledData(job.spool, job.sites)
    if len(data) < 2 * world:
        raise ValueError(f"{len(data)} X_p in the spool: each of the {world} workers needs at "
                         "least 2 per step (BatchNorm)")
    torch.manual_seed(job.seed)
    model = PooledModel(preset, data.num_classes)
    optimizer = build_optimizer([model.recognizer, model.head], lr=preset.lr,
                                weight_decay=preset.weight_decay, momentum=preset.momentum)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
            optimizer_file = os.path.join(folder, "optimizer.pt")
            optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True))
            start = json.loads(Path(folder, "progress.json").read_text())["epoch"] + 1
    elif job.init_recognizer:          # the bundle's f_p; the margin head is new (new classes)
        model.recognizer.load_state_dict(load_file(job.init_recognizer), strict=True)
    device = get_device()
    plan = _plan(job, model, device, data.num_classes, max(2, preset.batch_size // world))
    plan.prepare(model.recognizer, model.head)
    ddp = prepare_model(model)
    batch = max(2, preset.batch_size // world)
    for epoch in range(start, job.epochs):
        lr = preset.lr * lr_factor(preset.milestones, epoch, job.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ddp.train()
        rows = epoch_rows(len(data), job.seed, epoch, rank, world)
        steps = max(1, len(rows) // batch)
        t0, total = time.perf_counter(), 0.0
        for s in range(steps):
            x, y = data.batch(rows[s * batch:(s + 1) * batch])
            x = plan.layout(torch.from_numpy(x).to(device))
            with _autocast(device), plan.autocast():
                loss = ddp(x, torch.from_numpy(y).to(device))
            optimizer_step(loss, optimizer, f"epoch {epoch + 1}, step {s + 1}")
            total += float(loss)
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "epochs": job.epochs, "loss": total / steps, "lr": lr,
                   "seconds": seconds, "img_per_s": steps * batch * world / max(seconds, 1e-9),
                   "workers": world, "classes": data.num_classes, "xp_images": len(data)}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(state, os.path.join(folder, "model.safetensors"))
                torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
                Path(folder, "progress.json").write_text(json.dumps({"epoch": epoch}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
                with open(Path(job.folder) / PROGRESS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            else:
                ray.train.report(metrics)


def _connect(workers: int) -> None:
    import ray
    address = os.environ.get("RAY_ADDRESS") or None
    package_root = str(Path(__file__).resolve().parents[1])
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(address="local", num_cpus=max(workers, os.cpu_count() or 1),
                 include_dashboard=False, runtime_env=runtime_env)


def run_job(job: PooledJob) -> Path:
    """Train (or resume) on the Ray cluster this process connects to; returns the f_p file."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _connect(job.workers)
    resources: dict[str, float] = {"CPU": 1}
    if job.gpus_per_worker:
        resources["GPU"] = job.gpus_per_worker
    trainer = TorchTrainer(
        train_loop, train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=TRAIN_NAME, storage_path=str(Path(job.folder) / "ray"),
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = load_file(os.path.join(folder, "model.safetensors"))
    recognizer = {k.removeprefix("recognizer."): v for k, v in state.items()
                  if k.startswith("recognizer.")}
    out = Path(job.folder) / RESULT
    save_file(recognizer, str(out))
    return out


def _job_alive(pid: int, job_path: Path) -> bool:
    """True if `pid` is a running `python -m strategy.pooled_train job_path` (Linux /proc)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"strategy.pooled_train" in cmdline and str(job_path).encode() in cmdline


def stop_earlier_job(folder: Path) -> bool:
    """Stop the training job a killed ServerApp left running on this folder (its process group:
    the job and the local Ray it started), so a restarted ServerApp does not race it on the
    same Ray Train storage; True if there was one."""
    try:
        pid = int((folder / PID_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return False
    if not _job_alive(pid, folder / JOB_FILE):
        return False
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _job_alive(pid, folder / JOB_FILE):
            time.sleep(0.2)
        if not _job_alive(pid, folder / JOB_FILE):
            break
    return True


def run_pooled_training(job: PooledJob, on_epoch: Callable[[dict], None] | None = None,
                        poll_seconds: float = 2.0) -> dict[str, torch.Tensor]:
    """Run `run_job` in a child process (see the module docstring) and return f_p's state
    dict; `on_epoch` gets each epoch's metrics as the job reports them."""
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if stop_earlier_job(folder):
        print(f"pooled training: stopped the job an earlier ServerApp left running on {folder}",
              file=sys.stderr)
    (folder / RESULT).unlink(missing_ok=True)
    path = job.save()
    progress = folder / PROGRESS
    seen = len(progress.read_text(encoding="utf-8").splitlines()) if progress.exists() else 0
    log_path = folder / "train.log"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "strategy.pooled_train", str(path)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        (folder / PID_FILE).write_text(str(proc.pid), encoding="utf-8")
        try:
            while True:
                done = proc.poll() is not None
                if progress.exists():
                    lines = progress.read_text(encoding="utf-8").splitlines()
                    for line in lines[seen:]:
                        if on_epoch is not None:
                            on_epoch(json.loads(line))
                    seen = max(seen, len(lines))
                if done:
                    break
                time.sleep(poll_seconds)
        finally:
            if proc.poll() is None:             # the ServerApp is going down: stop the job too
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if proc.returncode != 0 or not (folder / RESULT).is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"pooled training failed (exit {proc.returncode}); log {log_path}; "
                           f"last lines:\n{tail}")
    return load_file(str(folder / RESULT))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m strategy.pooled_train JOB.json", file=sys.stderr)
        return 2
    job = PooledJob(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    out = run_job(job)
    print(f"pooled training: f_p written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
