"""The device check: everything that only a GPU can prove, in one command of a few minutes.

    bash scripts/gpu_check.sh --out $OUT          # on a machine with CUDA GPUs (under 7 minutes on one H200)
    python -m benchmarks.gpu_check --cpu --out /tmp/check   # the same stages on the CPU, about a minute

Stages, each a child process with its own time limit, so one that hangs or dies costs only its
own slot and the others still report:
  env       versions (python, torch, CUDA, driver, GPUs, torchvision, timm, transformers, numpy, Pillow)
  data      a JPEG dataset of ImageNet-like sizes made from the bundled photos (no download)
  pytest    `pytest -m gpu`: the CUDA tests (tests/test_gpu.py and the CUDA cases of other files; they
            skip without a GPU)
  step      benchmarks/benchmark.py step mode: ViT-B/16 and ViT-L/16 MAE, bf16, eager and --compile,
            interleaved with transformers' ViTMAE in the official loop (--peer); ViT-H/14 and
            MixMIM-B when the budget allows
  loader    benchmarks/benchmark.py loader mode on the machine's cores: official PIL vs uint8 vs
            device_decode, and the cores one GPU needs at the measured step rates
  e2e       main_pretrain.py on the generated images with the GPU defaults: loss, img/s, MFU and
            data-wait share from its own progress lines; with the representation monitor (a small
            labelled set made from the photos), --profile (trace, CUDA memory snapshot) and the
            hang watchdog on
After every stage <out>/gpu_check.json and <out>/gpu_check.md are rewritten, so a check cut
short still leaves what it measured. --cpu (automatic without CUDA) runs the same stages with
a mini model, so the script is tested where no GPU is lent (tests/test_gpu_check.py).
"""
import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "data" / "sample" / "train" / "photos"

# (name, model, batch, extra benchmark flags, seconds it needs, core): the GPU step benchmarks.
# Core rows run before the loader and the end-to-end run; the others after them, while the
# budget lasts. ViT-L bf16 + compile against the peer is the headline figure.
GPU_STEPS = [
    ("vit_l_bf16_compile", "mae_vit_large_patch16", 128, ["--compile", "--peer"], 120, True),
    ("vit_b_bf16_eager", "mae_vit_base_patch16", 256, ["--peer"], 50, True),
    ("vit_b_bf16_compile", "mae_vit_base_patch16", 256, ["--compile"], 80, False),
    ("vit_l_bf16_eager", "mae_vit_large_patch16", 128, [], 45, False),
    ("vit_h_bf16_compile", "mae_vit_huge_patch14", 64, ["--compile"], 110, False),
    ("mixmim_b_bf16_eager", "mixmim_base", 128, [], 50, False),
]
CPU_STEPS = [("mini_fp32_eager", "mae_vit_mini_patch16", 8, ["--peer", "--input_size", "64"], 45, True),
             ("mixmim_mini_fp32_eager", "mixmim_mini", 4, ["--input_size", "64"], 30, False)]
RESERVE_S = 170  # what the loader (60 s) and the end-to-end run (100 s) need after the core steps


STAGES = ("env", "data", "pytest", "step", "loader", "e2e", "step_extra")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                   help="folder for gpu_check.json, gpu_check.md and the stage logs (default: $OUT or ./gpu_check_out)")
    p.add_argument("--cpu", action="store_true", help="run every stage on the CPU with small models (automatic "
                                                       "when CUDA is not available)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="total seconds for all stages (default: 400 on GPU, 300 on CPU); step rows that no "
                        "longer fit are skipped and say so")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (default: 3072 on GPU, 48 on CPU)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    return p.parse_args(argv)


