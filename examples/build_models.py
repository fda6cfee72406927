"""Build the example models with fixed seeds and register them in examples/models/.

Nothing is downloaded: every model is trained or constructed here. One model per runtime, sharing
one tabular data set so that results can be compared across frameworks:

  tabular      ONNX     RandomForest (100 trees, depth 8) on 32 features, via skl2onnx; v1 and v2
  tabular_skl  sklearn  the same forest as joblib (the peer benchmark serves it too)
  mlp          ONNX     256 -> 1024 -> 1024 -> 10 MLP built with onnx.helper (benchmark model)
  xgb          xgboost  gradient-boosted trees on the tabular data
  lgbm         lightgbm gradient-boosted trees on the tabular data
  torch_mlp    torch    a small TorchScript MLP on the tabular data
  text_stats   python   text features from a BYTES input (examples/python_model/)

Usage: python examples/build_models.py [--out examples/models] [--artifacts examples/artifacts]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261128
N_FEATURES = 32


def tabular_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=20_000, n_features=N_FEATURES, n_informative=12, random_state=SEED
    )
    return X.astype(np.float32), y.astype(np.int64)


def build_forest(art: str, X: np.ndarray, y: np.ndarray, depth: int, name: str) -> tuple[str, str]:
    import joblib
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=100, max_depth=depth, random_state=SEED)
    forest.fit(X, y)
    joblib_path = os.path.join(art, f"{name}.joblib")
    joblib.dump(forest, joblib_path)
    onx = to_onnx(
        forest,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        options={id(forest): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onnx_path = os.path.join(art, f"{name}.onnx")
    with open(onnx_path, "wb") as fh:
        fh.write(onx.SerializeToString())
    return onnx_path, joblib_path


def build_mlp(art: str) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    sizes = [256, 1024, 1024, 10]
    nodes, inits = [], []
    prev = "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"]),
        ]
        prev = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["output"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(art, "mlp.onnx")
    onnx.save(model, path)
    return path


def build_xgb(art: str, X: np.ndarray, y: np.ndarray) -> str:
    import xgboost

    model = xgboost.XGBClassifier(n_estimators=50, max_depth=5, random_state=SEED, n_jobs=1)
    model.fit(X, y)
    path = os.path.join(art, "xgb.json")
    model.save_model(path)
    return path


def build_lgbm(art: str, X: np.ndarray, y: np.ndarray) -> str:
    import lightgbm

    model = lightgbm.LGBMClassifier(
        n_estimators=50,
        num_leaves=31,
        random_state=SEED,
        n_jobs=1,
        verbose=-1,
        deterministic=True,
        force_row_wise=True,
    )
    model.fit(X, y)
    path = os.path.join(art, "lgbm.txt")
    model.booster_.save_model(path)
    return path


def build_torch(art: str, X: np.ndarray, y: np.ndarray) -> str:
    import torch

    torch.manual_seed(SEED)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 2),
        torch.nn.Softmax(-1),
    )
    xs, ys = torch.from_numpy(X[:4000]), torch.from_numpy(y[:4000])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(net(xs) + 1e-9), ys)
        loss.backward()
        opt.step()
    net.eval()
    path = os.path.join(art, "torch_mlp.pt")
    torch.jit.script(net).save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "models"))
    parser.add_argument("--artifacts", default=os.path.join(HERE, "artifacts"))
    args = parser.parse_args()

    from inferplane.repository.register import parse_tensor_arg, register
    from inferplane.repository.schema import Batching
    from inferplane.repository.store import Repository

    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.rmtree(args.artifacts, ignore_errors=True)
    os.makedirs(args.artifacts)
    repo = Repository(args.out)
    lineage = {"training_data": f"sklearn.make_classification(seed={SEED})", "seed": SEED}
    batching = Batching(max_batch_size=32, max_queue_delay_us=500)

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {msg}", flush=True)

    X, y = tabular_data()
    step("tabular forests (2 versions)")
    onnx_v1, skl_v1 = build_forest(args.artifacts, X, y, depth=8, name="tabular_v1")
    onnx_v2, _ = build_forest(args.artifacts, X, y, depth=10, name="tabular_v2")
    register(repo, "tabular", onnx_v1, batching=batching, metadata={**lineage, "max_depth": 8})
    register(repo, "tabular", onnx_v2, batching=batching, metadata={**lineage, "max_depth": 10})
    repo.set_alias("tabular", "production", 1)
    repo.set_alias("tabular", "canary", 2)
    shutil.copy(os.path.join(HERE, "services.yaml"), os.path.join(args.out, "services.yaml"))
    # Tree models compute in float32 anyway: declaring FP32 lets one payload serve every model.
    fp32_input = [parse_tensor_arg(f"input:FP32:-1,{N_FEATURES}")]
    register(repo, "tabular_skl", skl_v1, inputs=fp32_input, batching=batching, metadata=lineage)
    step("mlp")
    register(repo, "mlp", build_mlp(args.artifacts), batching=batching, metadata={"seed": SEED})
    step("xgboost")
    register(repo, "xgb", build_xgb(args.artifacts, X, y), batching=batching, metadata=lineage)
    step("lightgbm")
    register(
        repo,
        "lgbm",
        build_lgbm(args.artifacts, X, y),
        inputs=fp32_input,
        batching=batching,
        metadata=lineage,
    )
    step("torch")
    register(
        repo,
        "torch_mlp",
        build_torch(args.artifacts, X, y),
        inputs=[parse_tensor_arg(f"input:FP32:-1,{N_FEATURES}")],
        outputs=[parse_tensor_arg("probabilities:FP32:-1,2")],
        batching=batching,
        metadata=lineage,
    )
    step("python")
    register(
        repo,
        "text_stats",
        os.path.join(HERE, "python_model"),
        inputs=[parse_tensor_arg("text:BYTES:-1")],
        outputs=[
            parse_tensor_arg("length:INT64:-1"),
            parse_tensor_arg("words:INT64:-1"),
            parse_tensor_arg("vowel_ratio:FP32:-1"),
            parse_tensor_arg("upper:BYTES:-1"),
        ],
        metadata={"kind": "example of the python runtime"},
    )
    step(f"done: {', '.join(repo.list_models())} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
