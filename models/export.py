"""Export a run's global model for deployment: distil, export to ONNX, quantize to int8, report.

    export_run(RUN_DIR, OUT_DIR)  ->  OUT_DIR/teacher.onnx         the global model, fp32
                                      OUT_DIR/teacher-int8.onnx    the same, int8
                                      OUT_DIR/student.onnx         the distilled student, fp32
                                      OUT_DIR/student-int8.onnx    the deployable artefact
                                      OUT_DIR/student.pt           the student as a torch model file
                                      OUT_DIR/report.json, report.md

Every ONNX file carries the class names and clip geometry in its metadata_props
(`models.predict` reads them), and is checked to load and run in ONNX Runtime on the CPU.
Accuracy is measured with ONNX Runtime on the run's central test split, latency per clip
at batch 1 with a fixed thread count, all in one process on one machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from torch import nn

from client.dataset import clips_to_tensor
from models.distill import ALPHA, EPOCHS, TEMPERATURE, distill, load_transfer_set
from models.pretrained import public_data_dir
from models.predict import INPUT_LAYOUT, META_CLASSES, META_CLIP_FRAMES, META_FRAME_SIZE, META_FRAME_STRIDE, META_INPUT
from models.registry import ModelSpec, count_parameters

log = logging.getLogger(__name__)

OPSET = 17
# Which ops get int8 weights, measured on the registry's models (48 px, 8 frames, 1 thread,
# onnxruntime 1.32, AVX-512 VNNI Xeon): ONNX Runtime's int8 2D convolution runs 1.3-2x faster
# than fp32, but its int8 3D convolution (QLinearConv) 1.5-2.4x slower than its fp32 Conv3d;
# quantizing every op (Add, Mul...) adds Quantize/DequantizeLinear pairs for little gain.
# So: Conv, MatMul and Gemm, except Conv in a model with 3D convolutions (see int8_ops_for).
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_CLIPS = 64
LATENCY_THREADS = 1


# --- ONNX export -----------------------------------------------------------------------------


def _diff_symbolic(g, x, n, dim, prepend, append):
    """aten::diff (n=1, optional prepend), which the TorchScript exporter lacks."""
    from torch.onnx import symbolic_helper as sh

    n, dim = sh._get_const(n, "i", "n"), sh._get_const(dim, "i", "dim")
    if n != 1 or not sh._is_none(append):
        return sh._unimplemented("diff", "n != 1 or append")
    if not sh._is_none(prepend):
        x = g.op("Concat", prepend, x, axis_i=dim)
    later = sh._slice_helper(g, x, axes=[dim], starts=[1], ends=[2**62])
    earlier = sh._slice_helper(g, x, axes=[dim], starts=[0], ends=[-1])
    return g.op("Sub", later, earlier)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's adaptive average pooling along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _is_own_size(value, input, axis: int) -> bool:
    """True when `value` is Gather(Shape(input), axis): the input's own size on that axis."""
    from torch.onnx import symbolic_helper as sh

    node = value.node()
    if node.kind() != "onnx::Gather":
        return False
    shape, index = node.inputs()
    return (
        shape.node().kind() == "onnx::Shape"
        and shape.node().input().debugName() == input.debugName()
        and sh._maybe_get_const(index, "i") == axis
    )


def _adaptive_avg_pool3d_symbolic(g, input, output_size):
    """aten::adaptive_avg_pool3d for sizes the stock exporter refuses (6 -> 4: overlapping
    bins; a time size read from the input's shape). Pooling is linear, so H and W are pooled
    by MatMul with constant matrices; an axis whose output is its own size is left alone."""
    from torch.onnx import symbolic_helper as sh

    sizes = sh._get_tensor_sizes(input)
    if output_size.node().kind() != "prim::ListConstruct" or sizes is None:
        return sh._unimplemented("adaptive_avg_pool3d", "output size is not a list")
    x = input
    for k, value in enumerate(output_size.node().inputs()):
        axis = 2 + k
        if _is_own_size(value, input, axis):
            continue
        out = sh._maybe_get_const(value, "i")
        if not isinstance(out, int) or sizes[axis] is None:
            return sh._unimplemented("adaptive_avg_pool3d", "needs a static input and a constant output size")
        if out == sizes[axis]:
            continue
        pool = torch.from_numpy(adaptive_pool_matrix(sizes[axis], out))
        if axis == 4:
            x = g.op("MatMul", x, g.op("Constant", value_t=pool.T.contiguous()))
        elif axis == 3:
            x = g.op("MatMul", g.op("Constant", value_t=pool), x)
        else:
            return sh._unimplemented("adaptive_avg_pool3d", "pooling over time")
    return x