class Check:
    """Runs the stages, keeps their results, rewrites the JSON and markdown after each."""

    def __init__(self, args):
        import torch

        self.cpu = args.cpu or not torch.cuda.is_available()
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.budget = args.budget_s or (300.0 if self.cpu else 400.0)
        self.start = time.monotonic()
        self.data = self.out / "data"
        self.n_images = args.images or (48 if self.cpu else 3072)
        self.cores = len(os.sched_getaffinity(0))
        self.result: Dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                             "mode": "cpu" if self.cpu else "gpu", "command": shlex.join([sys.executable] + sys.argv),
                             "stages": {}}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, cmd: List[str], timeout: float, env: Optional[dict] = None) -> Dict:
        """A child process with a time limit; its output goes to <out>/logs/<name>.log."""
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        t0 = time.monotonic()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(logs / f"{name}.log", "w", encoding="utf-8") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=max(timeout, 1), text=True)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        text = (logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": f"logs/{name}.log", "tail": text[-1500:]}

    def record(self, stage: str, value) -> None:
        self.result["stages"][stage] = value
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1) + "\n", encoding="utf-8")
        (self.out / "gpu_check.md").write_text(summary_markdown(self.result), encoding="utf-8")

    # ------------------------------------------------------------------ stages
    def env(self) -> None:
        import numpy
        import PIL
        import timm
        import torch
        import torchvision

        info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "timm": timm.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
                "cuda_runtime": torch.version.cuda, "cpu_cores": self.cores, "hostname": platform.node()}
        try:
            import transformers
            info["transformers"] = transformers.__version__
        except ImportError:
            info["transformers"] = None
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30)
                info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired, IndexError):
                info["driver"] = None
        self.record("env", info)

    def make_data(self) -> None:
        """ImageNet-like JPEGs (shorter side 300-500 px, quality 90) as random crops of the photos."""
        from PIL import Image

        t0 = time.monotonic()
        folder = self.data / "train" / "photos"
        folder.mkdir(parents=True, exist_ok=True)
        have = len(list(folder.glob("*.jpg")))
        if have < self.n_images:
            rng = random.Random(0)
            photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
            small = self.cpu
            for k in range(self.n_images):
                img = photos[k % len(photos)]
                side = rng.randint(min(img.size) // 2, min(img.size))
                x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
                w = rng.randint(96, 160) if small else rng.randint(300, 500)
                h = int(w * rng.uniform(0.75, 1.33))
                crop = img.crop((x, y, x + side, y + side)).resize((w, h), Image.BICUBIC)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"img_{k:05d}.jpg", quality=90)
        sizes = [p.stat().st_size for p in folder.glob("*.jpg")]
        self.record("data", {"path": str(self.data), "images": len(sizes), "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
                             "seconds": round(time.monotonic() - t0, 1)})

    def pytest(self) -> None:
        r = self.run("pytest", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "tests"], timeout=min(110, max(30, self.left() - RESERVE_S - 60)))
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", r["tail"])}
        r.update(counts)
        r["failures"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", r["tail"], re.M)
        self.record("pytest", r)

    def step(self, core: bool = True) -> None:
        prev = self.result["stages"].get("step", {"rows": [], "runs": {}})
        rows, ran = prev["rows"], prev["runs"]
        for name, model, batch, extra, needed, is_core in (CPU_STEPS if self.cpu else GPU_STEPS):
            if is_core != core:
                continue
            reserve = RESERVE_S if core else 0
            if self.left() < needed + reserve:
                ran[name] = {"rc": f"skipped: {self.left():.0f} s left of the budget, needs {needed + reserve:.0f}"}
                self.record("step", {"rows": rows, "runs": ran})
                continue
            js = self.out / f"step_{name}.json"
            cmd = [sys.executable, "-m", "benchmarks.benchmark", "--model", model, "--batch_size", str(batch), "--json",
                   str(js), *extra]
            cmd += (["--device", "cpu", "--warmup", "1", "--iters", "2", "--repeats", "1"] if self.cpu else
                    ["--amp", "bf16", "--warmup", "3", "--iters", "10", "--repeats", "3"])
            r = self.run(f"step_{name}", cmd, timeout=min(needed * 2, self.left() - reserve))
            if r["rc"] == 0 and js.exists():
                bench = json.loads(js.read_text())
                for row in bench["rows"]:
                    rows.append({"run": name, **{k: row[k] for k in (
                        "impl", "model", "batch_size", "amp", "compile", "img_per_s", "s_per_step", "mfu_percent",
                        "achieved_tflop_per_s", "peak_tflop_per_s_measured", "peak_mem_mb")}})
                r["speedup_vs_peer"] = bench.get("speedup_vs_peer")
                r.pop("tail")
            ran[name] = r
            self.record("step", {"rows": rows, "runs": ran})

    def step_extra(self) -> None:
        self.step(core=False)

    def loader(self) -> None:
        workers = 1 if self.cpu else max(1, min(8, self.cores - 2))
        js = self.out / "loader.json"
        cmd = [sys.executable, "-m", "benchmarks.benchmark", "--mode", "loader", "--data_path", str(self.data),
               "--num_workers", str(workers), "--batch_size", "16" if self.cpu else "128",
               "--iters", "3" if self.cpu else "12", "--repeats", "1" if self.cpu else "2", "--warmup", "1",
               "--pipelines", "official", "uint8", "device_decode", "--json", str(js),
               "--input_size", "64" if self.cpu else "224"]
        if self.cpu:
            cmd += ["--device", "cpu"]
        r = self.run("loader", cmd, timeout=min(90, self.left() - 100))
        if r["rc"] == 0 and js.exists():
            bench = json.loads(js.read_text())
            r["rows"] = [{k: row[k] for k in ("pipeline", "img_per_s", "img_per_s_per_worker", "vs_official")}
                         for row in bench["rows"]]
            r["num_workers"] = workers
            r["cores_needed"] = cores_needed(r["rows"], self.result["stages"].get("step", {}).get("rows", []))
            r.pop("tail")
        self.record("loader", r)

    def e2e(self) -> None:
        """The training CLI with the GPU defaults, and riding along what only a run shows on the
        device: the representation monitor (CUDA embedding under autocast), MFU against the peak
        table, the profiler's trace and CUDA memory snapshot, and the hang watchdog (on by default)."""
        out = self.out / "e2e"
        if self.cpu:
            epochs, flags = 3, ["--model", "mae_vit_mini_patch16", "--input_size", "64", "--batch_size", "8",
                                "--warmup_epochs", "1", "--num_workers", "1", "--print_freq", "2", "--blr", "5e-3",
                                "--device", "cpu", "--profile_steps", "2", "2"]
        else:
            epochs, flags = 25, ["--model", "mae_vit_base_patch16", "--batch_size", "256", "--warmup_epochs", "2",
                                 "--num_workers", str(max(1, self.cores - 2)), "--print_freq", "4", "--norm_pix_loss",
                                 "--profile_steps", "20", "3"]
        monitor = make_monitor_data(self.out / "monitor_data", small=self.cpu)
        cmd = [sys.executable, "main_pretrain.py", *flags, "--epochs", str(epochs), "--data_path", str(self.data),
               "--output_dir", str(out), "--log_dir", str(out), "--save_every", "1000", "--no_auto_resume",
               "--profile", "--monitor_every", str(epochs), "--monitor_data_path", str(monitor),
               "--monitor_train_size", str(MONITOR_TRAIN), "--monitor_val_size", str(MONITOR_VAL)]
        r = self.run("e2e", cmd, timeout=min(120, self.left()))
        text = (self.out / r["log"]).read_text(encoding="utf-8", errors="replace")
        r.update(progress_summary(text))
        r.update(feature_summary(text, out))
        r.pop("tail")
        self.record("e2e", r)


MONITOR_CLASSES, MONITOR_TRAIN, MONITOR_VAL = 4, 48, 24


def make_monitor_data(root: Path, small: bool) -> Path:
    """A labelled set with train and val splits for the monitor: each class the crops of one bundled photo."""
    from PIL import Image

    if (root / "val").is_dir():
        return root
    rng = random.Random(1)
    photos = sorted(PHOTOS.glob("*.jpg"))[:MONITOR_CLASSES]
    for c, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        for split, n in (("train", MONITOR_TRAIN // MONITOR_CLASSES), ("val", MONITOR_VAL // MONITOR_CLASSES)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                side = rng.randint(min(img.size) // 2, min(img.size))
                x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
                size = 96 if small else 256
                img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC).save(
                    folder / f"{k:03d}.jpg", quality=90)
    return root


_MONITOR = re.compile(r"^Monitor (?:\[(\d+)\] \((\d+) images\)|at the initial weights): (.*)$", re.M)


def feature_summary(text: str, out: Path) -> Dict:
    """What the e2e run's log and folder show of the monitor, MFU, the profiler and the watchdog."""
    found: Dict = {}
    for m in _MONITOR.finditer(text):
        numbers = {k: float(v) for k, v in re.findall(r"(\w+): ([\d.]+)[%s]", m.group(3))}
        found["monitor_initial" if m.group(1) is None else "monitor_last"] = numbers
    mfu = [float(x) for x in re.findall(r"MFU: ([\d.]+)%", text)]
    profile = out / "profile"
    return {**found, "mfu_percent_median": sorted(mfu)[len(mfu) // 2] if mfu else None,
            "profile_traces": sorted(p.name for p in profile.glob("*.pt.trace.json")) if profile.is_dir() else [],
            "memory_snapshot": bool(list(profile.glob("*memory-snapshot.pickle"))) if profile.is_dir() else False,
            "hang_files": sorted(p.name for p in (out / "hang").glob("*")) if (out / "hang").is_dir() else []}


def cores_needed(loader_rows: List[Dict], step_rows: List[Dict]) -> Dict[str, Dict[str, float]]:
    """CPU cores one GPU needs to feed each measured step rate, per pipeline (img/s per worker)."""
    ours = {}
    for row in step_rows:
        if row["impl"] == "ours":
            ours[row["run"]] = row["img_per_s"]
    out = {}
    for lr in loader_rows:
        per_worker = lr["img_per_s_per_worker"]
        out[lr["pipeline"]] = {run: round(rate / per_worker, 1) for run, rate in ours.items() if per_worker > 0}
    return out


_PROGRESS = re.compile(r"Epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\].*?loss: ([\d.naninf]+).*?img/s: ([\d.]+)\s+"
                       r"data: [\d.]+s \((\d+)%\).*?max mem: (\d+)MB")


def progress_summary(text: str) -> Dict:
    """Loss, img/s and data-wait share from main_pretrain.py's progress lines."""
    lines = [m.groups() for m in _PROGRESS.finditer(text)]
    if not lines:
        return {"progress_lines": 0}
    losses = [float(g[3]) for g in lines]
    rates = [float(g[4]) for g in lines[1:]] or [float(lines[0][4])]  # the first window holds start-up
    waits = [int(g[5]) for g in lines[1:]] or [int(lines[0][5])]
    return {"progress_lines": len(lines), "epochs_seen": int(lines[-1][0]) + 1, "first_loss": losses[0],
            "last_loss": losses[-1], "loss_went_down": losses[-1] < losses[0],
            "img_per_s_median": sorted(rates)[len(rates) // 2], "data_wait_percent_median": sorted(waits)[len(waits) // 2],
            "max_mem_mb": int(lines[-1][6])}


def summary_markdown(r: Dict) -> str:
    s = r["stages"]
    env = s.get("env", {})
    lines = [f"# Device check, {r['date']} ({r['mode']} mode)", ""]
    if env:
        lines.append(f"- {', '.join(env.get('gpus') or ['no GPU'])}; driver {env.get('driver')}, CUDA "
                     f"{env.get('cuda_runtime')}; torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
                     f"timm {env.get('timm')}, transformers {env.get('transformers')}, numpy {env.get('numpy')}, "
                     f"Pillow {env.get('pillow')}, Python {env.get('python')}; {env.get('cpu_cores')} CPU cores")
    lines.append(f"- command: `{r['command']}`; elapsed {r.get('elapsed_s')} s")
    if "data" in s:
        d = s["data"]
        lines.append(f"- data: {d['images']} generated JPEGs, {d['mean_kb']} KB on average")
    if "pytest" in s:
        p = s["pytest"]
        lines.append(f"- `pytest -m gpu`: rc {p['rc']}, {p.get('passed', 0)} passed, {p.get('failed', 0)} failed, "
                     f"{p.get('skipped', 0)} skipped" + (f"; failed: {', '.join(p['failures'])}" if p.get("failures") else ""))
    if "step" in s:
        lines += ["", "| run | impl | model | batch | amp | compile | img/s | MFU % | TFLOP/s | peak TFLOP/s | mem MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in s["step"]["rows"]:
            lines.append(f"| {row['run']} | {row['impl']} | {row['model']} | {row['batch_size']} | {row['amp']} | "
                         f"{row['compile']} | {row['img_per_s']:.1f} | {row['mfu_percent']:.1f} | "
                         f"{row['achieved_tflop_per_s']:.1f} | {row['peak_tflop_per_s_measured']:.1f} | "
                         f"{row['peak_mem_mb']:.0f} |")
        for name, run in s["step"]["runs"].items():
            if run.get("rc") != 0:
                lines.append(f"- step {name}: {run.get('rc')} (see {run.get('log', '-')})")
            elif run.get("speedup_vs_peer"):
                lines.append(f"- step {name}: ours / peer {run['speedup_vs_peer']:.2f}x")
    if "loader" in s:
        ld = s["loader"]
        if ld.get("rows"):
            lines += ["", f"| pipeline ({ld['num_workers']} workers) | img/s | img/s per worker | x official |",
                      "|---|---|---|---|"]
            for row in ld["rows"]:
                lines.append(f"| {row['pipeline']} | {row['img_per_s']:.0f} | {row['img_per_s_per_worker']:.0f} | "
                             f"{row['vs_official']:.2f} |")
            for pipeline, runs in ld["cores_needed"].items():
                if runs:
                    lines.append(f"- cores one GPU needs with {pipeline}: " +
                                 ", ".join(f"{k} {v}" for k, v in runs.items()))
        else:
            lines.append(f"- loader: rc {ld.get('rc')} (see {ld.get('log')})")
    if "e2e" in s:
        e = s["e2e"]
        if e.get("progress_lines"):
            lines.append(f"- main_pretrain.py: rc {e['rc']} in {e['seconds']} s, {e['epochs_seen']} epochs, loss "
                         f"{e['first_loss']:.4f} -> {e['last_loss']:.4f}, {e['img_per_s_median']:.0f} img/s, data wait "
                         f"{e['data_wait_percent_median']}%, max mem {e['max_mem_mb']} MB")
        else:
            lines.append(f"- main_pretrain.py: rc {e['rc']}, no progress lines (see {e['log']})")
        last, first = e.get("monitor_last", {}), e.get("monitor_initial", {})
        lines.append(f"- in that run: MFU median {e.get('mfu_percent_median')}%; monitor k-NN cls "
                     f"{first.get('knn_cls')} -> {last.get('knn_cls')}% in {last.get('seconds')} s; "
                     f"{len(e.get('profile_traces', []))} profiler trace(s), memory snapshot "
                     f"{'written' if e.get('memory_snapshot') else 'none'}; hang files: "
                     f"{', '.join(e.get('hang_files', [])) or 'none'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args)
    print(f"device check ({check.result['mode']} mode), budget {check.budget:.0f} s, results in {check.out}", flush=True)
    stages = {"env": check.env, "data": check.make_data, "pytest": check.pytest, "step": check.step,
              "loader": check.loader, "e2e": check.e2e, "step_extra": check.step_extra}
    if any(s in args.stages for s in ("loader", "e2e")) and "data" not in args.stages:
        args.stages.append("data")
    for name in STAGES:
        if name in args.stages:
            t0 = time.monotonic()
            stages[name]()
            print(f"{name}: done in {time.monotonic() - t0:.0f} s", flush=True)
    print((check.out / "gpu_check.md").read_text(), flush=True)
    failed = failed_parts(check.result)
    if failed:
        print("not everything passed: " + ", ".join(failed), flush=True)
    return 1 if failed else 0


def failed_parts(result: Dict) -> List[str]:
    """Stages (and step runs) that ended with a non-zero exit code or a timeout; skipped rows do not count."""
    out = []
    for name, value in result["stages"].items():
        if name == "step":
            out += [f"step {run}" for run, r in value["runs"].items()
                    if r["rc"] != 0 and not str(r["rc"]).startswith("skipped")]
        elif isinstance(value, dict) and value.get("rc") not in (None, 0):
            out.append(name)
    return out


if __name__ == "__main__":
    sys.exit(main())
