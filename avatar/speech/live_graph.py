"""The speech encoder's graph made for live windows: the blocks written again in fewer nodes, the last
one computing only the rows a live window gives (`SpeechConfig.live_hop` frames, `live_right` before
its end, and the `live_ahead` after them that their features hold: `SpeechEncoder.live_window_rows`).

A live window (`SpeechEncoder.live_windows`) is encoded whole but only a few of its `live_window`
frames are kept (5 of 50 at the defaults). Every block's keys and values need all the frames, and so
does every block but the last; the last block's queries, its output projection, its MLP and the final
norm only matter for the kept rows. `live_blocks_graph` writes the exported encoder's blocks
(`assets/speech.onnx`, the same weights; nothing is written to disk) as onnxruntime's attention and
GELU nodes with the last block's queries and residual for those rows only: with the 2 shipped blocks
and 5 rows kept, 38 % of a window's multiply-adds are skipped, and 37 nodes run instead of the exported 101
(on a slow CPU each node costs microseconds of its own); the kept rows are the full graph's to float
rounding (tested).

The convolutions before the blocks see 3 mel frames each and only the positions added after them
tell the frames apart, so consecutive windows, which share all but 2 of their frames, share their
convolution outputs too except at the window's two ends (zero padding there). `split_at_convolutions`
cuts the encoder into the convolutions (mel → `conv`) and the rest (`conv` → features), so that a
stream computes each frame's convolutions once (`SpeechEncoder.conv_windows`); `matmul_convolutions`
computes each convolution as one matrix product over all the frames of a call.

    convolutions, blocks = split_at_convolutions(onnx.load("assets/speech.onnx"))
    # convolutions: mel (B, 80, M) → conv (B, D, M/2); blocks: conv (B, D, T) → features (B, T, D)
    convolutions = matmul_convolutions(convolutions)   # bytes for onnxruntime: the same numbers
    model = live_blocks_graph(blocks, rows=[45, 46, 47, 48, 49], frames=50)   # bytes for onnxruntime
    # conv (B, D, 50) → features (B, len(rows), D): those rows of the full output
    model = int8_graph(model)   # the same on the CPU in int8 arithmetic (`SpeechConfig.live_int8`)
"""

from __future__ import annotations

import typing

import numpy as np

from avatar.errors import AvatarError
from avatar.runtime import root_logger_untouched


