"""Memory stays bounded by the row block, not by the tensor or the shard (format-io.md §5.5).

The merge runs in a child process under RLIMIT_DATA (anonymous + private writable memory), on a model
whose merged tensor is 256 MiB in bf16 — 512 MiB as one fp32 copy, so any whole-tensor path fails —
and whose shards are larger than the limit allows to hold. A sampling thread reads RssAnon (after
clear_refs) to report the honest anonymous peak, which must stay far below one tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from builders import write_linear_pair

ROWS, COLS, RANK = 32768, 4096, 16  # 256 MiB of bf16
LIMIT_MIB = 600

CHILD = textwrap.dedent("""
    import json, resource, sys, threading, time
    import qwen_merge
    import qwen_merge.stream  # torch and the compute code, which the merge imports when it computes
    from qwen_merge import merge_shards

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    limit = int(sys.argv[4]) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    open("/proc/self/clear_refs", "w").write("5")
    baseline, peak, done = anon_kib(), [0], []

    def sample():
        while not done:
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = merge_shards(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
    finally:
        done.append(1)
        sampler.join()
    hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    print(json.dumps({"baseline_mib": baseline / 1024, "peak_mib": peak[0] / 1024, "hwm_mib": hwm / 1024,
                      "predicted_mib": report.plan.predicted_peak_bytes / 2**20}))
""")


def _build(tmp_path):
    """Two shards of one merged up_proj each, written chunk by chunk."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_linear_pair(base, adapter, {f"model-0000{i + 1}-of-00002.safetensors": [
        (f"model.layers.{i}.mlp.up_proj.weight", ROWS, COLS, True)] for i in range(2)},
        rank=RANK, alpha=32, seed=0, streamed=True)
    return base, adapter


def test_merge_runs_under_a_data_limit_smaller_than_a_tensor_in_fp32(tmp_path):
    base, adapter = _build(tmp_path)
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", CHILD, str(base), str(adapter), str(out), str(LIMIT_MIB)],
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    numbers = json.loads(child.stdout.strip().splitlines()[-1])
    growth = numbers["peak_mib"] - numbers["baseline_mib"]
    print(f"anonymous memory: baseline {numbers['baseline_mib']:.0f} MiB, peak {numbers['peak_mib']:.0f} MiB "
          f"(+{growth:.0f} MiB) for a 256 MiB bf16 tensor merged in 8 MiB fp32 row blocks; "
          f"VmHWM {numbers['hwm_mib']:.0f} MiB, predicted {numbers['predicted_mib']:.0f} MiB")
    assert growth < 80, numbers
    # We never map files, so VmHWM is honest here, and the plan's prediction must cover it.
    assert numbers["hwm_mib"] <= numbers["predicted_mib"], numbers
    assert (out / "model-00002-of-00002.safetensors").stat().st_size == (base / "model-00002-of-00002.safetensors").stat().st_size
