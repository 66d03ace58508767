"""The speech encoder's graph made for live windows: the last transformer block computes only the rows
a live window gives (`SpeechConfig.live_hop` frames, `live_right` before its end, and the `live_ahead`
after them that their features hold: `SpeechEncoder.live_window_rows`).

A live window (`SpeechEncoder.live_windows`) is encoded whole but only a few of its `live_window`
frames are kept (5 of 50 at the defaults). Every block's keys and values need all the frames, and so
does every block but the last; the last block's queries, its output projection, its MLP and the final
norm only matter for the kept rows. This rewrites the exported encoder (`assets/speech.onnx`, the
same nodes and weights; nothing is written to disk) so that the last block's queries and residual
are gathered to those rows first: with the 2 shipped blocks and 2 rows kept, about a third of a
window's arithmetic was skipped; the kept rows are the full graph's to float rounding (tested).

    model = rows_only_graph(onnx.load("assets/speech.onnx"), rows=[45, 46, 47, 48, 49])   # bytes for onnxruntime
    # mel (B, 80, 2·live_window) → features (B, len(rows), D): those rows of the full output
    model = int8_graph(model)   # the same on the CPU in int8 arithmetic (`SpeechConfig.live_int8`)
"""

from __future__ import annotations

import contextlib
import logging
import typing

import numpy as np

from avatar.errors import AvatarError


def rows_only_graph(proto, rows: typing.Sequence[int]) -> bytes:
    """`proto`: the encoder's `onnx.ModelProto` (input `mel (B, 80, M)`, output `features (B, M/2, D)`);
    `rows`: encoder frames to keep → the serialised model giving `features (B, len(rows), D)`."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: typing.Dict[str, typing.List] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(tensor: str, op: str):
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != op:
            raise AvatarError(f"the speech encoder's graph is not the exported Whisper encoder this expects "
                              f"({tensor} feeds {[u.op_type for u in users]}, expected one {op}); export it again")
        return users[0]

    def made_by(tensor: str, op: str):
        node = producer.get(tensor)
        if node is None or node.op_type != op:
            raise AvatarError(f"the speech encoder's graph is not the exported Whisper encoder this expects "
                              f"({tensor} is not made by a {op}); export it again")
        return node

    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    if not softmaxes:
        raise AvatarError("the speech encoder's graph is not the exported Whisper encoder this expects (no attention); export it again")
    softmax = softmaxes[-1]  # the last block's attention
    scaled_query = made_by(made_by(softmax.input[0], "MatMul").input[0], "Mul")
    attended = only_consumer(softmax.output[0], "MatMul")
    heads_last = only_consumer(attended.output[0], "Transpose")
    merged = only_consumer(heads_last.output[0], "Reshape")
    projected = only_consumer(only_consumer(merged.output[0], "MatMul").output[0], "Add")
    residual_add = only_consumer(projected.output[0], "Add")
    width = next((int(t.dims[0]) for t in graph.initializer if t.name in projected.input), None)  # the projection's bias
    if width is None:
        raise AvatarError("the speech encoder's graph is not the exported Whisper encoder this expects "
                          "(its last attention projection has no bias); export it again")

    kept = "live_rows"
    graph.initializer.append(numpy_helper.from_array(np.asarray(rows, np.int64), kept))
    graph.initializer.append(numpy_helper.from_array(np.array([0, -1, width], np.int64), "live_rows_shape"))
    query = scaled_query.input[0]  # (B, heads, T, head width)
    graph.node.append(helper.make_node("Gather", [query, kept], ["live_query"], axis=2))
    scaled_query.input[0] = "live_query"
    merged.input[1] = "live_rows_shape"  # (B, rows, heads, head width) → (B, rows, D)
    for attribute in merged.attribute:
        if attribute.name == "allowzero":
            attribute.i = 0  # 0 in the shape copies the batch size
    residual = next(name for name in residual_add.input if name != projected.output[0])
    graph.node.append(helper.make_node("Gather", [residual, kept], ["live_residual"], axis=1))
    residual_add.input[list(residual_add.input).index(residual)] = "live_residual"
    sort_topologically(graph)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def int8_graph(model: bytes) -> bytes:
    """The serialised encoder graph `model` with its weight MatMuls in int8 (onnxruntime's
    `quantize_dynamic`: weights per output channel in 7 bits, so no int16 sum saturates on CPUs
    without VNNI; activations quantized per tensor at run time, so a window's numbers depend on the
    other windows of the same call: run one window a call). Weights stored in float16 behind a Cast
    (`training.export_speech`) are made float32 initializers first, which the quantizer needs."""
    import tempfile

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load_from_string(model)
    graph = proto.graph
    stored = {t.name: t for t in graph.initializer}
    kept, widened = [], set()
    for node in graph.node:
        source = stored.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if source is not None and source.data_type == onnx.TensorProto.FLOAT16:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(source).astype(np.float32), node.output[0]))
            widened.add(source.name)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name in widened and t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    with tempfile.TemporaryDirectory() as folder:
        source_path, target_path = f"{folder}/float.onnx", f"{folder}/int8.onnx"
        onnx.save(proto, source_path)
        with root_logger_untouched():  # it advises its pre-processing (no faster here, measured) on the root logger
            quantize_dynamic(source_path, target_path, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8)
        with open(target_path, "rb") as file:
            return file.read()


@contextlib.contextmanager
def root_logger_untouched():
    """Within: the root logger says only errors; after: its level and handlers as before (a library's
    `logging.warning` gives the root logger a handler the application did not ask for)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def sort_topologically(graph) -> None:
    """Reorder `graph.node` so that every node comes after the nodes its inputs come from."""
    available = {t.name for t in graph.initializer} | {t.name for t in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise AvatarError("the speech encoder's graph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        done = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in done]
    del graph.node[:]
    graph.node.extend(ordered)
