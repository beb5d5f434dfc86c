"""Run by tests/e2e/test_open_inference.py in the clients' own environment (.venv-clients: tritonclient
and kserve, whose pins would disturb the project's): score rows with the real Open Inference Protocol
clients and print what they got, as JSON, for the test to compare with /score.

    python oip_clients.py HOST:PORT MODEL ROWS.npy
"""

import asyncio
import json
import sys

import numpy as np
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

OUTPUTS = ("score", "is_anomaly", "p_value", "log_likelihood")


def with_triton(url: str, model: str, rows: np.ndarray) -> dict:
    client = triton.InferenceServerClient(url)
    got: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": client.get_model_metadata(model),
        "server": client.get_server_metadata(),
    }
    for binary in (True, False):
        x = triton.InferInput("x", list(rows.shape), "FP32")
        x.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
        requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
        result = client.infer(model, [x], outputs=requested, request_id="req-1")
        response = result.get_response()
        got[f"binary_{binary}"] = {
            "id": response.get("id"),
            "outputs": {name: result.as_numpy(name).tolist() for name in OUTPUTS},
        }
    # No outputs named: tritonclient asks for every output as binary (binary_data_output)
    x = triton.InferInput("x", list(rows.shape), "FP64")
    x.set_data_from_numpy(rows, binary_data=True)
    result = client.infer(model, [x], parameters={"method": "latent", "threshold": "fpr_0.01"})
    got["defaults_latent"] = {
        "parameters": result.get_response()["parameters"],
        "outputs": {name: result.as_numpy(name).tolist() for name in OUTPUTS},
    }
    try:
        client.infer("not-this-model", [x])
    except InferenceServerException as e:
        got["unknown_model_error"] = e.message()
    return got


async def with_kserve(base: str, model: str, rows: np.ndarray) -> dict:
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    got: dict = {
        "live": await client.is_server_live(base),
        "ready": await client.is_server_ready(base),
        "model_ready": await client.is_model_ready(base, model),
    }
    for binary in (False, True):
        x = InferInput(name="x", shape=list(rows.shape), datatype="FP64")
        x.set_data_from_numpy(rows, binary_data=binary)
        request = InferRequest(model_name=model, infer_inputs=[x], request_id="req-2")
        response = await client.infer(base, request, model_name=model)
        got[f"binary_{binary}"] = {
            "id": response.id,
            "outputs": {o.name: o.as_numpy().tolist() for o in response.outputs},
        }
    await client.close()
    return got


def main() -> None:
    address, model, path = sys.argv[1:4]
    rows = np.load(path)
    print(
        json.dumps(
            {
                "triton": with_triton(address, model, rows),
                "kserve": asyncio.run(with_kserve(f"http://{address}", model, rows)),
            }
        )
    )


if __name__ == "__main__":
    main()
