"""What one ext_proc message costs to parse and serialize: xds-protos (upb) against envoy-data-plane.

    .venv/bin/python -m bench.codec      → bench/results/codec.json

The design named both packages for the ext_proc messages. The service uses ``xds-protos`` (the gRPC
project's generated Envoy API on the ``protobuf`` runtime, upb in C); ``envoy-data-plane`` (pure
Python, betterproto2) is measured here to show why it stays off the request path: every request
costs four or five such messages each way.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .common import per_call, write

HEADERS = [(":path", "/v1/chat/completions"), (":method", "POST"), (":authority", "llm.example"), ("content-type", "application/json"),
           ("x-request-id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), ("authorization", "Bearer " + "k" * 40), ("user-agent", "OpenAI/Python 1.40")]


def xds_messages(body: bytes) -> dict[str, bytes]:
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in HEADERS])))
    return {"headers": headers.SerializeToString(),
            "body": pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)).SerializeToString()}


def main() -> dict:
    from envoy_data_plane.envoy.service.ext_proc.v3 import ProcessingRequest as DataPlaneRequest

    rows = []
    for size in (2 * 1024, 20 * 1024, 200 * 1024):
        wire = xds_messages(b"x" * size)
        for kind, data in wire.items():
            upb_msg = pb.ProcessingRequest.FromString(data)
            dp_msg = DataPlaneRequest.parse(data)
            assert bytes(dp_msg) == data or len(bytes(dp_msg)) == len(data)  # the same message both ways
            row = {
                "message": kind,
                "body_bytes": size if kind == "body" else 0,
                "wire_bytes": len(data),
                "xds_protos_parse_us": per_call(lambda: pb.ProcessingRequest.FromString(data))["median_s"] * 1e6,
                "xds_protos_serialize_us": per_call(upb_msg.SerializeToString)["median_s"] * 1e6,
                "envoy_data_plane_parse_us": per_call(lambda: DataPlaneRequest.parse(data))["median_s"] * 1e6,
                "envoy_data_plane_serialize_us": per_call(lambda: bytes(dp_msg))["median_s"] * 1e6,
            }
            row["parse_ratio"] = row["envoy_data_plane_parse_us"] / row["xds_protos_parse_us"]
            row["serialize_ratio"] = row["envoy_data_plane_serialize_us"] / row["xds_protos_serialize_us"]
            rows.append(row)
            print(f"{kind:7} {len(data):>7} B  parse {row['xds_protos_parse_us']:7.2f} µs vs {row['envoy_data_plane_parse_us']:9.1f} µs "
                  f"({row['parse_ratio']:.0f}x)  serialize {row['xds_protos_serialize_us']:7.2f} µs vs "
                  f"{row['envoy_data_plane_serialize_us']:9.1f} µs ({row['serialize_ratio']:.0f}x)", flush=True)
    result = {"rows": rows}
    write("codec", result)
    return result


if __name__ == "__main__":
    main()
