"""The ``bench`` report: targets checked, Markdown rendering, atomic JSON + Markdown files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scratchcnn.harness.report import write_json_and_markdown

TARGET_MODEL = "simple-cnn"
# N ranks against N threads: max NumPy/PyTorch median ratio per batch, and inference.
TRAINING_TARGETS = {10: 1.0, 64: 0.85, 256: 1.0}
INFERENCE_TARGET = 0.4
OTHER_MODELS_TARGET = 1.5
# One process, one thread each: the plain loop at batch 64, and inference.
ONE_PROCESS_TRAINING_TARGET = 0.9
ONE_PROCESS_INFERENCE_TARGET = 0.4
# Both parts: NumPy's inference time at most this multiple of ONNX Runtime's (issue 21).
ONNX_RUNTIME_INFERENCE_TARGET = 1.5


def _target(name: str, value: float | None, limit: float) -> dict[str, Any]:
    met = None if value is None else bool(value <= limit)
    return {"target": name, "value": value, "limit": limit, "met": met}


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the models in ``report`` (only meaningful for float32)."""
    targets = []
    single = report.get("one_process")
    if single and single["model"] == TARGET_MODEL:
        for t in single["training"]:
            if t["batch_size"] == 64:
                targets.append(_target(f"{TARGET_MODEL} one process, 1 thread: training batch 64",
                                       t["ratio"], ONE_PROCESS_TRAINING_TARGET))
        targets.append(_target(f"{TARGET_MODEL} one process, 1 thread: inference",
                               single["inference"]["ratio"], ONE_PROCESS_INFERENCE_TARGET))
        targets += _onnxruntime_target(f"{TARGET_MODEL} one process, 1 thread: inference",
                                       single["inference"])
    count = report.get("ranks", 1)
    where = "" if count == 1 else f"{count} ranks vs {count} threads: "
    for model in report["models"]:
        name = model["model"]
        ratios = [(f"training batch {t['batch_size']}", t["ratio"], t["batch_size"])
                  for t in model["training"]]
        if name == TARGET_MODEL:
            for label, ratio, batch in ratios:
                if batch in TRAINING_TARGETS:
                    targets.append(_target(f"{name} {where}{label}", ratio,
                                           TRAINING_TARGETS[batch]))
            targets.append(_target(f"{name} {where}inference", model["inference"]["ratio"],
                                   INFERENCE_TARGET))
            targets += _onnxruntime_target(f"{name} {where}inference", model["inference"])
            for entry in model.get("memory", {}).get("training", []):
                targets.append(_target(f"{name} training memory batch {entry['batch_size']}",
                                       entry.get("ratio"), 1.0))
        else:
            worst = max([ratio for _, ratio, _ in ratios] + [model["inference"]["ratio"]])
            targets.append(_target(f"{name} {where}worst ratio", worst, OTHER_MODELS_TARGET))
    return targets


def _onnxruntime_target(label: str, inference: dict[str, Any]) -> list[dict[str, Any]]:
    """NumPy/ONNX Runtime for an inference entry that has ONNX Runtime's side, else nothing."""
    versus = inference.get("numpy_vs_onnxruntime")
    if versus is None:
        return []
    return [_target(f"{label} vs ONNX Runtime", versus["ratio"],
                    ONNX_RUNTIME_INFERENCE_TARGET)]


def busy_warning(load_average: dict[str, list[float]], cores: int) -> str | None:
    """A warning when other processes competed for the CPU: the 1-minute load average above 1
    before the run started, or above ``cores + 1`` at its end (the bench itself adds about
    ``cores``)."""
    start, end = load_average["start"][0], load_average["end"][0]
    if start <= 1.0 and end <= cores + 1.0:
        return None
    return (f"WARNING: the machine was busy (1-minute load average {start:.2f} at start, "
            f"{end:.2f} at end, on {cores} cores). Timings are unreliable, PyTorch's "
            "multi-threaded kernels especially (its threads spin-wait for busy cores); rerun "
            "on an idle machine before drawing conclusions.")


def _load_lines(load_average: dict[str, list[float] | None], cores: int) -> list[str]:
    """The load average at start and end, and ``busy_warning``'s, where the system has one."""
    start, end = load_average["start"], load_average["end"]
    if not (start and end):
        return ["- load average: not available on this system"]
    lines = [f"- load average (1/5/15 min) at start {', '.join(f'{v:.2f}' for v in start)}, "
             f"at end {', '.join(f'{v:.2f}' for v in end)}"]
    warning = busy_warning(load_average, cores)
    return [*lines, f"- **{warning}**"] if warning else lines


