#!/usr/bin/env python3
"""The ONNX Runtime side of `sluice bench inference`: the same architecture and weights as Candle.

    python3 bench/ort_runner.py --weights models/digits/model.safetensors --input-shape 1,8,8 \
        --inputs rows.f32 --threads 2 --batches 1,8,32,128,512 --min-seconds 1 --check-rows 32 \
        --check-out check.f32

The graph is built with the `onnx` helpers straight from the safetensors file (no PyTorch):
conv1 3x3 pad 1 -> ReLU -> conv2 3x3 pad 1 -> ReLU -> max-pool 2x2 -> flatten -> fc1 -> ReLU ->
fc2 -> softmax, the digits CNN of inference/src/model/digits_cnn.rs. Inputs are little-endian f32
rows. The probabilities of the first --check-rows rows go to --check-out (f32) so the caller can
compare them with Candle's before timing; then one JSON line per batch size:
{"batch": B, "runs": N, "seconds": T}. One session, sequential execution, --threads intra-op
threads.
"""

import argparse
import json
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input-shape", required=True, help="channels,height,width")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--check-rows", type=int, default=32)
    parser.add_argument("--check-out", required=True)
    args = parser.parse_args()

    c, h, w = (int(v) for v in args.input_shape.split(","))
    weights = load_file(args.weights)
    nodes, initializers = digits_cnn(weights)
    classes = weights["fc2.bias"].shape[0]
    graph = helper.make_graph(
        nodes,
        "digits-cnn",
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
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    rows = np.fromfile(args.inputs, dtype="<f4").reshape(-1, c, h, w)
    session.run(["y"], {"x": rows[: args.check_rows]})[0].astype("<f4").tofile(args.check_out)

    for batch in (int(b) for b in args.batches.split(",")):
        x = np.ascontiguousarray(rows[np.arange(batch) % len(rows)])
        for _ in range(3):
            session.run(["y"], {"x": x})
        runs, started = 0, time.perf_counter()
        while True:
            session.run(["y"], {"x": x})
            runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= args.min_seconds and runs >= 3:
                break
        print(json.dumps({"batch": batch, "runs": runs, "seconds": elapsed}), flush=True)


if __name__ == "__main__":
    main()
