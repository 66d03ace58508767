"""dlib's face-recognition network (`dlib_face_recognition_resnet_model_v1.dat`, from the pinned
`face-recognition-models` wheel) run by onnxruntime instead of dlib.

The `dlib-bin` wheel is built without BLAS: its network took 58 ms a face on this CPU, most of an
identity-drift sample. Here the same weights are read from dlib's own file (its serialisation:
integers as a size byte and little-endian bytes, tensors as raw little-endian float32) and written
as an ONNX graph of the same network, built when the embedder starts (no file is written):

    input 150×150 RGB → (x − mean) / 256 → conv 7×7/2, affine, relu → max pool 3×3/2
    → 14 residual blocks (3 × 32, 4 × 64, 3 × 128, 4 × 256 channels; the first of each width but
      the first halves the size: its shortcut is a 2×2/2 average pool) → global average → 128-d

Each block is conv 3×3, affine, relu, conv 3×3, affine, added to its shortcut, relu. Where the two
differ in size (dlib's strided convolutions have no padding), dlib adds them as if the smaller were
padded with zeros at its end (`tt::add`); so does the graph. The 128 numbers equal dlib's
`compute_face_descriptor` on the same chip to float rounding (tested).
"""

from __future__ import annotations

import dataclasses
import os
import typing

import numpy as np

from avatar.errors import AvatarError

CHIP_SIZE = 150  # the network's input side (dlib's `get_face_chip(..., size=150)`)


@dataclasses.dataclass
class Conv:
    """A convolution: `weight (O, I, kh, kw) float32`, `bias (O,)`, its stride and padding."""

    weight: np.ndarray
    bias: np.ndarray
    stride: typing.Tuple[int, int]
    padding: typing.Tuple[int, int]


@dataclasses.dataclass
class Pool:
    """A pooling window `size` (0, 0: the whole input), `stride`, `padding`."""

    size: typing.Tuple[int, int]
    stride: typing.Tuple[int, int]
    padding: typing.Tuple[int, int]


@dataclasses.dataclass
class DlibResnet:
    """The network's parameters in forward order: `mean (3,)` RGB, 29 convolutions each followed by
    its affine `(gamma (C,), beta (C,))`, the max pool, the 5 average pools (the blocks' shortcuts,
    then the global one), and `fc (256, 128)`."""

    mean: np.ndarray
    convs: typing.List[Conv]
    affines: typing.List[typing.Tuple[np.ndarray, np.ndarray]]
    max_pool: Pool
    avg_pools: typing.List[Pool]
    fc: np.ndarray