def _onnxruntime_line(onnxruntime: dict[str, Any] | None) -> str:
    """The header's line on ONNX Runtime: the third side of inference, or why it is left out."""
    if not onnxruntime:
        return "- ONNX Runtime: not measured in this run"
    if onnxruntime.get("problem"):
        return f"- ONNX Runtime: {onnxruntime['problem']}"
    return (f"- inference also against ONNX Runtime {onnxruntime.get('version')} (CPU provider, "
            "the same threads, the same weights exported by to_onnx, alternating rounds)")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def _range(side: dict[str, Any], fmt) -> str:
    return f"{fmt(side['median'])} ({fmt(side['min'])}-{fmt(side['max'])})"


def _inference_lines(inf: dict[str, Any], gf) -> list[str]:
    """One row per side (NumPy, PyTorch, ONNX Runtime when measured), then one per ratio."""
    names = {"numpy": "NumPy", "torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
    sides = [side for side in names if inf.get(side)]
    lines = ["| side | seconds | GFLOP/s (% peak) |", "|---|---:|---:|"]

    def seconds(value: float) -> str:  # a third digit: ONNX Runtime's times are ~0.1 s
        return f"{value:.3f} s" if value < 10 else _s(value)

    lines += [f"| {names[side]} | {_range(inf[side], seconds)} | {gf(inf[side]['gflops'])} |"
              for side in sides]
    ratios = [("NumPy / PyTorch", inf)]
    if "numpy_vs_onnxruntime" in inf:
        ratios += [("NumPy / ONNX Runtime", inf["numpy_vs_onnxruntime"]),
                   ("PyTorch / ONNX Runtime", inf["torch_vs_onnxruntime"])]
    lines += ["", "| ratio | of medians | per-round ratios |", "|---|---:|---|"]
    lines += [f"| {label} | **{entry['ratio']:.2f}** | {_round_ratios(entry)} |"
              for label, entry in ratios]
    return lines


def _round_ratios(entry: dict[str, Any]) -> str:
    """"median m: r1, r2, ...": the per-round ratios pair neighbouring rounds, so their median
    is less sensitive to load drift than the ratio of the two medians."""
    rounds = ", ".join(f"{r:.2f}" for r in entry["round_ratios"])
    return f"median {entry['median_round_ratio']:.2f}: {rounds}"


def _model_section(model: dict[str, Any], peak: float) -> list[str]:
    lines = [f"## {model['model']}", "",
             f"Forward: {model['forward_flops_per_image'] / 1e6:.2f} MFLOP per image "
             "(training step ~3x). Times are median (min-max) over the rounds.", "",
             "### Training (forward, loss, backward, Adam step)", "",
             "| batch | NumPy ms/step | PyTorch ms/step | ratio of medians | per-round ratios | "
             "NumPy s/epoch | PyTorch s/epoch | NumPy GFLOP/s (% peak) | "
             "PyTorch GFLOP/s (% peak) |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]

    def gf(value: float) -> str:
        return f"{value:.1f} ({100 * value / peak:.0f}%)" if peak else f"{value:.1f}"

    for t in model["training"]:
        rounds = _round_ratios(t)
        lines.append(
            f"| {t['batch_size']} | {_range(t['numpy'], _ms)} | {_range(t['torch'], _ms)} | "
            f"**{t['ratio']:.2f}** | {rounds} | {t['numpy']['epoch_seconds']:.1f} | "
            f"{t['torch']['epoch_seconds']:.1f} | {gf(t['numpy']['gflops'])} | "
            f"{gf(t['torch']['gflops'])} |")
    inf = model["inference"]
    lines += ["", f"### Inference of {inf['images']} images (batches of {inf['eval_batch_size']})",
              "", *_inference_lines(inf, gf)]
    memory = model.get("memory")
    if memory:
        lines += ["", "### Peak memory above baseline (MiB, separate process per side)", "",
                  "| task | NumPy | PyTorch | ratio |", "|---|---:|---:|---:|"]
        rows = [(f"training, batch {e['batch_size']}", e) for e in memory["training"]]
        if memory["inference"]:
            rows.append((f"inference, {memory['inference']['images']} images",
                         memory["inference"]))
        for label, e in rows:
            ratio = f"{e['ratio']:.2f}" if e.get("ratio") is not None else "-"
            mib = [f"{e[s]:.1f}" if e.get(s) is not None else "-" for s in ("numpy", "torch")]
            lines.append(f"| {label} | {mib[0]} | {mib[1]} | {ratio} |")
    loops = model.get("reference_loops")
    if loops:
        batch64 = next((t for t in model["training"] if t["batch_size"] == 64),
                       model["training"][-1])
        numpy_epoch = batch64["numpy"]["epoch_seconds"]
        numpy_inf = inf["numpy"]["median"] * loops["inference_images"] / inf["images"]
        lines += ["", f"### Textbook loops (timed on {loops['images']} images, extrapolated)",
                  "", "| task | loops | vectorised NumPy | speed-up |", "|---|---:|---:|---:|",
                  f"| inference of {loops['inference_images']} images | "
                  f"{_s(loops['inference_seconds'])} | {_s(numpy_inf)} | "
                  f"{loops['inference_seconds'] / numpy_inf:.0f}x |"]
        if loops.get("epoch_seconds") is not None:
            lines.append(f"| one epoch (60,000 images; NumPy at batch {batch64['batch_size']}) | "
                         f"{_s(loops['epoch_seconds'])} | {_s(numpy_epoch)} | "
                         f"{loops['epoch_seconds'] / numpy_epoch:.0f}x |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    env, config = report["environment"], report["config"]
    peak = report["matmul_peak"]["gflops"]
    blas = env.get("blas") or {}
    load = report["load_average"]
    lines = [
        "# scratchcnn bench: NumPy vs PyTorch", "",
        f"- CPU: {env['cpu']}; threads: {env['threads']} (of {env['available_cores']} cores); "
        f"BLAS: {blas.get('library')} {blas.get('version') or ''}".rstrip(),
        f"- Python {env['python']}, NumPy {env['numpy']}, PyTorch {env['torch']}; memory "
        f"allocator: {env.get('allocator', 'not recorded')}",
        f"- dtype {config['dtype']}; data: {report['dataset']['name']}; {config['rounds']} "
        f"alternating rounds, {config['steps']} steps per round after "
        f"{config['warmup_steps']} warm-up steps; Adam lr {config['lr']}",
        f"- measured matmul peak ({report['matmul_peak']['dtype']}, "
        f"{report['matmul_peak']['size']}^2, best of start and "
        f"end of the run): {peak:.1f} GFLOP/s",
        *_load_lines(load, env["available_cores"]),
        _onnxruntime_line(report.get("onnxruntime")),
        "- ratio = median NumPy time / median PyTorch time: below 1 means NumPy is faster "
        "(targets use it). Per-round ratios pair each NumPy round with the PyTorch round after "
        "it; a wide spread means the machine was busy.",
        "",
    ]
    targets = report.get("targets") or []
    if targets:
        note = "" if config["dtype"] == "float32" else " (targets are defined for float32)"
        lines += [f"## Targets{note}", "", "| target | value | limit | status |",
                  "|---|---:|---:|---|"]
        for t in targets:
            value = "-" if t["value"] is None else f"{t['value']:.2f}"
            status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {value} | <= {t['limit']} | {status} |")
        lines.append("")
    single = report.get("one_process")
    if single:
        lines += [f"# One process, one thread each ({single['model']}: the plain loop against "
                  "PyTorch on one thread)", "", *_model_section(single, peak)[2:], ""]
    count = report.get("ranks", 1)
    lines += [f"# {count} NumPy rank(s) against PyTorch with {count} thread(s)", "",
              "The NumPy side as MPI ranks of one BLAS thread each (DistributedDataParallel, "
              "BatchNorm synchronised); PyTorch on rank 0 while the other ranks wait. Peak "
              "memory of NumPy's ranks is the sum of each rank's peak (taken at its own "
              "moment: an upper bound).", ""]
    for model in report["models"]:
        lines += [*_model_section(model, peak), ""]
    scale = report.get("scaling")
    if scale:
        lines += ["# Scaling of NumPy's training step", "",
                  f"{scale['model']}, batch {scale['batch_size']}: one process "
                  f"{scale['one_process_seconds'] * 1e3:.1f} ms, {scale['ranks']} ranks "
                  f"{scale['ranks_seconds'] * 1e3:.1f} ms: speed-up "
                  f"{scale['speedup']:.2f}, efficiency {100 * scale['efficiency']:.0f}%", ""]
    return "\n".join(lines)


def write_bench_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``bench.json`` and ``bench.md`` in ``out_dir`` (created if needed), written atomically."""
    return write_json_and_markdown(report, out_dir, "bench", render_markdown(report))
