"""The Open Inference Protocol servicer's tensor translation (gateway/api/oip.py) without a gateway: the
two layouts of an FP32 input (typed and raw little-endian) give the same matrix, Triton's raw BYTES
layout (4-byte length before each element) round-trips, and each malformed tensor is a
ValidationError naming its field. The live protocol, through tritonclient, is
tests/integration/test_oip.py."""

from __future__ import annotations

import numpy as np
import pytest

from chimera.v1 import grpc_predict_v2_pb2 as pb
from gateway.api.oip import InferenceServicer, _bytes_tensor, _version_number
from registry import ValidationError

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 3


def request(raw: bool = True, **params: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    if raw:
        req.raw_input_contents.append(X.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(X.ravel().tolist())
    for k, v in params.items():
        req.parameters[k].string_param = v
    return req


def param(name: str, kind: str, value: object):
    """A mutation setting request parameter `name`'s `kind` (e.g. string_param) to `value`."""
    return lambda r: setattr(r.parameters[name], kind, value)


def rows(req: pb.ModelInferRequest):  # _rows reads only the request
    return InferenceServicer._rows(None, req)  # type: ignore[arg-type]


def test_raw_and_typed_fp32_give_the_same_rows_and_one_key_for_all() -> None:
    a, b = rows(request(raw=True, routing_key="u1")), rows(request(raw=False, routing_key="u1"))
    assert np.array_equal(a.matrix, X) and np.array_equal(b.matrix, X)
    assert a.routing_keys == ["u1", "u1"] and a.request_ids == ["", ""]


def test_bytes_inputs_in_triton_raw_layout_round_trip() -> None:
    req = request(raw=True)
    req.inputs.add(name="routing_key", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(_bytes_tensor(["ключ", ""]))
    req.inputs.add(name="request_id", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(_bytes_tensor(["r1", "r2"]))
    packed = rows(req)
    assert packed.routing_keys == ["ключ", ""] and packed.request_ids == ["r1", "r2"]


@pytest.mark.parametrize("mutate, field", [
    (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "inputs['input'].datatype"),
    (lambda r: r.inputs[0].shape.__setitem__(1, 5), "raw_input_contents holds 32 bytes"),
    (lambda r: r.inputs[0].ClearField("shape"), "inputs['input'].shape"),
    (lambda r: setattr(r.inputs[0], "name", "x"), "inputs[0].name: unknown input 'x'"),
    (lambda r: r.raw_input_contents.append(b""), "raw_input_contents: 2 entries for 1 inputs"),
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "must be empty when raw_input_contents"),
    (param("routing_key", "int64_param", 7), "parameters['routing_key']: must be a"),
    (param("request_id", "string_param", "one"), "parameters['request_id']: one id"),
    (param("routing_key", "string_param", "a\x00"), "routing_key[0]: contains U+0000"),
    (param("routing_key", "string_param", "k" * 300), "routing_key: 300 characters"),
])
def test_malformed_tensors_name_the_field(mutate, field: str) -> None:
    req = request(raw=True)
    mutate(req)
    with pytest.raises(ValidationError) as err:
        rows(req)
    assert field in str(err.value)


def test_bytes_input_with_a_torn_element_is_refused() -> None:
    req = request(raw=True)
    req.inputs.add(name="routing_key", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(_bytes_tensor(["a", "b"])[:-1])
    with pytest.raises(ValidationError, match=r"inputs\['routing_key'\]: raw_input_contents of 9 bytes"):
        rows(req)


def test_missing_input_and_typed_count() -> None:
    req = pb.ModelInferRequest(model_name="m")
    with pytest.raises(ValidationError, match="missing input 'input'"):
        rows(req)
    req = request(raw=False)
    req.inputs[0].contents.fp32_contents.append(0.5)
    with pytest.raises(ValidationError, match="fp32_contents: 9 values, shape \\[2, 4\\] needs 8"):
        rows(req)


@pytest.mark.parametrize("text, expected", [("", 0), ("3", 3)])
def test_version_numbers(text: str, expected: int) -> None:
    assert _version_number("model_version", text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "v2", "latest", "1" * 12])
def test_bad_version_numbers(text: str) -> None:
    with pytest.raises(ValidationError, match="model_version"):
        _version_number("model_version", text)