def live_blocks_graph(blocks, rows: typing.Sequence[int], frames: int) -> bytes:
    """The encoder's blocks (`split_at_convolutions`' second part: `conv (B, D, T)` → `features (B, T,
    D)`) written again for live windows of `frames` encoder frames, giving only `rows` of them: the
    serialised model `conv (B, D, frames)` → `features (B, len(rows), D)`, the full graph's numbers for
    those rows to float rounding (tested).

    The same weights in fewer, larger nodes (37 against the exported 101, 92 besides the weights' Casts):
    onnxruntime's `MultiHeadAttention` for each attention (the exported graph spells it in ~25
    Reshape, Transpose, Slice, Squeeze, Mul and MatMul nodes), `Gelu` for each MLP's five elementwise
    nodes, the positions of the window's frames as a constant. The last block's queries are computed
    for the kept rows only (its keys and values need every frame); its residual, attention output, MLP
    and final norm likewise. Reads the weights
    from the exported graph: its LayerNormalizations (2 a block and the final one), its weight MatMuls
    (4 a block: the fused queries, keys and values, the attention's output, the MLP's two) each with
    a bias Add, its positions table and its attention scale; refuses a graph of another shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def refuse(why: str):
        raise AvatarError(f"the speech encoder's graph is not the exported Whisper encoder this expects ({why}); export it again")

    graph = blocks.graph
    stored = {t.name: t for t in graph.initializer}
    casts = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Cast" and node.input[0] in stored}

    def constant(name: str) -> typing.Optional[np.ndarray]:
        tensor = stored.get(casts.get(name, name))
        return None if tensor is None else numpy_helper.to_array(tensor).astype(np.float32)

    consumers: typing.Dict[str, typing.List] = {}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    n_blocks = len(softmaxes)
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    linears = []  # (weight (D_in, D_out), bias (D_out,)) in the graph's order
    for node in graph.node:
        weight = constant(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None:
            continue
        users = consumers.get(node.output[0], [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        bias = [constant(name) for name in add.input if name != node.output[0]] if add is not None else []
        if len(bias) != 1 or bias[0] is None:
            refuse("a weight MatMul without a bias Add")
        linears.append((weight, bias[0]))
    if n_blocks == 0 or len(norms) != 2 * n_blocks + 1 or len(linears) != 4 * n_blocks:
        refuse(f"{n_blocks} attentions, {len(norms)} LayerNormalizations and {len(linears)} weight MatMuls")
    width = linears[0][0].shape[0]
    # the attention scale: the first block's queries and keys each times a scalar before their MatMul
    scores = producer.get(softmaxes[0].input[0])
    factors = [producer.get(name) for name in (scores.input if scores is not None and scores.op_type == "MatMul" else [])]
    scalars = [next((c for c in map(constant, f.input) if c is not None and c.size == 1), None)
               for f in factors if f is not None and f.op_type == "Mul"]
    if len(scalars) != 2 or any(s is None for s in scalars):
        refuse("no scaled queries and keys before the first attention")
    scale = float(scalars[0].ravel()[0] * scalars[1].ravel()[0])  # (q·s)(k·s)ᵀ: s² = 1/√(head width)
    head_width = int(round(scale ** -2))
    positions = [constant(node.input[0]) for node in graph.node if node.op_type == "Slice" and constant(node.input[0]) is not None
                 and constant(node.input[0]).ndim == 2]
    hidden = linears[2][0].shape[1]  # the MLP's
    shapes_ok = all(w.shape == shape and b.shape == shape[1:] for (w, b), shape in zip(
        linears, [(width, 3 * width), (width, width), (width, hidden), (hidden, width)] * n_blocks))
    activations = [node.op_type for node in graph.node if node.op_type in ("Erf", "Tanh", "Sigmoid")]
    if not shapes_ok or len(positions) != 1 or positions[0].shape[1] != width or width % head_width or activations != ["Erf"] * n_blocks:
        refuse("its weights, positions or activations are not Whisper's")
    if not 0 < frames <= positions[0].shape[0] or not len(rows) or min(rows) < 0 or max(rows) >= frames:
        raise ValueError(f"live windows of {frames} frames keeping rows {list(rows)}: "
                         f"not within the encoder's {positions[0].shape[0]} positions")

    nodes, initializers = [], []

    def stored_as(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add_node(op: str, inputs: typing.Sequence[str], output: str, domain: str = "", **attributes) -> str:
        nodes.append(helper.make_node(op, list(inputs), [output], domain=domain, **attributes))
        return output

    def norm(x: str, k: int, out: str) -> str:
        node = norms[k]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gain, shift = constant(node.input[1]), constant(node.input[2])
        if gain is None or shift is None:
            refuse("a LayerNormalization without stored weights")
        return add_node("LayerNormalization", [x, stored_as(f"{out}_gain", gain), stored_as(f"{out}_shift", shift)], out,
                        axis=-1, epsilon=epsilon)

    def linear(x: str, k: int, out: str, columns: slice = slice(None)) -> str:
        weight, bias = linears[k]
        product = add_node("MatMul", [x, stored_as(f"{out}_weight", weight[:, columns])], f"{out}_product")
        return add_node("Add", [product, stored_as(f"{out}_bias", bias[columns])], out)

    def attention(query: str, key: str, value: str, out: str) -> str:  # (B, S, D), (B, T, D), (B, T, D) → (B, S, D)
        return add_node("MultiHeadAttention", [query, key, value], out, domain="com.microsoft",
                        num_heads=width // head_width, scale=scale)

    kept = stored_as("live_rows", np.asarray(rows, np.int64))
    x = add_node("Transpose", ["conv"], "frames", perm=[0, 2, 1])  # (B, T, D)
    x = add_node("Add", [x, stored_as("positions", positions[0][:frames])], "block0_input")
    for b in range(n_blocks):
        last = b == n_blocks - 1
        h = norm(x, 2 * b, f"block{b}_norm")
        if not last:
            q, k, v = f"block{b}_query", f"block{b}_key", f"block{b}_value"
            nodes.append(helper.make_node("Split", [linear(h, 4 * b, f"block{b}_qkv"),
                                                    stored_as(f"block{b}_split", np.full(3, width, np.int64))], [q, k, v], axis=-1))
        else:  # keys and values of every frame, queries of the kept rows
            k, v = f"block{b}_key", f"block{b}_value"
            nodes.append(helper.make_node("Split", [linear(h, 4 * b, f"block{b}_kv", slice(width, None)),
                                                    stored_as(f"block{b}_split", np.full(2, width, np.int64))], [k, v], axis=-1))
            q = linear(add_node("Gather", [h, kept], f"block{b}_kept_norm", axis=1), 4 * b, f"block{b}_query", slice(0, width))
            x = add_node("Gather", [x, kept], f"block{b}_kept", axis=1)
        attended = linear(attention(q, k, v, f"block{b}_attention"), 4 * b + 1, f"block{b}_attention_out")
        x = add_node("Add", [x, attended], f"block{b}_attended")
        h = norm(x, 2 * b + 1, f"block{b}_mlp_norm")
        h = add_node("Gelu", [linear(h, 4 * b + 2, f"block{b}_mlp_in")], f"block{b}_gelu", domain="com.microsoft")
        x = add_node("Add", [x, linear(h, 4 * b + 3, f"block{b}_mlp_out")], f"block{b + 1}_input")
    norm(x, 2 * n_blocks, "features")
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    model = helper.make_model(
        helper.make_graph(nodes, "live_blocks", [helper.make_tensor_value_info("conv", TensorProto.FLOAT, [batch, width, frames])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, len(rows), width])], initializers),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=blocks.ir_version)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def split_at_convolutions(proto) -> typing.Tuple[typing.Any, typing.Any]:
    """The encoder's `onnx.ModelProto` (input `mel (B, 80, M)`, output `features (B, M/2, D)`) cut after
    its two convolutions and their GELUs → (convolutions: `mel` → `conv (B, D, M/2)`; the rest: `conv`
    → `features`), two `ModelProto`s of the same nodes and weights."""
    import copy

    import onnx
    from onnx import TensorProto, helper

    def refuse(why: str):
        raise AvatarError(f"the speech encoder's graph is not the exported Whisper encoder this expects ({why}); export it again")

    graph = proto.graph
    if [i.name for i in graph.input] != ["mel"] or [o.name for o in graph.output] != ["features"]:
        refuse("its input and output are not mel and features")
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if len(convs) != 2:
        refuse(f"{len(convs)} convolutions")
    consumers: typing.Dict[str, typing.List] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # from the second convolution's output through its GELU (elementwise nodes) to the Transpose after it
    reached, frontier, cuts = {convs[1].output[0]}, [convs[1].output[0]], set()
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type == "Transpose":
                cuts.add(node.input[0])
            elif node.op_type in ("Div", "Erf", "Add", "Mul") and node.output[0] not in reached:
                reached.add(node.output[0])
                frontier.append(node.output[0])
    if len(cuts) != 1:
        refuse("no single Transpose after the second convolution's GELU")
    cut = cuts.pop()
    shapes = [node for node in graph.node if node.op_type == "Shape" and node.input[0] in ("mel", convs[1].output[0])]
    for node in shapes:  # the batch size from mel (dim 0) and the frames from the convolution (dim 2): conv has both
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        if (node.input[0] == "mel") != (start == 0):
            refuse("a shape read from mel past its batch size")

    def pruned(model, outputs: typing.Sequence[str]):
        """`model` keeping the nodes and initializers that `outputs` need."""
        producer = {out: node for node in model.graph.node for out in node.output}
        needed, stack, keep = set(), list(outputs), []
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if name in needed or node is None:
                continue
            needed.add(name)
            keep.append(node)
            stack.extend(node.input)
        kept = {id(node) for node in keep}
        nodes = [node for node in model.graph.node if id(node) in kept]
        used = {name for node in nodes for name in node.input}
        initializers = [t for t in model.graph.initializer if t.name in used]
        del model.graph.node[:], model.graph.initializer[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(initializers)
        return model

    batch = graph.input[0].type.tensor_type.shape.dim[0]
    conv_type = helper.make_tensor_type_proto(TensorProto.FLOAT, [batch.dim_param or "batch", None, "frames"])
    convolutions = copy.deepcopy(proto)
    convolutions.graph.node.append(helper.make_node("Identity", [cut], ["conv"]))
    del convolutions.graph.output[:]
    convolutions.graph.output.append(helper.make_value_info("conv", conv_type))
    convolutions = pruned(convolutions, ["conv"])
    blocks = copy.deepcopy(proto)
    for node in blocks.graph.node:
        if node.op_type == "Shape" and node.input[0] in ("mel", convs[1].output[0]):
            node.input[0] = "conv"
        for i, name in enumerate(node.input):
            if name == cut:
                node.input[i] = "conv"
    del blocks.graph.input[:]
    blocks.graph.input.append(helper.make_value_info("conv", conv_type))
    blocks = pruned(blocks, ["features"])
    for model in (convolutions, blocks):
        del model.graph.value_info[:]
        onnx.checker.check_model(model)
    return convolutions, blocks


def matmul_convolutions(convolutions) -> bytes:
    """The encoder's convolutions (`split_at_convolutions`' first part: `mel (B, 80, M)` → `conv (B, D,
    M/2)`) with each Conv computed as one MatMul over all the call's frames: frames channel-last, each
    output frame's 3 taps (zero padding at both ends; every second frame for the stride-2 one) side by
    side, times the kernel as a `(3·C, D)` matrix; the GELUs after them are the graph's own nodes.
    onnxruntime's Conv multiplies each batch item apart, reading the kernels (2.2 MB) once per item: a
    live window's 2 pieces of 8 mel frames (`SpeechEncoder.conv_windows`) took twice as long as this.
    The same numbers to float rounding, and a frame's numbers do not depend on the other frames of the
    call (each output row is its own dot products; tested bitwise). Returns the serialised model."""
    import onnx
    from onnx import helper, numpy_helper

    graph = convolutions.graph
    stored = {t.name: t for t in graph.initializer}
    casts = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Cast"}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    last = [node for node in graph.node if "conv" in node.output]
    if len(convs) != 2 or [i.name for i in graph.input] != ["mel"] or len(last) != 1 or last[0].op_type != "Identity":
        raise AvatarError("the speech encoder's convolutions are not the two this expects; export it again")

    def weight(name: str) -> np.ndarray:
        tensor = stored.get(casts.get(name, name))
        if tensor is None:
            raise AvatarError(f"the speech encoder's convolution weight {name} is not stored in its graph; export it again")
        return numpy_helper.to_array(tensor).astype(np.float32)

    nodes, initializers = [], []
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in stored:
            continue  # the kernels are stored again below, as matrices
        if node is last[0]:  # (B, M/2, D) → (B, D, M/2)
            nodes.append(helper.make_node("Transpose", list(node.input), ["conv"], perm=[0, 2, 1]))
            continue
        if node.op_type != "Conv":
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = weight(node.input[1])  # (D, C, 3)
        stride = list(attributes.get("strides", [1]))[0]
        if kernel.shape[2] != 3 or list(attributes.get("pads", [])) != [1, 1] or list(attributes.get("dilations", [1])) != [1] \
                or attributes.get("group", 1) != 1 or len(node.input) != 3:
            raise AvatarError("the speech encoder's convolutions are not Whisper's (kernel 3, padding 1, a bias); export it again")
        name = node.output[0]
        frames = node.input[0]
        if frames == "mel":  # (B, 80, M) → (B, M, 80)
            nodes.append(helper.make_node("Transpose", ["mel"], ["mel_frames"], perm=[0, 2, 1]))
            frames = "mel_frames"
        initializers += [numpy_helper.from_array(kernel.transpose(2, 1, 0).reshape(-1, kernel.shape[0]), f"{name}_kernel"),
                         numpy_helper.from_array(weight(node.input[2]), f"{name}_bias"),
                         numpy_helper.from_array(np.array([0, 1, 0, 0, 1, 0], np.int64), f"{name}_pads")]
        nodes.append(helper.make_node("Pad", [frames, f"{name}_pads"], [f"{name}_padded"]))  # (B, M + 2, C)
        taps = []
        for tap, (start, end) in enumerate([(0, -2), (1, -1), (2, np.iinfo(np.int64).max)]):
            bounds = [f"{name}_tap{tap}_{what}" for what in ("starts", "ends", "axes", "steps")]
            for what, value in zip(bounds, (start, end, 1, stride)):
                initializers.append(numpy_helper.from_array(np.array([value], np.int64), what))
            nodes.append(helper.make_node("Slice", [f"{name}_padded", *bounds], [f"{name}_tap{tap}"]))
            taps.append(f"{name}_tap{tap}")
        nodes.append(helper.make_node("Concat", taps, [f"{name}_columns"], axis=-1))  # (B, M', 3·C): tap-major
        nodes.append(helper.make_node("MatMul", [f"{name}_columns", f"{name}_kernel"], [f"{name}_product"]))
        nodes.append(helper.make_node("Add", [f"{name}_product", f"{name}_bias"], [name]))  # (B, M', D)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:], graph.initializer[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + initializers)
    sort_topologically(graph)
    onnx.checker.check_model(convolutions)
    return convolutions.SerializeToString()


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
                             weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        with open(target_path, "rb") as file:
            return file.read()


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