def _register_symbolics() -> None:
    # The dynamo exporter needs onnxscript (not a fedvid dependency); the TorchScript
    # exporter needs these two ops spelled out. Registration is idempotent.
    torch.onnx.register_custom_op_symbolic("aten::diff", _diff_symbolic, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::adaptive_avg_pool3d", _adaptive_avg_pool3d_symbolic, OPSET)


def clip_metadata(spec: ModelSpec, classes: tuple[str, ...] | list[str], frame_stride: int, **extra: Any) -> dict[str, str]:
    """metadata_props that make an ONNX file self-describing for `models.predict`."""
    meta = {
        META_CLASSES: json.dumps(list(classes)),
        META_CLIP_FRAMES: str(spec.clip_frames),
        META_FRAME_STRIDE: str(frame_stride),
        META_FRAME_SIZE: str(spec.frame_size),
        META_INPUT: INPUT_LAYOUT,
        "fedvid.model": json.dumps(dataclasses.asdict(spec)),
    }
    meta.update({f"fedvid.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the metadata_props of the ONNX file at `path`."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def compact_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Short tensor names, no node names or doc strings (the exporter's stack traces).

    On models this small the graph's names would be half the file; the graph's input
    (`clips`) and output (`logits`) keep their names.
    """
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for info in graph.value_info:
        info.name = short(info.name)
    return model


def export_onnx(model: nn.Module, spec: ModelSpec, path: Path, metadata: dict[str, str]) -> Path:
    """Export `model` to ONNX (opset 17, dynamic batch axis, input `clips`, output `logits`),
    with `metadata` as its metadata_props; the file is checked by onnx.checker."""
    _register_symbolics()
    example = torch.rand(1, 3, spec.clip_frames, spec.frame_size, spec.frame_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter of the TorchScript exporter
        torch.onnx.export(
            model.eval(), (example,), str(path), input_names=["clips"], output_names=["logits"],
            opset_version=OPSET, dynamic_axes={"clips": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    exported = compact_names(onnx.load(str(path)))
    onnx.helper.set_model_props(exported, metadata)
    onnx.checker.check_model(exported)
    onnx.save(exported, str(path))
    return path


def int8_ops_for(model: nn.Module, ops: tuple[str, ...] = QUANTIZED_OPS) -> tuple[str, ...]:
    """`ops` without Conv when `model` has 3D convolutions (int8 Conv3d is slower on a CPU)."""
    has_3d = any(isinstance(m, nn.Conv3d) for m in model.modules())
    return tuple(op for op in ops if not (op == "Conv" and has_3d))


class ClipCalibrationReader(CalibrationDataReader):
    """Feeds uint8 transfer clips to ONNX Runtime's calibrator, a few at a time."""

    def __init__(self, clips: np.ndarray, batch_size: int = 8):
        self.batches = [clips_to_numpy(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"clips": self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def clips_to_numpy(clips: np.ndarray) -> np.ndarray:
    """uint8 (N, T, S, S, 3) -> float32 (N, 3, T, S, S) in [0, 1], the ONNX models' input."""
    return np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3), dtype=np.float32) / 255.0


def export_int8(
    fp32_path: Path, int8_path: Path, calibration_clips: np.ndarray, ops: tuple[str, ...] = QUANTIZED_OPS
) -> str:
    """Quantize an ONNX model to int8; return the mode used, in words.

    Static QDQ (activations uint8 calibrated on `calibration_clips` by min-max, weights int8
    per output channel) on the op types `ops`; when static quantization fails, dynamic
    quantization of the same ops. The fp32 file's metadata_props are copied over.
    """
    metadata = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}
    try:
        quantize_static(
            str(fp32_path), str(int8_path), ClipCalibrationReader(calibration_clips),
            quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=list(ops),
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        mode = "static QDQ, per-channel int8 weights, uint8 activations (min-max calibration) on " + "/".join(ops)
    except Exception as exc:  # noqa: BLE001 - any calibration failure falls back, and says so
        log.warning("static quantization failed (%s); falling back to dynamic quantization", exc)
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, op_types_to_quantize=list(ops))
        mode = f"dynamic int8 weights on {'/'.join(ops)} (static failed: {type(exc).__name__})"
    model = compact_names(onnx.load(str(int8_path)))
    del model.graph.value_info[:]  # shape annotations left by the quantizer: size, no use
    onnx.helper.set_model_props(model, {**metadata, "fedvid.quantization": mode})
    onnx.save(model, str(int8_path))
    return mode


# --- Running artefacts in ONNX Runtime -----------------------------------------------------------


def cpu_session(path: Path, threads: int = LATENCY_THREADS) -> ort.InferenceSession:
    """A CPU session with a fixed thread count (latencies are comparable only so)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, clips: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits for uint8 clips, batch by batch."""
    return np.concatenate(
        [session.run(None, {"clips": clips_to_numpy(clips[i : i + batch_size])})[0] for i in range(0, len(clips), batch_size)]
    )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def median_latency_ms(session: ort.InferenceSession, clip: np.ndarray, repeats: int = 200, warmup: int = 20) -> float:
    """Median wall time of one batch-1 run, in milliseconds."""
    inputs = {"clips": clips_to_numpy(clip[None])}
    for _ in range(warmup):
        session.run(None, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def verify_against_torch(path: Path, model: nn.Module, clips: np.ndarray) -> float:
    """Max |ONNX - torch| logit difference on `clips` (the export must not change the model)."""
    with torch.no_grad():
        expected = model.eval()(clips_to_tensor(clips)).numpy()
    return float(np.abs(onnx_logits(cpu_session(path), clips) - expected).max())


# --- Privacy -------------------------------------------------------------------------------------


def privacy_statement(run_dir: Path) -> dict:
    """The (epsilon, delta) the run's model carries, from its privacy ledger via the audit.

    Without a ledger: `{"dp_accounting": False, ...}`, never a number.
    """
    from privacy.audit import audit_run
    from privacy.ledger import LEDGER_NAME

    if not (Path(run_dir) / LEDGER_NAME).is_file():
        return {"dp_accounting": False, "summary": "no DP accounting (the run has no privacy ledger)"}
    audit = audit_run(Path(run_dir)).to_dict()
    sites = {sid: {"epsilon": s["epsilon"], "delta": s["delta"]} for sid, s in audit["sites"].items()}
    central = audit["central"] and {"epsilon": audit["central"]["epsilon"], "delta": audit["central"]["delta"]}
    epsilons = [_as_float(s["epsilon"]) for s in sites.values()]
    deltas = [s["delta"] for s in sites.values() if s["delta"] is not None]
    parts = []
    if epsilons and math.isinf(max(epsilons)):
        parts.append("no site-level DP guarantee (a site trained with dp = false)")
    elif epsilons:
        parts.append(f"site epsilon <= {_fmt_eps(max(epsilons))} (delta {max(deltas)}, worst site)")
    if central and central["epsilon"] not in ("inf", None):  # a run without server noise has no central guarantee to state
        parts.append(f"central epsilon {_fmt_eps(_as_float(central['epsilon']))} (delta {central['delta']})")
    if not audit["chain_ok"] or not audit["recomputed_ok"]:
        parts.append("LEDGER AUDIT FAILED: see `fedvid audit`")
    return {
        "dp_accounting": True,
        "summary": "; ".join(parts) or "ledger holds no DP record",
        "site_epsilon_max": max(epsilons) if epsilons else None,
        "sites": sites,
        "central": central,
        "ledger_chain_ok": audit["chain_ok"],
        "ledger_recomputed_ok": audit["recomputed_ok"],
    }


def _as_float(value: Any) -> float:
    return math.inf if value in ("inf", None) else float(value)


def _fmt_eps(value: float) -> str:
    return "inf (DP off)" if math.isinf(value) else f"{value:.3g}"


# --- The whole stage -----------------------------------------------------------------------------


def export_run(
    run_dir: Path,
    out_dir: Path,
    transfer: Path | None = None,
    student: str | None = None,
    epochs: int = EPOCHS,
    progress: bool = True,
    *,
    temperature: float = TEMPERATURE,
    alpha: float = ALPHA,
    teacher_int8: bool = True,
    int8_ops: tuple[str, ...] = QUANTIZED_OPS,
    latency_repeats: int = 200,
) -> dict:
    """Distil, export, quantize and measure a finished run's global model; return the report.

    `transfer`: a public video folder (folder-per-class or flat; labels where sub-folders
    name the run's classes); default: the built-in public set (`models.pretrained`), whose
    labels are none of the sites', so the student learns from the teacher alone.
    `student`: "NAME-SIZE", a family or a size (see `models.distill.student_spec`); default:
    the early-fusion `cnn2d` at the teacher's size. Writes the artefacts and report.json / report.md into
    `out_dir`. Raises FileNotFoundError naming the path when the run has no final model.
    """
    from client.site import cache_dir, clip_spec, federation_split, site_anonymizer
    from client.dataset import load_clips
    from server.run_dir import load_finished_run, save_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    teacher, spec, classes, config = load_finished_run(run_dir)
    if spec.task != "classify":
        raise ValueError(f"{run_dir} trained task = {spec.task!r}: fedvid export distils and quantizes classifiers only")
    out_dir.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    anonymizer, cache, geometry = site_anonymizer(), cache_dir(), clip_spec(config)

    transfer_dir = Path(transfer) if transfer else public_data_dir("classify", progress)
    say(f"transfer set: {transfer_dir}")
    transfer_set = load_transfer_set(transfer_dir, classes, geometry, anonymizer, cache, progress=progress)
    _, _, test_items = federation_split(config)
    if not test_items:
        raise ValueError(f"test-fraction = {config.test_fraction}: the run has no central test split to measure on")
    test = load_clips(test_items, geometry, anonymizer, cache, progress=progress)

    started = time.perf_counter()
    student_model, student_spec, stats = distill(
        teacher, spec, transfer_set, student, epochs, temperature, alpha, seed=config.seed, progress=progress
    )
    distill_seconds = time.perf_counter() - started
    save_model(out_dir / "student.pt", student_model.state_dict(), student_spec, classes, teacher=str(run_dir / "model.pt"))

    privacy = privacy_statement(run_dir)
    calibration = transfer_set.clips[np.random.default_rng(0).permutation(len(transfer_set))[:CALIBRATION_CLIPS]]
    artefacts = []
    for role, model, model_spec, quantize in (  # teacher first: the baseline
        ("teacher", teacher, spec, teacher_int8),
        ("student", student_model, student_spec, True),
    ):
        meta = clip_metadata(model_spec, classes, config.frame_stride, role=role, source_run=str(run_dir),
                             privacy=privacy["summary"])
        fp32 = export_onnx(model, model_spec, out_dir / f"{role}.onnx", {**meta, "fedvid.precision": "fp32"})
        verify_diff = verify_against_torch(fp32, model, test.clips[:16])
        artefacts.append((role, "fp32", fp32, model, "none", verify_diff))
        if quantize:
            int8 = out_dir / f"{role}-int8.onnx"
            mode = export_int8(fp32, int8, calibration, int8_ops_for(model, int8_ops))
            set_metadata(int8, {**meta, "fedvid.precision": "int8", "fedvid.quantization": mode})
            artefacts.append((role, "int8", int8, model, mode, None))

    rows = []
    architecture = {"teacher": f"{spec.name}-{spec.size}", "student": f"{student_spec.name}-{student_spec.size}"}
    for role, precision, path, model, mode, verify_diff in artefacts:
        session = cpu_session(path)  # also the check that the artefact loads and runs
        logits = onnx_logits(session, test.clips)
        rows.append({
            "model": f"{role} {precision}",
            "file": path.name,
            "architecture": architecture[role],
            "quantization": mode,
            "parameters": count_parameters(model),
            "size_bytes": path.stat().st_size,
            "accuracy": accuracy(logits, test.labels),
            "latency_ms": median_latency_ms(session, test.clips[0], repeats=latency_repeats),
            "epsilon": privacy["summary"],
            "max_abs_diff_vs_torch": verify_diff,
            "runs_in_onnxruntime": True,
        })
    report = {
        "run_dir": str(run_dir),
        "out_dir": str(out_dir),
        "teacher": dataclasses.asdict(spec),
        "classes": list(classes),
        "test_clips": len(test),
        "test_videos": len(test_items),
        "transfer": {"folder": str(transfer_dir), "clips": stats.transfer_clips, "labelled_clips": stats.labelled_clips},
        "distillation": {**dataclasses.asdict(stats), "seconds": round(distill_seconds, 1)},
        "latency": {"batch": 1, "threads": LATENCY_THREADS, "repeats": latency_repeats, "statistic": "median",
                    "provider": "CPUExecutionProvider", "onnxruntime": ort.__version__},
        "privacy": privacy,
        "privacy_note": (
            "Distillation and quantization are post-processing of the teacher on public data: "
            "they cost no extra privacy, and the teacher's (epsilon, delta) carries over to the student."
        ),
        "models": rows,
        "goals": _goals(rows),
    }
    write_report(report, out_dir)
    return report


def _goals(rows: list[dict]) -> dict:
    """The product goals, teacher fp32 against student int8, as measured."""
    by = {r["model"]: r for r in rows}
    teacher, student = by.get("teacher fp32"), by.get("student int8")
    if not teacher or not student:
        return {}
    size = teacher["size_bytes"] / student["size_bytes"]
    speed = teacher["latency_ms"] / student["latency_ms"]
    drop = 100 * (teacher["accuracy"] - student["accuracy"])
    return {
        "size_ratio": round(size, 2), "size_ratio_at_least_4": size >= 4,
        "speedup": round(speed, 2), "speedup_at_least_2": speed >= 2,
        "accuracy_drop_points": round(drop, 2), "accuracy_within_2_points": drop <= 2,
    }


def render_markdown(report: dict) -> str:
    """The report as a short Markdown table plus the notes a reader needs."""
    lines = [
        f"# Export of {report['run_dir']}",
        "",
        f"Accuracy on the run's central test split ({report['test_clips']} clips of {report['test_videos']} videos); "
        f"latency per clip: median of {report['latency']['repeats']} runs, batch 1, "
        f"{report['latency']['threads']} thread, onnxruntime {report['latency']['onnxruntime']} CPU.",
        "",
        "| model | architecture | parameters | file size | accuracy | latency (ms/clip) | epsilon |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["models"]:
        lines.append(
            f"| {r['model']} | {r['architecture']} | {r['parameters']:,} | {r['size_bytes'] / 1024:.1f} KiB | "
            f"{100 * r['accuracy']:.1f}% | {r['latency_ms']:.3f} | {r['epsilon']} |"
        )
    goals, d = report["goals"], report["distillation"]
    if goals:
        lines += [
            "",
            f"Student int8 vs teacher fp32: {goals['size_ratio']}x smaller, {goals['speedup']}x faster, "
            f"accuracy {-goals['accuracy_drop_points']:+.1f} points.",
        ]
    lines += [
        "",
        f"Distillation: T = {d['temperature']}, alpha = {d['alpha']}, {d['epochs']} epochs on "
        f"{report['transfer']['clips']} transfer clips ({report['transfer']['labelled_clips']} labelled) "
        f"from {report['transfer']['folder']}; student agrees with the teacher on "
        f"{100 * d['teacher_agreement']:.1f}% of them.",
        "",
        "Quantization: " + "; ".join(sorted({f"{r['file']}: {r['quantization']}" for r in report["models"] if r["quantization"] != "none"})) + ".",
        "",
        "Privacy: " + report["privacy"]["summary"] + ". " + report["privacy_note"],
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> None:
    """report.json and report.md in `out_dir`."""
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (Path(out_dir) / "report.md").write_text(render_markdown(report))