class _Reader:
    """dlib's serialisation (dlib/serialize.h), from a byte string."""

    def __init__(self, data: bytes, at: int = 0):
        self.data, self.at = data, at

    def int(self) -> int:
        control = self.data[self.at]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.at + 1:self.at + 1 + size], "little")
        self.at += 1 + size
        return -value if control & 0x80 else value

    def float(self) -> float:  # dlib's portable float: a mantissa and a power of two
        mantissa, exponent = self.int(), self.int()
        return float(np.ldexp(float(mantissa), exponent))

    def string(self) -> str:
        size = self.int()
        text = self.data[self.at:self.at + size].decode("ascii")
        self.at += size
        return text

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise AvatarError(f"unexpected dlib tensor version {version}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, "<f4", count, self.at).reshape(shape)
        self.at += 4 * count
        return values.astype(np.float32)

    def alias(self) -> typing.Tuple[int, ...]:
        self.int()  # version
        return tuple(self.int() for _ in range(4))


def _layers(data: bytes, name: str) -> typing.List[_Reader]:
    """Readers placed at each layer whose details start with the serialised string `name`, in file
    order (dlib writes a network's layers from its input up)."""
    tag = bytes([0x01, len(name)]) + name.encode("ascii")
    places, start = [], data.find(tag)
    while start >= 0:
        places.append(_Reader(data, start))
        start = data.find(tag, start + 1)
    return places


def read_dlib_resnet(path: typing.Union[str, os.PathLike]) -> DlibResnet:
    """The parameters of dlib's face-recognition network from its `.dat` file; a one-line
    AvatarError for a file that is not that network or is cut short."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return _parse(data, path)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:  # a truncated or foreign file
        raise AvatarError(f"{path}: cannot read dlib's face-recognition network ({type(exc).__name__}: {exc}); "
                          f"reinstall face-recognition-models") from exc


def _parse(data: bytes, path: typing.Union[str, os.PathLike]) -> DlibResnet:
    inputs = _layers(data, "input_rgb_image_sized")
    if len(inputs) != 1:
        raise AvatarError(f"{path}: not dlib's face-recognition network (no sized RGB input layer)")
    reader = inputs[0]
    reader.string()
    mean = np.array([reader.float() for _ in range(3)], np.float32)
    convs = []
    for reader in _layers(data, "con_4"):
        reader.string()
        params = reader.tensor().ravel()
        filters = reader.int()
        nr, nc, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(6))
        shape = reader.alias()
        count = int(np.prod(shape))
        if shape[0] != filters or params.size != count + filters:
            raise AvatarError(f"{path}: unexpected convolution layout {shape}")
        convs.append(Conv(params[:count].reshape(shape), params[count:], (stride_y, stride_x), (pad_y, pad_x)))
    affines = []
    for reader in _layers(data, "affine_"):
        reader.string()
        params = reader.tensor().ravel()
        half = params.size // 2
        affines.append((params[:half], params[half:]))

    def pools(name: str) -> typing.List[Pool]:
        found = []
        for reader in _layers(data, name):
            reader.string()
            nr, nc, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(6))
            found.append(Pool((nr, nc), (stride_y, stride_x), (pad_y, pad_x)))
        return found

    fcs = _layers(data, "fc_2")
    if len(convs) != 29 or len(affines) != 29 or len(fcs) != 1:
        raise AvatarError(f"{path}: not dlib's face-recognition network ({len(convs)} convolutions, {len(affines)} affine layers)")
    reader = fcs[0]
    reader.string()
    outputs, inputs_n = reader.int(), reader.int()
    fc = reader.tensor().reshape(inputs_n, outputs)
    return DlibResnet(mean, convs, affines, pools("max_pool_2")[0], pools("avg_pool_2"), fc)


def resnet_onnx(net: DlibResnet) -> bytes:
    """The network as an ONNX model: input `chip (N, 150, 150, 3) uint8` RGB (a dlib face chip),
    output `descriptor (N, 128) float32`. Each convolution carries its affine layer folded in."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights = [], []
    counter = iter(range(10 ** 6))

    def name(prefix: str) -> str:
        return f"{prefix}_{next(counter)}"

    def constant(values: np.ndarray, prefix: str) -> str:
        key = name(prefix)
        weights.append(numpy_helper.from_array(np.ascontiguousarray(values), key))
        return key

    def node(op: str, inputs: typing.List[str], **attributes) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    def conv(x: str, index: int, relu: bool) -> str:
        layer, (gamma, beta) = net.convs[index], net.affines[index]
        weight = layer.weight * gamma[:, None, None, None]
        bias = layer.bias * gamma + beta
        pads = [layer.padding[0], layer.padding[1], layer.padding[0], layer.padding[1]]
        y = node("Conv", [x, constant(weight, "w"), constant(bias.astype(np.float32), "b")],
                 kernel_shape=list(weight.shape[2:]), strides=list(layer.stride), pads=pads)
        return node("Relu", [y]) if relu else y

    def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
        return (size + 2 * pad - kernel) // stride + 1

    def padded(x: str, shape: typing.Tuple[int, int, int], to: typing.Tuple[int, int, int]) -> str:
        if shape == to:
            return x
        pads = [0, 0, 0, 0, 0, to[0] - shape[0], to[1] - shape[1], to[2] - shape[2]]
        return node("Pad", [x, constant(np.array(pads, np.int64), "pads")])

    x = node("Cast", ["chip"], to=TensorProto.FLOAT)
    x = node("Transpose", [x], perm=[0, 3, 1, 2])
    x = node("Sub", [x, constant(net.mean.reshape(1, 3, 1, 1), "mean")])
    x = node("Div", [x, constant(np.array(256.0, np.float32), "scale")])
    first = net.convs[0]
    x = conv(x, 0, relu=True)
    side = out_size(CHIP_SIZE, first.weight.shape[2], first.stride[0], first.padding[0])
    pool = net.max_pool
    x = node("MaxPool", [x], kernel_shape=list(pool.size), strides=list(pool.stride), pads=[*pool.padding, *pool.padding])
    side = out_size(side, pool.size[0], pool.stride[0], pool.padding[0])
    shape = (first.weight.shape[0], side, side)
    shortcuts = iter(net.avg_pools[:-1])
    for index in range(1, len(net.convs), 2):
        a, b = net.convs[index], net.convs[index + 1]
        y = conv(conv(x, index, relu=True), index + 1, relu=False)
        y_side = out_size(out_size(shape[1], a.weight.shape[2], a.stride[0], a.padding[0]), b.weight.shape[2], b.stride[0], b.padding[0])
        y_shape = (b.weight.shape[0], y_side, y_side)
        if a.stride[0] != 1:  # the block halves the size: its shortcut is pooled
            pool = next(shortcuts)
            x = node("AveragePool", [x], kernel_shape=list(pool.size), strides=list(pool.stride), pads=[*pool.padding, *pool.padding],
                     count_include_pad=1)
            shape = (shape[0], out_size(shape[1], pool.size[0], pool.stride[0], pool.padding[0]),
                     out_size(shape[2], pool.size[1], pool.stride[1], pool.padding[1]))
        total = tuple(max(p, q) for p, q in zip(shape, y_shape))
        x = node("Relu", [node("Add", [padded(y, y_shape, total), padded(x, shape, total)])])
        shape = total
    x = node("GlobalAveragePool", [x])
    x = node("Flatten", [x], axis=1)
    nodes.append(helper.make_node("MatMul", [x, constant(net.fc.astype(np.float32), "fc")], ["descriptor"]))
    graph = helper.make_graph(nodes, "dlib_face_recognition_resnet_v1",
                              [helper.make_tensor_value_info("chip", TensorProto.UINT8, ["N", CHIP_SIZE, CHIP_SIZE, 3])],
                              [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", 128])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="avatar")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
