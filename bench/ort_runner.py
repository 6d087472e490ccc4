#!/usr/bin/env python3
"""The ONNX Runtime side of `sluice bench inference`: the same architecture and weights as Candle.

    python3 bench/ort_runner.py --architecture digits-cnn --weights models/digits/model.safetensors \
        --input-shape 1,8,8 --inputs rows.f32 --threads 2 --batches 1,8,32,128,512 --min-seconds 1 \
        --check-rows 32 --check-out check.f32

The graph is built with the `onnx` helpers straight from the safetensors file (no PyTorch), for
  - digits-cnn: conv1 3x3 pad 1 -> ReLU -> conv2 3x3 pad 1 -> ReLU -> max-pool 2x2 -> flatten ->
    fc1 -> ReLU -> fc2 -> softmax (inference/src/model/digits_cnn.rs);
  - resnet18: torchvision's ResNet-18 from its parameter names (conv1, bn1, layer1.0.conv1, ...,
    layer2.0.downsample.0/1, fc), batch norms in inference mode, then softmax.
Inputs are little-endian f32 rows. The probabilities of the first --check-rows rows go to --check-out (f32) so the caller can
compare them with Candle's before timing; then one JSON line per batch size:
{"batch": B, "runs": N, "seconds": T}. One session, sequential execution, --threads intra-op
threads.
"""

import argparse
import json
import re
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


def digits_cnn(weights):
    names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    initializers = [numpy_helper.from_array(weights[n].astype(np.float32), n) for n in names]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        # Candle's Linear keeps weights as (out, in): Gemm with transB.
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    return nodes, initializers


def resnet18(weights):
    nodes, used = [], []

    def conv_bn(x, conv, bn, out, kernel, stride, pad, relu):
        used.append(f"{conv}.weight")
        used.extend(f"{bn}.{p}" for p in ("weight", "bias", "running_mean", "running_var"))
        nodes.append(helper.make_node("Conv", [x, f"{conv}.weight"], [f"{out}.conv"], kernel_shape=[kernel, kernel],
                                      strides=[stride, stride], pads=[pad] * 4))
        bn_out = f"{out}.bn" if relu else out
        nodes.append(helper.make_node("BatchNormalization", [f"{out}.conv"] + [f"{bn}.{p}" for p in
                                      ("weight", "bias", "running_mean", "running_var")], [bn_out], epsilon=1e-5))
        if relu:
            nodes.append(helper.make_node("Relu", [bn_out], [out]))
        return out

    x = conv_bn("x", "conv1", "bn1", "stem", 7, 2, 3, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x = "pool"
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            y = conv_bn(x, f"{p}.conv1", f"{p}.bn1", f"{p}.a", 3, stride, 1, True)
            y = conv_bn(y, f"{p}.conv2", f"{p}.bn2", f"{p}.b", 3, 1, 1, False)
            if f"{p}.downsample.0.weight" in weights:
                x = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", f"{p}.skip", 1, stride, 0, False)
            nodes.append(helper.make_node("Add", [y, x], [f"{p}.sum"]))
            nodes.append(helper.make_node("Relu", [f"{p}.sum"], [f"{p}.out"]))
            x = f"{p}.out"
    used.extend(["fc.weight", "fc.bias"])
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    initializers = [numpy_helper.from_array(weights[n].astype(np.float32), n) for n in used]
    return nodes, initializers


ARCHITECTURES = {"digits-cnn": (digits_cnn, "fc2.bias"), "resnet18": (resnet18, "fc.bias")}


# Opset 17 runs on onnxruntime 1.12 and later. The IR version `make_model` writes is the installed
# onnx's newest, which an older onnxruntime refuses ("Unsupported model IR version: 14, max
# supported IR version: 13"); the runtime names the newest it reads, so write that one instead.
IR_REFUSED = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def open_session(model, options):
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types, not exported stably
        refused = IR_REFUSED.search(str(error))
        if not refused:
            raise
        model.ir_version = int(refused.group(2))
        print(f"onnxruntime {ort.__version__} reads IR version {model.ir_version}; writing that", file=sys.stderr)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="digits-cnn")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input-shape", required=True, help="channels,height,width")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--check-rows", type=int, default=32)
    parser.add_argument("--check-out", required=True)
    args = parser.parse_args()

    c, h, w = (int(v) for v in args.input_shape.split(","))
    weights = load_file(args.weights)
    build, classes_from = ARCHITECTURES[args.architecture]
    nodes, initializers = build(weights)
    classes = weights[classes_from].shape[0]
    graph = helper.make_graph(
        nodes,
        args.architecture,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = open_session(model, options)

    rows = np.fromfile(args.inputs, dtype="<f4").reshape(-1, c, h, w)
    session.run(["y"], {"x": rows[: args.check_rows]})[0].astype("<f4").tofile(args.check_out)

    for batch in (int(b) for b in args.batches.split(",")):
        x = np.ascontiguousarray(rows[np.arange(batch) % len(rows)])
        session.run(["y"], {"x": x})  # warm-up
        runs, started = 0, time.perf_counter()
        while True:
            session.run(["y"], {"x": x})
            runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= args.min_seconds and runs >= args.min_runs:
                break
        print(json.dumps({"batch": batch, "runs": runs, "seconds": elapsed}), flush=True)


if __name__ == "__main__":
    main()
