"""JSON schemas of the Open Inference Protocol's REST documents, written from its specification
(kserve/open-inference-protocol, specification/protocol/inference_rest.md, and the binary tensor data
extension), independently of app.api.schemas: the responses are checked against what the protocol
says, not against what the service documents about itself."""

PARAMETERS = {
    "type": "object",
    "additionalProperties": {"type": ["boolean", "number", "string"]},
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
    "additionalProperties": False,
}
SERVER_METADATA = {
    "type": "object",
    "required": ["name", "version", "extensions"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}},
    },
}
LIVE = {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}
READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
MODEL_READY = {
    "type": "object",
    "required": ["name", "ready"],
    "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32"]
DATATYPES += ["FP64", "BYTES"]
TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"enum": DATATYPES},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    },
}
MODEL_METADATA = {
    "type": "object",
    "required": ["name", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": TENSOR_METADATA},
        "outputs": {"type": "array", "items": TENSOR_METADATA},
    },
}
TENSOR_DATA = {"type": "array", "items": {"type": ["array", "number", "boolean", "string"]}}
RESPONSE_OUTPUT = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"enum": DATATYPES},
        "parameters": PARAMETERS,
        "data": TENSOR_DATA,
    },
    # data, or binary_data_size with the binary extension: exactly one of them
    "oneOf": [
        {
            "required": ["data"],
            "not": {
                "required": ["parameters"],
                "properties": {"parameters": {"required": ["binary_data_size"]}},
            },
        },
        {
            "not": {"required": ["data"]},
            "properties": {
                "parameters": {
                    "required": ["binary_data_size"],
                    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                }
            },
            "required": ["parameters"],
        },
    ],
}
INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": PARAMETERS,
        "outputs": {"type": "array", "items": RESPONSE_OUTPUT},
    },
}
