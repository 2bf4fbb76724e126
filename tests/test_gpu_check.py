"""The device check's CPU mode: every stage of benchmarks/gpu_check.py runs where no GPU is lent,
so the script is known to work the moment one is."""
import json
import subprocess
import sys

from conftest import REPO, cli_env


def test_gpu_check_cpu_mode_runs_every_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--out", str(tmp_path), "--images", "32"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    s = r["stages"]
    assert r["mode"] == "cpu" and list(s) == ["env", "data", "pytest", "step", "loader", "e2e"]
    assert s["env"]["torch"] and s["env"]["cpu_cores"] >= 1 and "transformers" in s["env"]
    assert s["data"]["images"] == 32 and len(list((tmp_path / "data" / "train" / "photos").glob("*.jpg"))) == 32
    # Every CUDA test is collected and skips cleanly without a GPU.
    assert s["pytest"]["rc"] == 0 and s["pytest"]["skipped"] >= 10 and s["pytest"].get("passed", 0) == 0
    runs = s["step"]["runs"]
    assert set(runs) == {"mini_fp32_eager", "mixmim_mini_fp32_eager"} and all(v["rc"] == 0 for v in runs.values())
    impls = {(row["run"], row["impl"]) for row in s["step"]["rows"]}
    assert ("mini_fp32_eager", "peer (transformers, official loop)") in impls
    assert all(row["img_per_s"] > 0 and row["mfu_percent"] > 0 for row in s["step"]["rows"])
    assert runs["mini_fp32_eager"]["speedup_vs_peer"] > 0
    loader = s["loader"]
    assert loader["rc"] == 0 and [row["pipeline"] for row in loader["rows"]] == ["official", "uint8", "device_decode"]
    # Cores per GPU for the step rates measured before the loader stage (the core rows).
    assert set(loader["cores_needed"]["uint8"]) == {"mini_fp32_eager"}
    e2e = s["e2e"]
    assert e2e["rc"] == 0 and e2e["epochs_seen"] == 3 and e2e["progress_lines"] >= 3 and e2e["img_per_s_median"] > 0
    # What rides along in that run: the monitor (initial weights and after the last epoch), MFU against the
    # measured CPU peak, one profiler trace (no CUDA memory snapshot on CPU), no hang.
    for key in ("monitor_initial", "monitor_last"):
        assert set(e2e[key]) >= {"knn_cls", "linear_cls"} and all(0 <= e2e[key][k] <= 100 for k in ("knn_cls", "linear_cls"))
    assert e2e["monitor_last"]["seconds"] > 0 and e2e["mfu_percent_median"] > 0
    assert len(e2e["profile_traces"]) == 1 and e2e["memory_snapshot"] is False and e2e["hang_files"] == []
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| mini_fp32_eager | ours |" in md and "| uint8 |" in md and "main_pretrain.py: rc 0" in md
    assert "`pytest -m gpu`: rc 0, 0 passed, 0 failed" in md and "1 profiler trace(s), memory snapshot none" in md
    assert (tmp_path / "logs" / "e2e.log").read_text().count("Epoch: [2]") >= 1
