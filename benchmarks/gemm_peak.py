"""This host's honest GEMM peak: the best throughput of any matrix-product path it has.

Every benchmark's "fraction of peak" divides by this, not by torch's default ``matmul`` (on an AMD
EPYC with AVX-512 MKL's float32 product reaches less than half of what oneDNN or ONNX Runtime get
from the same CPU, and a peak taken from it printed 150 % for those runtimes). Paths: torch's
``F.linear`` (MKL in float32), oneDNN's linear on plain and on packed weights (``engine/gemm.py``),
and ONNX Runtime's and OpenVINO's MatMul when installed. Shape: roberta-base's FFN up-projection
at 2048 tokens.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict

import torch

from sglang_hf_bridge import compat
from sglang_hf_bridge.engine import gemm


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _onnx_matmul(m: int, k: int, n: int):
    """A one-MatMul ONNX file (x[m, k] @ W[k, n], W a constant), or None without onnx."""
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype("float32"), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = os.path.join(tempfile.gettempdir(), f"sglang-hf-bridge-matmul-{m}x{k}x{n}.onnx")
    onnx.save(model, path)
    return path


def gemm_throughputs(dtype: torch.dtype, m: int = 2048, k: int = 768, n: int = 3072,
                     reps: int = 8) -> Dict[str, float]:
    """FLOP/s of [m, k] @ [k, n] per path available here (in ``dtype``; the runtimes in float32,
    OpenVINO also in bfloat16)."""
    flops = 2 * m * k * n
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    out = {}
    with torch.inference_mode():
        for path in gemm.available_paths("cpu", str(dtype).replace("torch.", "")):
            if path == gemm.PACKED:  # its steady state: the weight packed once beforehand
                fn, weight = gemm.onednn_linear, compat.onednn_pack_weight(w)
            else:
                fn, weight = gemm.path_functions(path)[0], w
            out[f"torch {path}"] = flops / _best(lambda fn=fn, weight=weight: fn(x, weight, None), reps)
    model = _onnx_matmul(m, k, n)
    feed = {"x": torch.randn(m, k).numpy()}
    if model is not None and dtype == torch.float32:
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            out["onnxruntime MatMul"] = flops / _best(lambda: session.run(None, feed), reps)
        except ImportError:
            pass
    if model is not None:
        try:
            import openvino as ov

            core = ov.Core()
            hint = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
            if hint:
                compiled = core.compile_model(core.read_model(model), "CPU", {
                    "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()})
                request = compiled.create_infer_request()
                out[f"openvino MatMul ({hint})"] = flops / _best(lambda: request.infer(feed), reps)
        except ImportError:
            pass
    return out


def honest_peak(dtype: torch.dtype) -> Dict[str, object]:
    """``{"flop_per_s": best, "path": its name, "by_path": every path's FLOP/s}``."""
    by_path = gemm_throughputs(dtype)
    path = max(by_path, key=by_path.get)
    return {"flop_per_s": by_path[path], "path": path, "by_path": by_path}


def main() -> None:
    """``python benchmarks/gemm_peak.py``: every path's GFLOP/s per dtype, and the engine's choice."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import REPO, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gemm_peak.json")
    args = ap.parse_args()
    rows, peaks = [], {}
    shapes = gemm.encoder_linear_shapes({"hidden_size": 768, "intermediate_size": 3072})
    for name in ("float32", "bfloat16"):
        peak = honest_peak(getattr(torch, name))
        peaks[name] = peak
        choice = gemm.measure(gemm.available_paths("cpu", name), getattr(torch, name), shapes)
        chosen = min(choice, key=choice.get)
        for path, flop_per_s in sorted(peak["by_path"].items(), key=lambda kv: -kv[1]):
            rows.append({"dtype": name, "path": path, "gflop_per_s": flop_per_s / 1e9,
                         "fraction_of_peak": flop_per_s / peak["flop_per_s"],
                         "engine_choice": "yes" if path == f"torch {chosen}" else ""})
    report("GEMM paths on this host (2048x768 @ 768x3072; engine choice measured on roberta-base's layer shapes)",
           rows, ["dtype", "path", "gflop_per_s", "fraction_of_peak", "engine_choice"], args.out,
           extra={"peaks": peaks})


if __name__ == "__main__":
    main()
